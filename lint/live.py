"""``dualwrite lint --live``: what the database says about each statement right now.

For the table a statement locks: its size and row estimate, the lock mode and the predicted
duration of the work done under it (at the rates in ``lint.live``), and the transactions
holding a conflicting lock at this moment, which the statement would queue behind. The
session is read-only and sets the configured ``search_path``, so names resolve as the
application's do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import asyncpg

from core.config import Config, LintLiveConfig
from core.connect import connect as connect_database
from core.errors import DatabaseUnreachable
from core.sqltext import quote_ident
from lint.facts import INDEX, REWRITE, ROWS, SCAN, Facts, Relation, blocks_reads, blocks_writes

#: pg_locks' mode names
_PG_LOCK_NAMES = {
    "AccessShareLock": "ACCESS SHARE",
    "RowShareLock": "ROW SHARE",
    "RowExclusiveLock": "ROW EXCLUSIVE",
    "ShareUpdateExclusiveLock": "SHARE UPDATE EXCLUSIVE",
    "ShareLock": "SHARE",
    "ShareRowExclusiveLock": "SHARE ROW EXCLUSIVE",
    "ExclusiveLock": "EXCLUSIVE",
    "AccessExclusiveLock": "ACCESS EXCLUSIVE",
}
#: PostgreSQL's lock conflict table (explicit-locking.html, table 13.2)
CONFLICTS: dict[str, frozenset[str]] = {
    "ACCESS SHARE": frozenset({"ACCESS EXCLUSIVE"}),
    "ROW SHARE": frozenset({"EXCLUSIVE", "ACCESS EXCLUSIVE"}),
    "ROW EXCLUSIVE": frozenset({"SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"}),
    "SHARE UPDATE EXCLUSIVE": frozenset(
        {"SHARE UPDATE EXCLUSIVE", "SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"}
    ),
    "SHARE": frozenset(
        {
            "ROW EXCLUSIVE",
            "SHARE UPDATE EXCLUSIVE",
            "SHARE ROW EXCLUSIVE",
            "EXCLUSIVE",
            "ACCESS EXCLUSIVE",
        }
    ),
    "SHARE ROW EXCLUSIVE": frozenset(
        {
            "ROW EXCLUSIVE",
            "SHARE UPDATE EXCLUSIVE",
            "SHARE",
            "SHARE ROW EXCLUSIVE",
            "EXCLUSIVE",
            "ACCESS EXCLUSIVE",
        }
    ),
    "EXCLUSIVE": frozenset(
        {
            "ROW SHARE",
            "ROW EXCLUSIVE",
            "SHARE UPDATE EXCLUSIVE",
            "SHARE",
            "SHARE ROW EXCLUSIVE",
            "EXCLUSIVE",
            "ACCESS EXCLUSIVE",
        }
    ),
    "ACCESS EXCLUSIVE": frozenset(_PG_LOCK_NAMES.values()),
}


@dataclass(frozen=True)
class Table:
    """A relation as the live database has it."""

    oid: int
    schema: str
    name: str
    kind: str
    heap_bytes: int
    total_bytes: int
    rows: float

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True)
class Blocker:
    """A session holding a lock that conflicts with the statement's."""

    pid: int
    mode: str
    application: str
    state: str
    transaction_age: timedelta | None

    def __str__(self) -> str:
        age = (
            f"transaction open {_duration(self.transaction_age.total_seconds())}"
            if self.transaction_age is not None
            else "no transaction"
        )
        app = f"{self.application!r}, " if self.application else ""
        return f"pid {self.pid} ({app}{self.state or 'unknown state'}, {age}, holds {self.mode})"


