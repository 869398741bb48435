"""Every rule in docs/lint-rules.md: its bad example gives its finding, its good example does not,
and the documented severity and engine are the ones the code reports."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import Database
from support.lint import evidence_database, lint_text, rules_of, write_config
from support.pos import migration

from lint.run import all_rules

DOC = Path(__file__).resolve().parent.parent / "docs" / "lint-rules.md"
_SECTION = re.compile(r"^### `([a-z0-9-]+)`\n(.*?)(?=^### |^## |\Z)", re.MULTILINE | re.DOTALL)
_META = re.compile(r"^severity: (\w+) · engine: (\w+)(?: · needs: (\w+))?$", re.MULTILINE)
_EXAMPLE = re.compile(r"^```sql (bad|good)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Documented:
    rule: str
    severity: str
    engine: str
    needs: str
    bad: str
    good: str


def documented() -> Iterator[Documented]:
    for match in _SECTION.finditer(DOC.read_text(encoding="utf-8")):
        rule, body = match.group(1), match.group(2)
        meta = _META.search(body)
        assert meta is not None, f"{rule}: no severity/engine line"
        examples = dict(_EXAMPLE.findall(body))
        assert set(examples) == {"bad", "good"}, f"{rule}: needs one bad and one good example"
        yield Documented(
            rule,
            meta.group(1),
            meta.group(2),
            meta.group(3) or "",
            examples["bad"],
            examples["good"],
        )


DOCUMENTED = list(documented())
OFFLINE = [d for d in DOCUMENTED if d.needs != "live"]
LIVE = [d for d in DOCUMENTED if d.needs == "live"]


def test_every_rule_is_documented_once_with_its_severity_and_engine() -> None:
    rules = all_rules()
    names = [d.rule for d in DOCUMENTED]
    assert len(names) == len(set(names)), "a rule is documented twice"
    assert set(names) == set(rules), (
        f"undocumented: {sorted(set(rules) - set(names))}; "
        f"documented but unknown: {sorted(set(names) - set(rules))}"
    )
    for doc in DOCUMENTED:
        rule = rules[doc.rule]
        assert (doc.severity, doc.engine, doc.needs) == (rule.severity, rule.engine, rule.needs)


@pytest.fixture
def mapping_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "split-users.yaml", migration("split-users"))


@pytest.mark.parametrize("doc", OFFLINE, ids=[d.rule for d in OFFLINE])
def test_offline_rule_examples(doc: Documented, tmp_path: Path, mapping_config: Path) -> None:
    config = mapping_config if doc.needs == "config" else None
    bad = lint_text(tmp_path, doc.bad, name="bad.sql", config=config)
    good = lint_text(tmp_path, doc.good, name="good.sql", config=config)
    assert doc.rule in rules_of(bad), [f"{f.rule}: {f.message}" for f in bad]
    assert doc.rule not in rules_of(good), [f"{f.rule}: {f.message}" for f in good]
    finding = next(f for f in bad if f.rule == doc.rule)
    assert finding.severity == doc.severity
    assert finding.why
    assert finding.fix
    assert 1 <= finding.line <= doc.bad.count("\n") + 1


def test_live_rule_examples(db: Database, tmp_path: Path) -> None:
    """The live rules' examples against the documented situation: the POS schema, split-users'
    mappings, a week of traffic, and a transaction holding a lock on products."""
    evidence_database(db)
    config = write_config(
        tmp_path / "live.yaml", {"service_dsn": db.dsn, **migration("split-users")}
    )
    holder = db.connect(autocommit=False)
    try:
        holder.execute("UPDATE products SET name = name WHERE false")  # ROW EXCLUSIVE, held
        for doc in LIVE:
            bad = lint_text(tmp_path, doc.bad, name="bad.sql", config=config, live=True)
            good = lint_text(tmp_path, doc.good, name="good.sql", config=config, live=True)
            assert doc.rule in rules_of(bad), (doc.rule, [f"{f.rule}: {f.message}" for f in bad])
            assert doc.rule not in rules_of(good), (
                doc.rule,
                [f"{f.rule}: {f.message}" for f in good],
            )
    finally:
        holder.rollback()
        holder.close()
