"""Traffic evidence: which relations and columns application statements reference, per fingerprint.

The sidecar analyses the statements it relays (off its hot path, see proxy/traffic.py) with
:func:`analyse`, keeps what it saw in a :class:`TrafficLog` and writes it to the control schema
with :func:`flush`; ``dualwrite lint`` and ``dualwrite report`` read it back with
:func:`read_evidence`. Only names are stored (relations, columns, the statement kind and
PostgreSQL's fingerprint of the statement's shape), never a literal value.

Attribution is conservative, because a missed reference would let a contract step drop a
column the application still reads: an unqualified column is attributed to every relation
the statement names, and ``*`` (or a whole-row reference) to every column of its relation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from pglast import ast
from pglast.parser import ParseError, fingerprint, parse_sql

#: the column name that stands for "every column of the relation"
ALL_COLUMNS = "*"


@dataclass(frozen=True)
class Reference:
    """One relation a statement names, and the columns of it the statement may touch."""

    #: the schema as written in the statement; None when unqualified
    schema: str | None
    relation: str
    columns: frozenset[str] = frozenset()

    def touches(self, column: str) -> bool:
        return column in self.columns or ALL_COLUMNS in self.columns

    def as_json(self) -> dict[str, Any]:
        return {"schema": self.schema, "relation": self.relation, "columns": sorted(self.columns)}

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> Reference:
        return Reference(data.get("schema"), str(data["relation"]), frozenset(data["columns"]))


@dataclass(frozen=True)
class StatementShape:
    """What one statement references, under PostgreSQL's fingerprint of its shape."""

    fingerprint: str
    #: the parse node of the statement, e.g. SelectStmt, UpdateStmt
    kind: str
    references: tuple[Reference, ...]


def analyse(sql: str) -> list[StatementShape]:
    """Every statement in ``sql`` with its fingerprint and references ([] if it does not parse)."""
    try:
        raw = parse_sql(sql)
    except ParseError:
        return []
    shapes = []
    for statement in raw:
        if statement.stmt is None:
            continue
        start = statement.stmt_location or 0
        text = sql[start : start + statement.stmt_len] if statement.stmt_len else sql[start:]
        try:
            print_ = fingerprint(text)
        except ParseError:
            continue
        shapes.append(
            StatementShape(print_, type(statement.stmt).__name__, references(statement.stmt))
        )
    return shapes


def references(node: ast.Node) -> tuple[Reference, ...]:
    """The relations one parsed statement names and the columns it may touch in each."""
    walk = _Walk()
    walk.visit(node)
    return walk.result()


@dataclass
class _Relation:
    schema: str | None
    name: str
    alias: str | None
    columns: set[str] = field(default_factory=set)


