"""Business invariants (config ``invariants:``): checked group by group, recorded, exported.

A ``compare`` invariant runs its ``old`` and ``new`` SELECTs, each returning ``(group...,
value...)`` rows, and a group fails when it is missing on one side or its values differ. A
``new_only`` invariant runs ``new`` alone and every row it returns is a failing group.

Neither query ever runs whole: each is wrapped as ``SELECT * FROM (<query>) q WHERE (q.g...) >
(last group seen) ORDER BY q.g... LIMIT chunk_groups``. PostgreSQL pushes a condition on
grouping columns down into a GROUP BY subquery, so each chunk aggregates only the rows of its
groups (with an index on the grouping columns it also stops after its groups). The old side
decides each chunk's range, the new side is read in pages over the same range, and when both
live in one database both are read in one repeatable-read snapshot. Every statement runs under
the invariant's own ``statement_timeout_ms``.

Failing groups are re-checked one by one after ``reconcile.recheck_delay_seconds`` (an outbox
mapping's target lags its source), and only groups that still fail count. Groups compare by
equality only, never by order, so collations never matter.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import time as clock_time
from decimal import Decimal
from typing import Any
from uuid import UUID

import asyncpg

from compare.connections import connect, session_settings
from core import metrics
from core.config import Config, InvariantConfig, MappingConfig
from core.errors import ConfigError, DatabaseUnreachable
from core.logs import get_logger
from core.sqltext import quote_ident

_log = get_logger("invariants")

#: failing groups written to dualwrite.invariant_failures per check (the count is exact)
MAX_RECORDED_GROUPS = 1000
#: failing groups re-checked one by one; beyond it the rest count as confirmed
MAX_RECHECKED_GROUPS = 1000

Group = tuple[Any, ...]
Values = tuple[Any, ...]

_START = """
INSERT INTO dualwrite.invariant_runs (invariant, mapping, kind, tenant, sidecar, requested_by)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id
"""
_FINISH = """
UPDATE dualwrite.invariant_runs
SET status = $2, finished_at = now(), groups_checked = $3, groups_failed = $4,
    by_tenant = $5::jsonb, error = $6, value_columns = $7
WHERE id = $1
"""
_FAILURE = """
INSERT INTO dualwrite.invariant_failures (run_id, invariant, grp, tenant, old_values, new_values)
VALUES ($1, $2, $3::jsonb, $4, $5::jsonb, $6::jsonb)
"""
_LATEST_FULL = """
SELECT DISTINCT ON (invariant) invariant, finished_at, groups_failed
FROM dualwrite.invariant_runs
WHERE status = 'done' AND tenant IS NULL AND invariant = ANY($1::text[])
ORDER BY invariant, finished_at DESC, id DESC
"""


@dataclass(frozen=True)
class Failure:
    """One group that broke the invariant (``old``/``new`` None: absent on that side)."""

    group: Group
    old: Values | None
    new: Values | None
    tenant: str | None = None


@dataclass
class InvariantResult:
    invariant: str
    mapping: str | None
    kind: str
    #: the invariant's group column names, in order
    group_columns: list[str] = field(default_factory=list)
    #: the names of the value columns (of the new query), as first read
    value_columns: list[str] = field(default_factory=list)
    #: done, failed (the check could not finish: timeout, SQL error)
    status: str = "done"
    tenant: str | None = None
    groups_checked: int = 0
    #: confirmed failing groups (exact count)
    groups_failed: int = 0
    #: the first MAX_RECORDED_GROUPS of them
    failures: list[Failure] = field(default_factory=list)
    by_tenant: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None
    run_id: int | None = None

    @property
    def held(self) -> bool:
        return self.status == "done" and self.groups_failed == 0


@dataclass(frozen=True)
class CheckOptions:
    tenant: str | None = None
    requested_by: str | None = None
    sidecar: str | None = None


@dataclass(frozen=True)
class Scoped:
    """An invariant and the mapping that declares it (None: migration-level)."""

    invariant: InvariantConfig
    mapping: MappingConfig | None = None


def invariants_to_check(
    config: Config, mappings: Sequence[str] | None, tenant: str | None
) -> list[Scoped]:
    """The invariants a reconcile run checks: the chosen mappings' (all mappings and the
    migration's when ``mappings`` is None); with a tenant only those naming a tenant column."""
    chosen: list[Scoped] = []
    if mappings is None:
        chosen += [Scoped(i) for i in config.invariants]
    for mapping in config.mappings:
        if mappings is None or mapping.name in mappings:
            chosen += [Scoped(i, mapping) for i in mapping.invariants]
    if tenant is not None:
        chosen = [s for s in chosen if s.invariant.tenant is not None]
    return chosen


