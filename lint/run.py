"""Lints a set of files: parse, our rules, squawk's, the mappings, then (``--live``) the
database and the traffic evidence; applies disables and severity overrides."""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from core.config import Config
from core.errors import ConfigError
from core.mapping import CompiledMapping, compile_all
from core.traffic import Evidence, has_traffic_tables, read_evidence
from lint import evidence as contract
from lint import squawk
from lint.facts import Facts, Relation, facts_of
from lint.findings import SEVERITIES, Finding, Rule, at_least
from lint.live import Live, connect
from lint.rules import LOCK_QUEUE, RULES, SYNTAX_ERROR, Context, check
from lint.script import Script, Statement, blank_psql, parse_script


def all_rules() -> dict[str, Rule]:
    """Every rule dualwrite reports: its own and squawk's (by id)."""
    return {**RULES, **squawk.SQUAWK_RULES}


def known_rule_ids() -> set[str]:
    return set(all_rules()) | set(squawk.REPLACED)


@dataclass
class Options:
    fail_on: str = "error"
    #: disabled for every file (config lint.disable plus --disable)
    disabled: frozenset[str] = frozenset()
    severity: dict[str, str] = field(default_factory=dict)
    pg_version: int = 15
    live: bool = False
    since: timedelta = timedelta(days=7)
    #: check contract steps against these mappings (from --config)
    mappings: list[CompiledMapping] = field(default_factory=list)
    search_path: tuple[str, ...] = ("public",)


@dataclass
class FileResult:
    script: Script
    findings: list[Finding]
    #: per statement (None when the file did not parse)
    facts: list[Facts] | None = None


@dataclass
class LintResult:
    files: list[FileResult]
    options: Options
    squawk_version: str
    #: what --live saw (None without --live)
    server_version: int | None = None
    traffic: Evidence | None = None

    @property
    def findings(self) -> list[Finding]:
        return [f for result in self.files for f in result.findings]

    @property
    def failed(self) -> bool:
        return any(at_least(f.severity, self.options.fail_on) for f in self.findings)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(reversed(SEVERITIES), 0)
        for finding in self.findings:
            counts[finding.severity] += 1
        return counts


def options_from(
    config: Config,
    *,
    fail_on: str | None,
    disable: Sequence[str],
    live: bool,
    since: timedelta | None,
    with_mappings: bool,
) -> Options:
    """Options from the config's ``lint:`` section, with the command line's overrides."""
    from core.config import parse_duration  # noqa: PLC0415

    known = known_rule_ids()
    for index, rule in enumerate(config.lint.disable):
        if rule not in known:
            raise ConfigError(f"lint.disable[{index}]", f"unknown rule {rule!r}")
    for rule in config.lint.severity:
        if rule not in known:
            raise ConfigError(f"lint.severity.{rule}", "unknown rule")
    for rule in disable:
        if rule not in known:
            raise ConfigError("--disable", f"unknown rule {rule!r}")
    return Options(
        fail_on=fail_on or config.lint.fail_on,
        disabled=frozenset(config.lint.disable) | frozenset(disable),
        severity=dict(config.lint.severity),
        pg_version=config.lint.pg_version,
        live=live,
        since=since or parse_duration(config.lint.since),
        mappings=compile_all(config) if with_mappings else [],
        search_path=tuple(config.search_path),
    )