class _Walk:
    """Collects relations (RangeVar), qualified and unqualified column names, in one pass."""

    def __init__(self) -> None:
        self.relations: list[_Relation] = []
        self.ctes: set[str] = set()
        #: column references qualified by a name: (qualifier, column)
        self.qualified: list[tuple[str, str]] = []
        #: unqualified column names (attributed to every relation)
        self.bare: set[str] = set()
        #: the target of INSERT ... ON CONFLICT, which ``excluded.<column>`` refers to
        self.excluded: _Relation | None = None

    def visit(self, node: Any) -> None:
        if isinstance(node, tuple | list):
            for item in node:
                self.visit(item)
            return
        if not isinstance(node, ast.Node):
            return
        handler = getattr(self, f"_{type(node).__name__}", None)
        if handler is not None and handler(node):
            return
        for name in node:
            self.visit(getattr(node, name))

    # --- nodes that need more than the generic walk (True: children already done) ----------

    def _CommonTableExpr(self, node: ast.CommonTableExpr) -> bool:
        if node.ctename:
            self.ctes.add(node.ctename)
        return False

    def _RangeVar(self, node: ast.RangeVar) -> bool:
        alias = node.alias.aliasname if node.alias is not None else None
        self.relations.append(_Relation(node.schemaname or None, node.relname or "", alias))
        return True

    def _ColumnRef(self, node: ast.ColumnRef) -> bool:
        names = [
            (f.sval or "") if isinstance(f, ast.String) else ALL_COLUMNS for f in node.fields or ()
        ]
        if len(names) == 1:
            self.bare.add(names[0])
        elif len(names) >= 2:
            self.qualified.append((names[-2], names[-1]))
        return True

    def _InsertStmt(self, node: ast.InsertStmt) -> bool:
        target = node.relation
        assert target is not None
        self._RangeVar(target)
        relation = self.relations[-1]
        if node.cols:
            relation.columns.update(str(c.name) for c in node.cols if c.name)
        else:
            relation.columns.add(ALL_COLUMNS)
        conflict = node.onConflictClause
        if conflict is not None:
            self.excluded = relation
            relation.columns.update(
                t.name for t in conflict.targetList or () if isinstance(t, ast.ResTarget) and t.name
            )
        for name in ("selectStmt", "onConflictClause", "returningList", "returningClause"):
            self.visit(getattr(node, name, None))
        self.visit(node.withClause)
        return True

    def _UpdateStmt(self, node: ast.UpdateStmt) -> bool:
        target = node.relation
        assert target is not None
        self._RangeVar(target)
        relation = self.relations[-1]
        for item in node.targetList or ():
            if isinstance(item, ast.ResTarget):
                if item.name:
                    relation.columns.add(item.name)
                self.visit(item.val)
        for name in ("whereClause", "fromClause", "returningList", "returningClause", "withClause"):
            self.visit(getattr(node, name, None))
        return True

    def _CopyStmt(self, node: ast.CopyStmt) -> bool:
        if node.relation is not None:
            self._RangeVar(node.relation)
            relation = self.relations[-1]
            if node.attlist:
                relation.columns.update(
                    a.sval for a in node.attlist if isinstance(a, ast.String) and a.sval
                )
            else:
                relation.columns.add(ALL_COLUMNS)
        self.visit(node.query)
        return True

    def _IndexElem(self, node: ast.IndexElem) -> bool:
        if node.name:
            self.bare.add(node.name)
        self.visit(node.expr)
        return True

    def _JoinExpr(self, node: ast.JoinExpr) -> bool:
        for name in node.usingClause or ():
            if isinstance(name, ast.String) and name.sval:
                self.bare.add(name.sval)
        self.visit(node.larg)
        self.visit(node.rarg)
        self.visit(node.quals)
        return True

    # --- attribution ------------------------------------------------------------------------

    def result(self) -> tuple[Reference, ...]:
        tables = [r for r in self.relations if r.schema is not None or r.name not in self.ctes]
        by_qualifier: dict[str, list[_Relation]] = {}
        for relation in tables:
            by_qualifier.setdefault(relation.alias or relation.name, []).append(relation)
        if self.excluded is not None:
            by_qualifier.setdefault("excluded", []).append(self.excluded)
        for qualifier, column in self.qualified:
            for relation in by_qualifier.get(qualifier, ()):
                relation.columns.add(column)
        for name in self.bare:
            whole_rows = by_qualifier.get(name)
            if whole_rows:  # a whole-row reference: row_to_json(t)
                for relation in whole_rows:
                    relation.columns.add(ALL_COLUMNS)
                continue
            for relation in tables:
                relation.columns.add(name)
        merged: dict[tuple[str | None, str], set[str]] = {}
        for relation in tables:
            merged.setdefault((relation.schema, relation.name), set()).update(relation.columns)
        found = [Reference(s, n, frozenset(cols)) for (s, n), cols in merged.items()]
        return tuple(sorted(found, key=lambda r: (r.schema or "", r.relation)))


# --- what a sidecar saw, and writing it ------------------------------------------------------


@dataclass
class Seen:
    """One fingerprint seen since the last flush."""

    shape: StatementShape
    calls: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0