async def check_all(
    config: Config, scoped: Sequence[Scoped], options: CheckOptions
) -> list[InvariantResult]:
    return [await check_invariant(config, s, options) for s in scoped]


async def check_invariant(
    config: Config, scoped: Scoped, options: CheckOptions
) -> InvariantResult:
    """Check one invariant end to end; the outcome is recorded and exported, never raised
    (a check that cannot run is a ``failed`` result with its error)."""
    inv = scoped.invariant
    result = InvariantResult(
        inv.name,
        scoped.mapping.name if scoped.mapping else None,
        inv.kind,
        group_columns=list(inv.group),
        tenant=options.tenant,
    )
    started = time.monotonic()
    control = await connect(
        config.effective_service_dsn(),
        session_settings(config, read_only=False, role="invariants"),
        "service_dsn",
    )
    try:
        result.run_id = int(
            await control.fetchval(
                _START,
                inv.name,
                result.mapping,
                inv.kind,
                options.tenant,
                options.sidecar,
                options.requested_by,
            )
        )
        try:
            async with _reader_sessions(config, scoped) as (old, new):
                checker = _Checker(inv, old, new, options.tenant)
                result.value_columns = await checker.value_columns()
                await checker.scan(result)
                if result.failures or result.groups_failed:
                    await asyncio.sleep(config.reconcile.recheck_delay_seconds)
                    await checker.recheck(result)
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            OSError,
            ValueError,
            DatabaseUnreachable,
        ) as exc:
            result.status = "failed"
            result.error = f"{type(exc).__name__}: {exc}"
            _log.warning("invariant_check_failed", invariant=inv.name, error=result.error)
        result.seconds = time.monotonic() - started
        await _record(control, result)
    finally:
        await control.close()
    _export(result)
    _log.info(
        "invariant_checked",
        invariant=inv.name,
        mapping=result.mapping,
        tenant=options.tenant,
        status=result.status,
        groups_checked=result.groups_checked,
        groups_failed=result.groups_failed,
        seconds=round(result.seconds, 3),
    )
    return result


@asynccontextmanager
async def _reader_sessions(
    config: Config, scoped: Scoped
) -> AsyncIterator[tuple[asyncpg.Connection | None, asyncpg.Connection]]:
    """(old, new) read-only sessions under the invariant's statement_timeout; one session for
    both when they live in one database (old is then None: read in the same snapshot)."""
    settings = session_settings(config, read_only=True, role="invariants")
    settings["statement_timeout"] = str(scoped.invariant.statement_timeout_ms)
    # each chunk's plan depends on its bounds (how many groups follow): plan it per chunk
    settings["plan_cache_mode"] = "auto"
    service = config.effective_service_dsn()
    target_dsn = scoped.mapping.target_dsn if scoped.mapping else None
    async with AsyncExitStack() as stack:
        new = await connect(target_dsn or service, settings, _where(scoped, target_dsn))
        stack.push_async_callback(new.close)
        old = None
        if target_dsn is not None and scoped.invariant.kind == "compare":
            old = await connect(service, settings, "service_dsn")
            stack.push_async_callback(old.close)
        yield old, new


def _where(scoped: Scoped, target_dsn: str | None) -> str:
    if target_dsn is not None and scoped.mapping is not None:
        return f"mappings[{scoped.mapping.name}].target_dsn"
    return "service_dsn"