@dataclass
class Live:
    """A read-only session on the service database and what it has looked up."""

    conn: asyncpg.Connection
    settings: LintLiveConfig
    server_version: int
    tables: dict[Relation, Table | None] = field(default_factory=dict)

    async def table(self, relation: Relation) -> Table | None:
        if relation not in self.tables:
            self.tables[relation] = await _lookup(self.conn, relation)
        return self.tables[relation]

    async def blockers(self, table: Table, mode: str) -> list[Blocker]:
        rows = await self.conn.fetch(
            "SELECT l.pid, l.mode, a.application_name, a.state, now() - a.xact_start AS age "
            "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'relation' AND l.relation = $1 AND l.granted "
            "AND l.pid <> pg_backend_pid() ORDER BY a.xact_start NULLS LAST, l.pid",
            table.oid,
        )
        conflicting = CONFLICTS[mode]
        found: dict[int, Blocker] = {}
        for row in rows:
            held = _PG_LOCK_NAMES.get(row["mode"], row["mode"])
            if held in conflicting and row["pid"] not in found:
                found[row["pid"]] = Blocker(
                    row["pid"],
                    held,
                    row["application_name"] or "",
                    row["state"] or "",
                    row["age"],
                )
        return list(found.values())[: self.settings.max_blockers]

    def describe(self, facts: Facts, table: Table) -> str:
        """Size, lock and predicted duration of a statement's work on ``table``."""
        size = (
            f"{table}: {_bytes(table.heap_bytes)} heap, {_bytes(table.total_bytes)} with "
            f"indexes, ~{_count(table.rows)} rows"
        )
        lock = facts.locks.get(facts.relation) if facts.relation else None
        lock = lock or facts.lock
        effect = (
            "blocks reads and writes"
            if blocks_reads(lock)
            else "blocks writes"
            if blocks_writes(lock)
            else "reads and writes continue"
        )
        work = facts.work
        if work is None:
            return f"{size}; {lock or 'no'} lock ({effect}), no per-row work"
        rate, setting, measured = self._rate(work, table)
        seconds = measured / (rate * 1024 * 1024) if rate else 0.0
        verb = {REWRITE: "rewrites", SCAN: "scans", INDEX: "indexes", ROWS: "writes every row of"}
        return (
            f"{size}; {verb[work]} it under {lock} ({effect}): ~{_duration(seconds)} at "
            f"lint.live.{setting}={rate:g}"
        )

    def _rate(self, work: str, table: Table) -> tuple[float, str, int]:
        settings = self.settings
        if work == SCAN:
            return settings.scan_mb_per_second, "scan_mb_per_second", table.heap_bytes
        if work == INDEX:
            return settings.index_mb_per_second, "index_mb_per_second", table.heap_bytes
        return settings.rewrite_mb_per_second, "rewrite_mb_per_second", table.total_bytes


async def connect(config: Config) -> Live:
    """A read-only session on ``service_dsn`` with the configured search_path."""
    dsn = config.effective_service_dsn()
    try:
        conn = await connect_database(
            dsn,
            timeout=config.upstream.connect_timeout_seconds,
            server_settings={
                "application_name": "dualwrite-lint",
                "default_transaction_read_only": "on",
                "search_path": ", ".join(quote_ident(s) for s in config.search_path),
            },
        )
    except DatabaseUnreachable as exc:
        raise DatabaseUnreachable(f"service_dsn: --live {exc}") from None
    version = int(await conn.fetchval("SHOW server_version_num")) // 10000
    return Live(conn, config.lint.live, version)


async def _lookup(conn: asyncpg.Connection, relation: Relation) -> Table | None:
    """The table named (an index resolves to its table); None when it does not exist."""
    name = (
        f"{quote_ident(relation.schema)}.{quote_ident(relation.name)}"
        if relation.schema
        else quote_ident(relation.name)
    )
    row = await conn.fetchrow(
        "SELECT c.oid, n.nspname, c.relname, c.relkind, pg_relation_size(c.oid) AS heap, "
        "pg_total_relation_size(c.oid) AS total, greatest(c.reltuples, 0) AS rows "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = coalesce((SELECT indrelid FROM pg_index WHERE indexrelid = "
        "to_regclass($1)), to_regclass($1))",
        name,
    )
    if row is None:
        return None
    return Table(
        int(row["oid"]),
        row["nspname"],
        row["relname"],
        row["relkind"],
        int(row["heap"]),
        int(row["total"]),
        float(row["rows"]),
    )


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "<1 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