@dataclass
class TrafficLog:
    """What the sidecar saw since its last flush, and the counts that qualify the evidence."""

    sidecar: str
    seen: dict[str, Seen] = field(default_factory=dict)
    #: statements the analyser never looked at (queue full) since the last flush
    dropped: int = 0
    last_dropped_at: float | None = None

    def saw(self, shape: StatementShape, calls: int = 1, at: float | None = None) -> None:
        now = time.time() if at is None else at
        entry = self.seen.get(shape.fingerprint)
        if entry is None:
            self.seen[shape.fingerprint] = Seen(shape, calls, now, now)
        else:
            entry.calls += calls
            entry.last_seen = max(entry.last_seen, now)

    def drop(self, count: int = 1) -> None:
        self.dropped += count
        self.last_dropped_at = time.time()

    def take(self) -> TrafficLog:
        """Hand over what was collected and start afresh (put it back if the flush fails)."""
        taken = TrafficLog(self.sidecar, self.seen, self.dropped, self.last_dropped_at)
        self.seen, self.dropped, self.last_dropped_at = {}, 0, None
        return taken

    def put_back(self, taken: TrafficLog) -> None:
        for entry in taken.seen.values():
            mine = self.seen.get(entry.shape.fingerprint)
            if mine is None:
                self.seen[entry.shape.fingerprint] = entry
            else:
                mine.calls += entry.calls
                mine.first_seen = min(mine.first_seen, entry.first_seen)
                mine.last_seen = max(mine.last_seen, entry.last_seen)
        self.dropped += taken.dropped
        if taken.last_dropped_at is not None:
            self.last_dropped_at = max(self.last_dropped_at or 0.0, taken.last_dropped_at)


_UPSERT = """
INSERT INTO dualwrite.traffic_statements
    (fingerprint, kind, refs, calls, first_seen, last_seen)
VALUES ($1, $2, $3::jsonb, $4, to_timestamp($5), to_timestamp($6))
ON CONFLICT (fingerprint) DO UPDATE SET
    kind = EXCLUDED.kind,
    refs = EXCLUDED.refs,
    calls = dualwrite.traffic_statements.calls + EXCLUDED.calls,
    first_seen = least(dualwrite.traffic_statements.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(dualwrite.traffic_statements.last_seen, EXCLUDED.last_seen)
"""

# The least recently seen rows beyond the cap go; how recent the newest of them was is kept,
# because evidence of absence is only as old as the last eviction.
_EVICT = """
WITH doomed AS (
    SELECT fingerprint FROM dualwrite.traffic_statements
    ORDER BY last_seen DESC, fingerprint OFFSET $1
), gone AS (
    DELETE FROM dualwrite.traffic_statements t USING doomed d
    WHERE t.fingerprint = d.fingerprint RETURNING t.last_seen
)
SELECT count(*) AS n, max(last_seen) AS newest FROM gone
"""

_RECORDER = """
INSERT INTO dualwrite.traffic_recorders AS r
    (sidecar, started_at, last_flush_at, statements, dropped, last_dropped_at, evicted_through)
VALUES ($1, to_timestamp($2), now(), $3, $4, to_timestamp($5), $6)
ON CONFLICT (sidecar) DO UPDATE SET
    last_flush_at = now(),
    statements = r.statements + EXCLUDED.statements,
    dropped = r.dropped + EXCLUDED.dropped,
    last_dropped_at = greatest(r.last_dropped_at, EXCLUDED.last_dropped_at),
    evicted_through = greatest(r.evicted_through, EXCLUDED.evicted_through)
"""


async def flush(
    conn: asyncpg.Connection, log: TrafficLog, *, started_at: float, max_fingerprints: int
) -> int:
    """Write what ``log`` holds (one transaction) and evict beyond the cap; rows evicted."""
    rows = [
        (
            entry.shape.fingerprint,
            entry.shape.kind,
            json.dumps([r.as_json() for r in entry.shape.references]),
            entry.calls,
            entry.first_seen,
            entry.last_seen,
        )
        for entry in log.seen.values()
    ]
    async with conn.transaction():
        if rows:
            await conn.executemany(_UPSERT, rows)
        evicted = await conn.fetchrow(_EVICT, max_fingerprints)
        await conn.execute(
            _RECORDER,
            log.sidecar,
            started_at,
            sum(e.calls for e in log.seen.values()),
            log.dropped,
            log.last_dropped_at,
            evicted["newest"],
        )
    return int(evicted["n"])


