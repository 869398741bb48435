"""``check`` and ``setup`` tell the operator what is still to do and what will be rejected.

- ``check`` before ``setup`` on a fresh database (the runbook's order) reports the control
  schema as a step still to do and validates everything else (issue 11, item 18);
- a maybe-NULL source expression feeding a NOT NULL target column is a warning from
  ``setup`` and, from ``check``, a count of the live source rows it would reject (item 17).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from dualwrite.cli import main

_TABLES = """
CREATE TABLE items (id int PRIMARY KEY, label text, shop text NOT NULL DEFAULT 'a');
CREATE SCHEMA v2;
CREATE TABLE v2.items (id int PRIMARY KEY, label text NOT NULL, shop text NOT NULL);
INSERT INTO items (id, label, shop)
SELECT i, CASE WHEN i % 4 = 0 THEN NULL ELSE 'x' || i END, CASE WHEN i <= 10 THEN 'a' ELSE 'b' END
FROM generate_series(1, 20) AS i;
"""


def _mapping(**extra: Any) -> dict[str, Any]:
    return {
        "name": "items",
        "source": "items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "label": "label", "shop": "shop"},
        **extra,
    }


def _config(tmp_path: Path, dsn: str, *mappings: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"service_dsn": dsn, "mappings": list(mappings)}))
    return str(path)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- item 18 ------------------------------------------------------------------------------


def test_check_before_setup_reports_the_step_to_do_and_validates_the_rest(db, tmp_path, capsys):
    db.sql(_TABLES)
    db.sql("CREATE TABLE v2.items_s (id int PRIMARY KEY, label text, shop text NOT NULL)")
    sync = _mapping(name="items_sync", mode="sync", target="v2.items_s")
    config = _config(tmp_path, db.dsn, _mapping(), sync)
    code, out, err = _run(capsys, "check", "--config", config)
    assert code == 0, err
    assert "control schema: at version 0" in out
    assert "step still to do: `dualwrite setup --config FILE`" in out
    # the sync mapping's statements (delete function included) were validated in the rehearsal
    assert "mapping items_sync: public.items -> v2.items_s (sync) ok" in out
    assert "configuration is valid against the live database" in out
    # ...which was rolled back: check changed nothing
    assert db.scalar("SELECT to_regnamespace('dualwrite') IS NULL")
    assert db.scalar("SELECT count(*) FROM pg_proc WHERE proname LIKE 'dualwrite%'") == 0


def test_check_before_setup_still_fails_for_a_mapping_that_does_not_fit(db, tmp_path, capsys):
    db.sql(_TABLES)
    bad = _mapping(columns={"id": "id", "label": "label", "shop": "shop", "nope": "label"})
    code, _, err = _run(capsys, "check", "--config", _config(tmp_path, db.dsn, bad))
    assert code == 2
    assert "mappings[items]: target column 'nope' does not exist in v2.items" in err
    assert "control schema" not in err


def test_check_after_setup_has_nothing_left_to_do(db, tmp_path, capsys):
    db.sql(_TABLES)
    config = _config(
        tmp_path,
        db.dsn,
        _mapping(columns={"id": "id", "label": "coalesce(label, '')", "shop": "shop"}),
    )
    assert _run(capsys, "setup", "--config", config)[0] == 0
    code, out, _ = _run(capsys, "check", "--config", config)
    assert code == 0
    assert "control schema" not in out
    assert "warning" not in out


def test_the_readme_runbook_runs_check_then_setup():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    runbook = readme.split("## Migration runbook", 1)[1].split("\n## ", 1)[0]
    assert "dualwrite check" in runbook
    assert runbook.index("dualwrite check") < runbook.index("dualwrite setup")
    assert "step still to do" in runbook


# --- item 17 ------------------------------------------------------------------------------


def test_setup_warns_and_check_counts_the_rows_a_not_null_target_would_reject(db, tmp_path, capsys):
    db.sql(_TABLES)
    config = _config(tmp_path, db.dsn, _mapping())
    code, out, _ = _run(capsys, "setup", "--config", config)
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: mapping items: target column 'label' is NOT NULL but its expression (label) "
        "may be NULL; such rows will be rejected by the target (run `dualwrite check` to "
        "count them in the live source)"
    ]
    code, out, _ = _run(capsys, "check", "--config", config)
    assert code == 0
    expected = db.scalar("SELECT count(*) FROM items WHERE label IS NULL")
    assert expected == 5
    assert (
        "warning: mapping items: target column 'label' is NOT NULL but its expression (label) "
        "may be NULL: 5 live source rows would be rejected by the target today" in out
    )
    # shop is NOT NULL in the source: no warning for it
    assert "'shop'" not in out


def test_the_count_respects_the_filter_and_a_coalesce_is_no_risk(db, tmp_path, capsys):
    db.sql(_TABLES)
    filtered = _mapping(
        filter="shop = 'a'", columns={"id": "id", "label": "upper(label)", "shop": "shop"}
    )
    code, out, _ = _run(capsys, "check", "--config", _config(tmp_path, db.dsn, filtered))
    assert code == 0
    in_filter = db.scalar("SELECT count(*) FROM items WHERE label IS NULL AND shop = 'a'")
    assert in_filter == 2
    assert f"may be NULL: {in_filter} live source rows would be rejected" in out
    safe = _mapping(columns={"id": "id", "label": "coalesce(label, 'none')", "shop": "shop"})
    code, out, _ = _run(capsys, "check", "--config", _config(tmp_path, db.dsn, safe))
    assert code == 0
    assert "warning" not in out


def test_a_cross_database_target_is_skipped_with_a_note(pg, db, tmp_path, capsys):
    db.sql(_TABLES)
    other = pg.create_database()
    try:
        other.sql(
            "CREATE SCHEMA v2; "
            "CREATE TABLE v2.items (id int PRIMARY KEY, label text NOT NULL, shop text)"
        )
        mapping = _mapping(target_dsn=other.dsn)
        code, out, err = _run(capsys, "check", "--config", _config(tmp_path, db.dsn, mapping))
        assert code == 0, err
        assert (
            "note: mapping items: NOT NULL target columns not checked against the source's "
            "NULLs (the target is in another database)" in out
        )
    finally:
        other.drop()