class _Checker:
    """The chunked reads of one invariant."""

    def __init__(
        self,
        inv: InvariantConfig,
        old: asyncpg.Connection | None,
        new: asyncpg.Connection,
        tenant: str | None,
    ) -> None:
        self.inv = inv
        #: None: old is read in ``new``'s session and snapshot
        self.old_conn = old
        self.new_conn = new
        self.tenant = tenant
        self.width = len(inv.group)
        self.tenant_index = inv.group.index(inv.tenant) if inv.tenant is not None else None

    async def value_columns(self) -> list[str]:
        """The new query's value column names (from its prepared statement, no rows read)."""
        statement = await self.new_conn.prepare(f"SELECT * FROM ({self.inv.new}) AS q LIMIT 0")
        return [a.name for a in statement.get_attributes()][self.width :]

    # --- the scan --------------------------------------------------------------------------

    async def scan(self, result: InvariantResult) -> None:
        after: Group | None = None
        while True:
            failures, checked, last = await self._chunk(after)
            result.groups_checked += checked
            for failure in failures:
                self._count(result, failure)
            if last is None:
                return
            after = last

    async def _chunk(self, after: Group | None) -> tuple[list[Failure], int, Group | None]:
        """One chunk: its failures, the groups it covered, and the last group (None: done)."""
        if self.inv.kind == "new_only":
            async with self._snapshot():
                rows = await self._page(self.new_conn, self.inv.new, after, None)
            failures = [Failure(g, None, v, self._tenant(g)) for g, v in rows]
            last = rows[-1][0] if len(rows) == self.inv.chunk_groups else None
            return failures, len(rows), last
        assert self.inv.old is not None
        async with self._snapshot():
            old_rows = await self._page(self._old(), self.inv.old, after, None)
            upto = old_rows[-1][0] if len(old_rows) == self.inv.chunk_groups else None
            new_rows = await self._range(self.new_conn, self.inv.new, after, upto)
        return self._diff(dict(old_rows), new_rows), len(old_rows), upto

    async def _range(
        self, conn: asyncpg.Connection, sql: str, after: Group | None, upto: Group | None
    ) -> dict[Group, Values]:
        """Every group of ``sql`` in (after, upto], read in pages of chunk_groups."""
        found: dict[Group, Values] = {}
        cursor = after
        while True:
            rows = await self._page(conn, sql, cursor, upto)
            found.update(rows)
            if len(rows) < self.inv.chunk_groups:
                return found
            cursor = rows[-1][0]

    def _diff(self, old: dict[Group, Values], new: dict[Group, Values]) -> list[Failure]:
        failures = [
            Failure(g, v, new.get(g), self._tenant(g))
            for g, v in old.items()
            if new.get(g) != v
        ]
        failures += [Failure(g, None, v, self._tenant(g)) for g, v in new.items() if g not in old]
        return failures

    # --- re-check ----------------------------------------------------------------------------

    async def recheck(self, result: InvariantResult) -> None:
        """Look at each failing group again; keep those that still fail."""
        suspects = result.failures
        unchecked = result.groups_failed - len(suspects)
        result.failures, result.groups_failed, result.by_tenant = [], 0, {}
        for failure in suspects[:MAX_RECHECKED_GROUPS]:
            again = await self._one_group(failure.group)
            if again is not None:
                self._count(result, again)
        # beyond what is re-checked (or recorded) the first look stands
        result.groups_failed += unchecked + max(0, len(suspects) - MAX_RECHECKED_GROUPS)

    async def _one_group(self, group: Group) -> Failure | None:
        async with self._snapshot():
            new = await self._exact(self.new_conn, self.inv.new, group)
            if self.inv.kind == "new_only":
                return None if new is None else Failure(group, None, new, self._tenant(group))
            assert self.inv.old is not None
            old = await self._exact(self._old(), self.inv.old, group)
        if old == new:
            return None
        return Failure(group, old, new, self._tenant(group))

    # --- SQL -------------------------------------------------------------------------------

    def _old(self) -> asyncpg.Connection:
        return self.old_conn if self.old_conn is not None else self.new_conn

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[None]:
        """One repeatable-read snapshot over both sides when they share a session."""
        if self.old_conn is not None:
            yield
            return
        async with self.new_conn.transaction(isolation="repeatable_read", readonly=True):
            yield

    def _columns(self) -> str:
        return ", ".join(f"q.{quote_ident(c)}" for c in self.inv.group)

    def _params(self, start: int) -> str:
        return ", ".join(f"${start + i}" for i in range(self.width))

    async def _page(
        self, conn: asyncpg.Connection, sql: str, after: Group | None, upto: Group | None
    ) -> list[tuple[Group, Values]]:
        where: list[str] = []
        args: list[Any] = []
        cols = self._columns()
        if after is not None:
            where.append(f"({cols}) > ({self._params(len(args) + 1)})")
            args += after
        if upto is not None:
            where.append(f"({cols}) <= ({self._params(len(args) + 1)})")
            args += upto
        self._tenant_filter(where, args)
        query = (
            f"SELECT * FROM ({sql}) AS q"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + f" ORDER BY {cols} LIMIT {self.inv.chunk_groups}"
        )
        return [self._split(r) for r in await conn.fetch(query, *args)]

    async def _exact(self, conn: asyncpg.Connection, sql: str, group: Group) -> Values | None:
        where = [f"({self._columns()}) = ({self._params(1)})"]
        args: list[Any] = list(group)
        self._tenant_filter(where, args)
        query = f"SELECT * FROM ({sql}) AS q WHERE {' AND '.join(where)}"
        rows = await conn.fetch(query, *args)
        if len(rows) > 1:
            raise ValueError(f"invariant {self.inv.name}: group {list(group)} has {len(rows)} rows")
        return self._split(rows[0])[1] if rows else None

    def _tenant_filter(self, where: list[str], args: list[Any]) -> None:
        if self.tenant is not None and self.inv.tenant is not None:
            where.append(f"q.{quote_ident(self.inv.tenant)}::text = ${len(args) + 1}")
            args.append(self.tenant)

    def _split(self, row: asyncpg.Record) -> tuple[Group, Values]:
        if len(row) <= self.width and self.inv.kind == "compare":
            raise ValueError(
                f"invariant {self.inv.name}: a row has {len(row)} columns, the group alone "
                f"{self.width}; add the values to compare"
            )
        names = list(row.keys())[: self.width]
        if names != self.inv.group:
            raise ValueError(
                f"invariant {self.inv.name}: the query's first columns are {names}, "
                f"group says {self.inv.group}"
            )
        values = tuple(row.values())
        group = values[: self.width]
        if any(v is None for v in group):
            raise ValueError(f"invariant {self.inv.name}: a group value is NULL: {list(group)}")
        return group, values[self.width :]

    def _tenant(self, group: Group) -> str | None:
        return None if self.tenant_index is None else str(group[self.tenant_index])

    def _count(self, result: InvariantResult, failure: Failure) -> None:
        result.groups_failed += 1
        if failure.tenant is not None:
            result.by_tenant[failure.tenant] = result.by_tenant.get(failure.tenant, 0) + 1
        if len(result.failures) < MAX_RECORDED_GROUPS:
            result.failures.append(failure)