# --- reading it back ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenStatement:
    """A fingerprint as the control schema holds it."""

    fingerprint: str
    kind: str
    references: tuple[Reference, ...]
    calls: int
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class Evidence:
    """Traffic seen in [since, now], with what limits the evidence of absence."""

    since: datetime
    now: datetime
    statements: tuple[SeenStatement, ...]
    #: when the earliest recording sidecar started (None: nothing was ever recorded)
    recording_since: datetime | None
    #: the latest flush of any sidecar (traffic after it has not been seen)
    recorded_until: datetime | None
    #: statements not analysed (queue full) by sidecars that dropped some after ``since``
    dropped: int
    #: rows evicted by the cap were last seen up to here
    evicted_through: datetime | None
    #: a last flush older than this means the sidecars stopped recording
    stale_after_seconds: float = 3 * 60.0

    @property
    def gaps(self) -> list[str]:
        """Why the absence of a reference in this evidence does not prove no use (empty: it
        does, for the window)."""
        gaps = []
        if self.recording_since is None:
            return ["no sidecar has recorded traffic (traffic.enabled, mappings configured)"]
        if self.recording_since > self.since:
            gaps.append(f"traffic has been recorded only since {_minute(self.recording_since)}")
        quiet = (self.now - self.recorded_until).total_seconds() if self.recorded_until else 0
        if quiet > self.stale_after_seconds:
            gaps.append(f"no sidecar has recorded since {_minute(self.recorded_until)}")
        if self.dropped:
            gaps.append(f"{self.dropped} statements were not analysed (traffic.queue_size reached)")
        if self.evicted_through is not None and self.evicted_through >= self.since:
            gaps.append(
                f"fingerprints last seen up to {_minute(self.evicted_through)} were evicted "
                "(traffic.max_fingerprints reached)"
            )
        return gaps

    def referencing(
        self, schema: str | None, relation: str, column: str | None, *, schemas: Sequence[str]
    ) -> Iterator[SeenStatement]:
        """Statements that reference the relation (and column, when given). An unqualified
        reference matches a relation in any of ``schemas`` (the search path)."""
        for statement in self.statements:
            for ref in statement.references:
                if ref.relation != relation:
                    continue
                if ref.schema is not None and schema is not None and ref.schema != schema:
                    continue
                if ref.schema is None and schema is not None and schema not in schemas:
                    continue
                if column is None or ref.touches(column):
                    yield statement
                    break


async def has_traffic_tables(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval("SELECT to_regclass('dualwrite.traffic_statements') IS NOT NULL")
    )


def _minute(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M %Z}".strip() if value is not None else "-"


async def read_evidence(
    conn: asyncpg.Connection, since: datetime, *, stale_after_seconds: float = 180.0
) -> Evidence:
    """Everything recorded about statements last seen at or after ``since``."""
    now = await conn.fetchval("SELECT now()")
    rows = await conn.fetch(
        "SELECT fingerprint, kind, refs, calls, first_seen, last_seen "
        "FROM dualwrite.traffic_statements WHERE last_seen >= $1 ORDER BY last_seen DESC",
        since,
    )
    meta = await conn.fetchrow(
        "SELECT min(started_at) AS recording_since, max(last_flush_at) AS recorded_until, "
        "coalesce(sum(dropped) FILTER (WHERE last_dropped_at >= $1), 0) AS dropped, "
        "max(evicted_through) AS evicted_through FROM dualwrite.traffic_recorders",
        since,
    )
    statements = tuple(
        SeenStatement(
            r["fingerprint"],
            r["kind"],
            tuple(Reference.from_json(x) for x in json.loads(r["refs"])),
            int(r["calls"]),
            r["first_seen"],
            r["last_seen"],
        )
        for r in rows
    )
    return Evidence(
        since=since,
        now=now,
        statements=statements,
        recording_since=meta["recording_since"],
        recorded_until=meta["recorded_until"],
        dropped=int(meta["dropped"]),
        evicted_through=meta["evicted_through"],
        stale_after_seconds=stale_after_seconds,
    )
