"""The contract step checked against what only dualwrite knows: the mappings that still read or
write the old schema, and the statements the application ran through the sidecars."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.mapping import CompiledMapping
from core.traffic import Evidence, SeenStatement
from lint.facts import Facts, Relation
from lint.findings import Finding
from lint.rules import MAPPING_STILL_USES, TRAFFIC_STILL_REFERENCES, TRAFFIC_UNREFERENCED
from lint.script import Script

#: squawk's warnings that traffic evidence answers either way
ANSWERED_BY_EVIDENCE = frozenset(
    {"ban-drop-column", "ban-drop-table", "renaming-column", "renaming-table"}
)
#: fingerprints named per finding
MAX_FINGERPRINTS = 5


@dataclass(frozen=True)
class Removal:
    """Something a contract statement takes away from running code."""

    relation: Relation
    #: None: the whole relation
    column: str | None
    verb: str

    def __str__(self) -> str:
        return f"{self.relation}.{self.column}" if self.column else str(self.relation)


def removals(facts: Facts) -> list[Removal]:
    found = [Removal(r, None, "drops") for r in facts.drops_tables]
    found += [Removal(r, None, "renames") for r, _ in facts.renames_tables]
    found += [Removal(r, c, "drops") for r, c in facts.drops_columns]
    found += [Removal(r, c, "renames") for r, c, _ in facts.renames_columns]
    found += [Removal(r, c, "changes the type of") for r, c in facts.type_changes]
    return found


def _same(relation: Relation, schema: str | None, name: str, schemas: Sequence[str]) -> bool:
    """Names written two ways denote one table: an unqualified name is any search-path schema."""
    if relation.name != name:
        return False
    if relation.schema is None or schema is None:
        other = relation.schema if relation.schema is not None else schema
        return other is None or other in schemas
    return relation.schema == schema


def mapping_findings(
    script: Script,
    facts: list[Facts],
    mappings: Sequence[CompiledMapping],
    schemas: Sequence[str],
) -> list[Finding]:
    """A removal of a mapping's source or target, or of a column it reads or writes: an error."""
    findings = []
    for statement, fact in zip(script.statements, facts, strict=True):
        for removal in removals(fact):
            for mapping in mappings:
                reason = _mapping_use(removal, mapping, schemas)
                if reason is None:
                    continue
                findings.append(
                    Finding(
                        rule=MAPPING_STILL_USES.id,
                        severity=MAPPING_STILL_USES.severity,
                        path=script.path,
                        line=statement.line,
                        end_line=statement.end_line,
                        message=f"{removal.verb} {removal}, which mapping {mapping.name} {reason}",
                        why=MAPPING_STILL_USES.why,
                        fix=MAPPING_STILL_USES.fix,
                        statement=statement.index,
                    )
                )
    return findings


def _mapping_use(removal: Removal, mapping: CompiledMapping, schemas: Sequence[str]) -> str | None:
    """How the mapping uses what is removed (None: it does not)."""
    relation, column = removal.relation, removal.column
    if _same(relation, mapping.source_schema, mapping.source_name, schemas):
        if column is None:
            return f"reads (its source, {mapping.config.source})"
        if column in mapping.mentioned:
            where = [
                f"columns.{target}"
                for target, expr in mapping.expressions.items()
                if column in expr.column_names
            ]
            if mapping.filter is not None and column in mapping.filter.column_names:
                where.append("filter")
            return f"reads ({', '.join(where)})"
    if _same(relation, mapping.target_schema, mapping.target_name, schemas):
        if column is None:
            return f"writes (its target, {mapping.config.target})"
        if column in mapping.columns:
            return f"writes (columns.{column})"
    return None


def traffic_findings(
    script: Script, facts: list[Facts], evidence: Evidence, schemas: Sequence[str]
) -> tuple[list[Finding], dict[int, list[str]]]:
    """Errors for removals the traffic still uses, evidence notes for the rest.

    Returns the findings and, per statement index, either an empty list (the evidence is
    complete and nothing used what it removes: squawk's warnings about it are answered) or
    the gaps that keep the evidence from being complete.
    """
    findings: list[Finding] = []
    answered: dict[int, list[str]] = {}
    gaps = evidence.gaps
    for statement, fact in zip(script.statements, facts, strict=True):
        statement_removals = removals(fact)
        if not statement_removals:
            continue
        unused = []
        for removal in statement_removals:
            users = list(
                evidence.referencing(
                    removal.relation.schema,
                    removal.relation.name,
                    removal.column,
                    schemas=schemas,
                )
            )
            if users:
                findings.append(
                    _still_used(script, statement.index, statement.line, removal, users, evidence)
                )
            else:
                unused.append(removal)
        if len(unused) != len(statement_removals):
            continue
        answered[statement.index] = list(gaps)
        if gaps:
            continue
        names = ", ".join(str(r) for r in unused)
        findings.append(
            Finding(
                rule=TRAFFIC_UNREFERENCED.id,
                severity=TRAFFIC_UNREFERENCED.severity,
                path=script.path,
                line=statement.line,
                end_line=statement.end_line,
                message=(
                    f"no application statement referenced {names} since "
                    f"{evidence.since:%Y-%m-%d %H:%M %Z} ({len(evidence.statements)} statement "
                    "shapes seen in the window)"
                ),
                why=TRAFFIC_UNREFERENCED.why,
                fix=TRAFFIC_UNREFERENCED.fix,
                statement=statement.index,
                evidence=[_coverage(evidence)],
            )
        )
    return findings, answered


def _still_used(
    script: Script,
    index: int,
    line: int,
    removal: Removal,
    users: list[SeenStatement],
    evidence: Evidence,
) -> Finding:
    listed = [
        f"fingerprint {u.fingerprint} ({u.kind}, {u.calls} calls, last seen "
        f"{u.last_seen:%Y-%m-%d %H:%M:%S %Z})"
        for u in users[:MAX_FINGERPRINTS]
    ]
    more = len(users) - len(listed)
    return Finding(
        rule=TRAFFIC_STILL_REFERENCES.id,
        severity=TRAFFIC_STILL_REFERENCES.severity,
        path=script.path,
        line=line,
        message=(
            f"{removal.verb} {removal}, used by {len(users)} statement shape"
            f"{'s' if len(users) != 1 else ''} since {evidence.since:%Y-%m-%d %H:%M %Z}"
        ),
        why=TRAFFIC_STILL_REFERENCES.why,
        fix=TRAFFIC_STILL_REFERENCES.fix,
        statement=index,
        evidence=listed + ([f"and {more} more"] if more > 0 else []) + [_coverage(evidence)],
    )


def _coverage(evidence: Evidence) -> str:
    since = evidence.recording_since
    until = evidence.recorded_until
    return (
        "traffic recorded by the sidecars from "
        f"{since:%Y-%m-%d %H:%M %Z} to {until:%Y-%m-%d %H:%M %Z}"
        if since is not None and until is not None
        else "no traffic recorded"
    )