# --- validation ----------------------------------------------------------------------------


async def validate_invariants(config: Config) -> list[str]:
    """Prepare every invariant's queries where they run (``dualwrite check``): a query that
    does not fit the database, or whose first columns are not its group, is a ConfigError."""
    lines = []
    for scoped in invariants_to_check(config, None, None):
        inv = scoped.invariant
        async with _reader_sessions(config, scoped) as (old, new):
            sides = [("new", new, inv.new)]
            if inv.old is not None:
                sides.insert(0, ("old", old or new, inv.old))
            for side, conn, sql in sides:
                await _prepare_side(inv, side, conn, sql)
        scope = scoped.mapping.name if scoped.mapping else "migration"
        lines.append(f"invariant {inv.name} ({inv.kind}, {scope}): ok")
    return lines


async def _prepare_side(
    inv: InvariantConfig, side: str, conn: asyncpg.Connection, sql: str
) -> None:
    where = f"invariants[{inv.name}].{side}"
    try:
        statement = await conn.prepare(f"SELECT * FROM ({sql}) AS q LIMIT 0")
    except asyncpg.PostgresError as exc:
        raise ConfigError(where, f"does not prepare: {exc}") from None
    names = [a.name for a in statement.get_attributes()]
    if names[: len(inv.group)] != inv.group:
        raise ConfigError(
            where, f"its first columns are {names[: len(inv.group)]}, group says {inv.group}"
        )
    if inv.kind == "compare" and len(names) <= len(inv.group):
        raise ConfigError(where, "returns the group columns only: add the values to compare")


# --- records and metrics -------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """A value as JSON can hold it (numbers that JSON would round, and dates, as text)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Decimal | date | datetime | clock_time | timedelta | UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


async def _record(control: asyncpg.Connection, result: InvariantResult) -> None:
    assert result.run_id is not None
    group_names = result.group_columns
    async with control.transaction():
        await control.execute(
            _FINISH,
            result.run_id,
            result.status,
            result.groups_checked,
            result.groups_failed,
            json.dumps(result.by_tenant) if result.by_tenant else None,
            result.error,
            result.value_columns or None,
        )
        if result.failures:
            await control.executemany(
                _FAILURE,
                [
                    (
                        result.run_id,
                        result.invariant,
                        json.dumps(dict(zip(group_names, jsonable(f.group), strict=True))),
                        f.tenant,
                        None if f.old is None else json.dumps(jsonable(f.old)),
                        None if f.new is None else json.dumps(jsonable(f.new)),
                    )
                    for f in result.failures
                ],
            )


def _export(result: InvariantResult) -> None:
    if result.status != "done":
        outcome = "failed"
    else:
        outcome = "held" if result.groups_failed == 0 else "broken"
    metrics.INVARIANT_CHECKS.labels(result.invariant, outcome).inc()
    if result.status == "done" and result.tenant is None:
        metrics.INVARIANT_FAILING_GROUPS.labels(result.invariant).set(result.groups_failed)
        metrics.INVARIANT_LAST_CHECK_TIMESTAMP.labels(result.invariant).set(time.time())


async def export_invariant_gauges(conn: asyncpg.Connection, names: Sequence[str]) -> None:
    """Set the invariant gauges from the control schema (the sidecar, before each scrape)."""
    latest = {r["invariant"]: r for r in await conn.fetch(_LATEST_FULL, list(names))}
    for name in names:
        row = latest.get(name)
        metrics.INVARIANT_FAILING_GROUPS.labels(name).set(row["groups_failed"] if row else 0)
        metrics.INVARIANT_LAST_CHECK_TIMESTAMP.labels(name).set(
            row["finished_at"].timestamp() if row else 0
        )