def read_text(path: str) -> str:
    """A file's text; an unreadable file is a usage error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "is a directory") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None


def lint_files(paths: Sequence[str], options: Options) -> list[FileResult]:
    """The static part: every rule that needs no database.

    squawk (a subprocess) runs on each file while PostgreSQL's parser and our rules work on
    it, so its time mostly hides behind ours.
    """
    binary = squawk.squawk_binary()
    texts = [read_text(path) for path in paths]
    results = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        for path, text in zip(paths, texts, strict=True):
            blanked = blank_psql(text)
            hits = pool.submit(
                squawk.run_squawk, binary, path, blanked[0], pg_version=options.pg_version
            )
            script = parse_script(path, text, blanked)
            results.append(lint_script(script, options, binary, hits))
    return results


def lint_script(
    script: Script,
    options: Options,
    binary: str,
    squawk_hits: Future[list[squawk.SquawkHit]] | None = None,
) -> FileResult:
    if script.parse_error is not None:
        message, line = script.parse_error
        finding = Finding(
            rule=SYNTAX_ERROR.id,
            severity=SYNTAX_ERROR.severity,
            path=script.path,
            line=line,
            message=message,
            why=SYNTAX_ERROR.why,
            fix=SYNTAX_ERROR.fix,
        )
        return FileResult(script, _judge(script, [finding], options))
    facts = [facts_of(s) for s in script.statements]
    findings = check(script, facts, known_rule_ids())
    hits = squawk_hits.result() if squawk_hits is not None else None
    findings += _squawk(script, facts, options, binary, hits)
    if options.mappings:
        findings += contract.mapping_findings(script, facts, options.mappings, options.search_path)
    return FileResult(script, findings, facts)


def _squawk(
    script: Script,
    facts: list[Facts],
    options: Options,
    binary: str,
    file_hits: list[squawk.SquawkHit] | None,
) -> list[Finding]:
    """squawk on the file, and on the statements its DO blocks run."""
    if file_hits is None:
        file_hits = squawk.run_squawk(
            binary, script.path, script.sql, pg_version=options.pg_version
        )
    top = [s for s in script.statements if not s.inner]
    first_lines = [s.line for s in top]
    hits = [(hit, _statement_at(top, first_lines, hit.line)) for hit in file_hits]
    inner = [s for s in script.statements if s.inner]
    if inner:
        text = "\n".join(s.text.rstrip(";") + ";" for s in inner)
        for hit in squawk.run_squawk(binary, script.path, text, pg_version=options.pg_version):
            statement = inner[min(hit.line, len(inner)) - 1]
            hits.append(
                (
                    squawk.SquawkHit(
                        hit.rule, statement.line, statement.end_line, hit.message, hit.help
                    ),
                    statement.index,
                )
            )
    created = _created_before(facts)
    findings = []
    for hit, index in hits:
        if hit.rule == squawk.SQUAWK_SYNTAX_ERROR:
            continue  # PostgreSQL's own parser accepted the file; squawk's parser differs
        if index is not None and squawk.moot_on_new_tables(hit.rule):
            relation = facts[index].relation
            if relation is not None and created(index, relation):
                continue
        if (
            hit.rule == "constraint-missing-not-valid"
            and index is not None
            and any(kind == "CONSTR_EXCLUSION" for kind, _, _ in facts[index].added_constraints)
        ):
            continue  # cannot be NOT VALID: adding-exclusion-constraint says what to do
        findings.append(squawk.to_finding(hit, script.path, index))
    return findings


def _statement_at(top: list[Statement], first_lines: list[int], line: int) -> int | None:
    """The top-level statement spanning ``line`` (statements are in line order)."""
    at = bisect.bisect_right(first_lines, line) - 1
    while at >= 0 and top[at].line == line and at > 0 and top[at - 1].end_line >= line:
        at -= 1  # several statements on one line: the first
    if at >= 0 and top[at].line <= line <= top[at].end_line:
        return top[at].index
    return None


def _created_before(facts: list[Facts]) -> _CreatedBefore:
    """Which statement first created each relation (qualified and bare name)."""
    first: dict[tuple[str | None, str], int] = {}
    for index, fact in enumerate(facts):
        for relation in fact.creates:
            first.setdefault((relation.schema, relation.name), index)
            first.setdefault((None, relation.name), index)
    return _CreatedBefore(first)


@dataclass(frozen=True)
class _CreatedBefore:
    first: dict[tuple[str | None, str], int]

    def __call__(self, index: int, relation: Relation) -> bool:
        """The file created ``relation`` before statement ``index``."""
        created = self.first.get((relation.schema, relation.name))
        return created is not None and created < index


def _judge(script: Script, findings: list[Finding], options: Options) -> list[Finding]:
    """Disables (file comments, config, --disable) and severity overrides; sorted by line."""
    disabled = options.disabled | set(script.disabled)
    kept = []
    for finding in findings:
        if finding.rule in disabled:
            continue
        finding.severity = options.severity.get(finding.rule, finding.severity)
        kept.append(finding)
    kept.sort(key=lambda f: (f.line, -SEVERITIES.index(f.severity), f.rule))
    return kept


# --- with --live -----------------------------------------------------------------------------


async def lint_live(paths: Sequence[str], options: Options, config: Config) -> LintResult:
    """Everything: static rules, then the database and traffic evidence."""
    live = await connect(config)
    try:
        options.pg_version = live.server_version
        binary = squawk.squawk_binary()
        results = await asyncio.to_thread(lint_files, paths, options)
        traffic = await _traffic(live, options, config)
        for result in results:
            await _enrich(result, live, traffic, options)
        return LintResult(results, options, squawk.version(binary), live.server_version, traffic)
    finally:
        await live.conn.close()


async def _traffic(live: Live, options: Options, config: Config) -> Evidence | None:
    if not await has_traffic_tables(live.conn):
        return None
    since = await live.conn.fetchval("SELECT now() - $1::interval", options.since)
    stale = max(180.0, 3 * config.traffic.flush_interval_seconds)
    return await read_evidence(live.conn, since, stale_after_seconds=stale)


async def _enrich(
    result: FileResult, live: Live, traffic: Evidence | None, options: Options
) -> None:
    script = result.script
    facts = result.facts
    if facts is None:
        result.findings = _judge(script, result.findings, options)
        return
    findings = result.findings
    if traffic is not None:
        extra, answered = contract.traffic_findings(script, facts, traffic, options.search_path)
        findings = [f for f in findings if not _answered(f, answered)] + extra
        for finding in findings:
            gaps = answered.get(finding.statement) if finding.statement is not None else None
            if gaps and finding.rule in contract.ANSWERED_BY_EVIDENCE:
                finding.evidence.append("traffic evidence incomplete: " + "; ".join(gaps))
    else:
        for finding in findings:
            if finding.rule in contract.ANSWERED_BY_EVIDENCE:
                finding.evidence.append(
                    "no traffic evidence: the control schema has no traffic tables "
                    "(run `dualwrite setup`)"
                )
    findings += await _database(script, facts, findings, live)
    result.findings = _judge(script, findings, options)


def _answered(finding: Finding, answered: dict[int, list[str]]) -> bool:
    return (
        finding.rule in contract.ANSWERED_BY_EVIDENCE
        and finding.statement is not None
        and answered.get(finding.statement) == []
    )


async def _database(
    script: Script, facts: list[Facts], findings: list[Finding], live: Live
) -> list[Finding]:
    """Size and predicted duration on each finding; a lock-queue finding where a statement
    would wait behind open transactions now."""
    by_statement: dict[int, list[Finding]] = {}
    for finding in findings:
        if finding.statement is not None:
            by_statement.setdefault(finding.statement, []).append(finding)
    context = Context(script, facts)
    created: set[tuple[str | None, str]] = set()
    for statement, fact in zip(script.statements, facts, strict=True):
        mine = by_statement.get(statement.index, [])
        relation = fact.relation
        if relation is not None and (relation.schema, relation.name) not in created:
            table = await live.table(relation)
            if table is not None:
                text = live.describe(fact, table)
                for finding in mine:
                    finding.evidence.insert(0, text)
                mode = fact.locks.get(relation) or fact.lock
                if mode is not None:
                    blockers = await live.blockers(table, mode)
                    for finding in mine if blockers else ():
                        finding.evidence.append(
                            "would queue now behind " + "; ".join(str(b) for b in blockers)
                        )
                    if blockers:
                        context.add(
                            LOCK_QUEUE,
                            statement,
                            f"{mode} on {table} would wait for {len(blockers)} session"
                            f"{'s' if len(blockers) != 1 else ''} holding conflicting locks now",
                        )
                        context.findings[-1].evidence = [str(b) for b in blockers] + [text]
        for made in fact.creates:
            created |= {(made.schema, made.name), (None, made.name)}
    return context.findings


def lint_offline(paths: Sequence[str], options: Options) -> LintResult:
    results = lint_files(paths, options)
    for result in results:
        result.findings = _judge(result.script, result.findings, options)
    return LintResult(results, options, squawk.version(squawk.squawk_binary()))
