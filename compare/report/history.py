"""Reads the control schema's history for the report, /status and the sidecar's gauges; read-only.

Every figure the report shows comes from one of these queries, so the report runs from any
machine that reaches the database. Times come from the database's clock (``now()``), never the
reporting machine's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from compare.report.model import (
    INVARIANT_SAMPLES,
    Backfill,
    Bucket,
    Facts,
    InvariantCheck,
    InvariantFailure,
    Pass,
    Repair,
)
from core import metrics
from core.config import InvariantConfig
from core.mapping import SRC, CompiledMapping
from core.shadow import read_tenants
from core.sqltext import quote_ident, quote_literal

_PASSES = """
SELECT id, started_at, finished_at, rows_compared, missing, extra, changed, pending,
       dead_lettered, tenant IS NULL AS full, clean, tenant, by_tenant::text AS by_tenant,
       cutover_tenants
FROM dualwrite.reconcile_runs
WHERE mapping = $1 AND kind = 'reconcile' AND status = 'done' AND finished_at >= $2
ORDER BY finished_at DESC, id DESC
"""
_UNFINISHED = """
SELECT count(*) FROM dualwrite.reconcile_runs
WHERE mapping = $1 AND kind = 'reconcile' AND status IN ('failed', 'interrupted')
  AND started_at >= $2
"""
_DEAD_LETTERS = """
SELECT coalesce(sqlstate, 'unknown') AS sqlstate, count(*) AS n
FROM dualwrite.dead_letters WHERE mapping = $1 GROUP BY 1 ORDER BY 2 DESC, 1
"""
_OUTBOX = """
SELECT count(*) AS depth,
       coalesce(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 AS age
FROM dualwrite.outbox WHERE mapping = $1
"""
_UNMIRRORED_SINCE = """
SELECT coalesce(sum(statements), 0) FROM dualwrite.unmirrored_events
WHERE mapping = $1 AND at > $2
"""
_FAILURES_SINCE = """
SELECT coalesce(sum(failures), 0) FROM dualwrite.mirror_activity
WHERE mapping = $1 AND period_end > $2
"""
_UNCAPTURED_SINCE = """
SELECT count(*) FROM dualwrite.uncaptured_changes WHERE mapping = $1 AND commit_time > $2
"""
_RESYNC = "SELECT reason, last_at FROM dualwrite.resync_needed WHERE mapping = $1"
_BACKFILL = """
SELECT status, rows_done, rows_estimate, finished_at
FROM dualwrite.backfill_state WHERE mapping = $1
"""
_PAUSED = "SELECT paused FROM dualwrite.mapping_state WHERE mapping = $1"
#: mirror activity and unmirrored statements per bucket of $3 seconds since $2
_ACTIVITY = """
WITH a AS (
    SELECT to_timestamp(floor(extract(epoch FROM period_end) / $3) * $3) AS start,
           sum(statements) AS statements, sum(rows) AS rows, sum(failures) AS failures
    FROM dualwrite.mirror_activity WHERE mapping = $1 AND period_end > $2 GROUP BY 1
), u AS (
    SELECT to_timestamp(floor(extract(epoch FROM at) / $3) * $3) AS start,
           sum(statements) AS unmirrored
    FROM dualwrite.unmirrored_events WHERE mapping = $1 AND at > $2 GROUP BY 1
)
SELECT start, coalesce(a.statements, 0) AS statements, coalesce(a.rows, 0) AS rows,
       coalesce(a.failures, 0) AS failures, coalesce(u.unmirrored, 0) AS unmirrored
FROM a FULL JOIN u USING (start) ORDER BY start
"""
_LATEST_RUNS = """
SELECT DISTINCT ON (mapping) mapping, id, status, started_at, finished_at, rows_compared,
       missing, extra, changed, pending, clean, error
FROM dualwrite.reconcile_runs WHERE kind = 'reconcile'
ORDER BY mapping, started_at DESC, id DESC
"""
_LAST_CLEAN = """
SELECT mapping, max(finished_at) AS at FROM dualwrite.reconcile_runs
WHERE kind = 'reconcile' AND status = 'done' AND tenant IS NULL AND clean IS NOT FALSE
  AND missing + extra + changed = 0
GROUP BY mapping
"""
_LATEST_FULL_RUN = """
SELECT DISTINCT ON (mapping) mapping, finished_at, missing, extra, changed
FROM dualwrite.reconcile_runs
WHERE kind = 'reconcile' AND status = 'done' AND tenant IS NULL AND mapping = ANY($1::text[])
ORDER BY mapping, finished_at DESC, id DESC
"""
_BACKFILLS = """
SELECT mapping, status, rows_done, rows_estimate FROM dualwrite.backfill_state
WHERE mapping = ANY($1::text[])
"""
_REPAIRS = """
SELECT id, mapping, at, requested_by, reason, dry_run, run_id,
       jsonb_array_length(keys) AS keys, divergent_after, upserted, deleted,
       CASE WHEN $4 THEN images::text END AS images,
       CASE WHEN jsonb_typeof(images) = 'array' THEN ARRAY(
           SELECT DISTINCT i->>'tenant' FROM jsonb_array_elements(images) AS i
           WHERE i->>'tenant' IS NOT NULL) END AS tenants
FROM dualwrite.repairs
WHERE at >= $1 AND ($2::text IS NULL OR mapping = $2) AND (NOT dry_run OR $3)
ORDER BY at DESC, id DESC
"""
_LATEST_INVARIANT = """
SELECT id, status, finished_at, groups_checked, groups_failed, by_tenant::text AS by_tenant,
       error, value_columns
FROM dualwrite.invariant_runs
WHERE invariant = $1 AND tenant IS NULL AND status IN ('done', 'failed')
ORDER BY finished_at DESC, id DESC LIMIT 1
"""
_INVARIANT_FAILURES = """
SELECT grp::text AS grp, tenant, old_values::text AS old, new_values::text AS new
FROM dualwrite.invariant_failures WHERE run_id = $1 ORDER BY ctid LIMIT $2
"""
DIVERGENCE_CLASSES = ("missing", "extra", "changed")


async def database_now(conn: asyncpg.Connection) -> datetime:
    value: datetime = await conn.fetchval("SELECT now()")
    return value


async def read_facts(
    conn: asyncpg.Connection,
    mapping: str,
    *,
    passes_since: datetime,
    history_start: datetime,
    window_start: datetime,
    bucket: timedelta,
    now: datetime,
) -> Facts:
    """Everything the report needs about one mapping (one connection, a handful of queries)."""
    dead = {r["sqlstate"]: int(r["n"]) for r in await conn.fetch(_DEAD_LETTERS, mapping)}
    outbox = await conn.fetchrow(_OUTBOX, mapping)
    resync = await conn.fetchrow(_RESYNC, mapping)
    return Facts(
        passes=await read_passes(conn, mapping, passes_since),
        passes_since=passes_since,
        unfinished_passes=int(await conn.fetchval(_UNFINISHED, mapping, history_start)),
        dead_letters=sum(dead.values()),
        dead_letters_by_sqlstate=dead,
        outbox_depth=int(outbox["depth"]),
        outbox_oldest_age_seconds=float(outbox["age"]),
        unmirrored_in_window=int(await conn.fetchval(_UNMIRRORED_SINCE, mapping, window_start)),
        mirror_failures_in_window=int(await conn.fetchval(_FAILURES_SINCE, mapping, window_start)),
        uncaptured_in_window=int(await conn.fetchval(_UNCAPTURED_SINCE, mapping, window_start)),
        resync_reason=resync["reason"] if resync else None,
        resync_marked_at=resync["last_at"] if resync else None,
        backfill=await read_backfill(conn, mapping),
        paused=bool(await conn.fetchval(_PAUSED, mapping)),
        activity=await read_activity(conn, mapping, history_start, bucket, now),
        repairs=await read_repairs(conn, passes_since, mapping=mapping),
    )


async def read_passes(conn: asyncpg.Connection, mapping: str, since: datetime) -> list[Pass]:
    """Finished reconcile passes of ``mapping`` that ended at or after ``since``, newest first."""
    return [
        Pass(
            id=r["id"],
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            rows_compared=r["rows_compared"],
            missing=r["missing"],
            extra=r["extra"],
            changed=r["changed"],
            pending=r["pending"],
            dead_lettered=r["dead_lettered"],
            full=r["full"],
            flagged_unclean=r["clean"] is False,
            tenant=r["tenant"],
            by_tenant=json.loads(r["by_tenant"]) if r["by_tenant"] else {},
            moved=None if r["cutover_tenants"] is None else tuple(r["cutover_tenants"]),
        )
        for r in await conn.fetch(_PASSES, mapping, since)
    ]


async def read_invariant(
    conn: asyncpg.Connection, invariant: InvariantConfig, mapping: str | None
) -> InvariantCheck:
    """The invariant's most recent finished full check and its first failing groups."""
    base = InvariantCheck(
        name=invariant.name,
        mapping=mapping,
        kind=invariant.kind,
        description=invariant.description,
        group_columns=tuple(invariant.group),
        tenant_column=invariant.tenant,
    )
    row = await conn.fetchrow(_LATEST_INVARIANT, invariant.name)
    if row is None:
        return base
    failures = [
        InvariantFailure(
            group=_in_order(json.loads(r["grp"]), invariant.group),
            tenant=r["tenant"],
            old=None if r["old"] is None else json.loads(r["old"]),
            new=None if r["new"] is None else json.loads(r["new"]),
        )
        for r in await conn.fetch(_INVARIANT_FAILURES, row["id"], INVARIANT_SAMPLES)
    ]
    return replace(
        base,
        run_id=row["id"],
        status=row["status"],
        finished_at=row["finished_at"],
        groups_checked=row["groups_checked"],
        groups_failed=row["groups_failed"],
        by_tenant=json.loads(row["by_tenant"]) if row["by_tenant"] else {},
        error=row["error"],
        failures=tuple(failures),
        value_columns=tuple(row["value_columns"] or ()),
    )


def dead_letters_by_tenant_sql(mapping: CompiledMapping) -> str | None:
    """Dead letters of ``mapping`` counted by the tenant of their source row ($1: mapping).

    Each key is looked up in the source by its columns (typed through the source's row type,
    so the lookup uses the key's index). None when a key column is computed, not a plain
    source column: the report then counts those dead letters under an unknown tenant.
    """
    tenant_column = mapping.config.tenant_column
    if tenant_column is None:
        return None
    columns = []
    for k in mapping.key:
        expr = mapping.expressions[k]
        names = expr.column_names
        if len(names) != 1 or expr.sql.strip('"') != next(iter(names)):
            return None
        columns.append(next(iter(names)))
    relation = quote_ident(mapping.source_name)
    if mapping.source_schema is not None:
        relation = f"{quote_ident(mapping.source_schema)}.{relation}"
    match = " AND ".join(
        f"{SRC}.{quote_ident(c)} = (jsonb_populate_record(NULL::{relation}, "
        f"jsonb_build_object({quote_literal(c)}, d.key -> {i}))).{quote_ident(c)}"
        for i, c in enumerate(columns)
    )
    tenant = mapping.expressions[tenant_column].sql
    return (
        f"SELECT s.tenant, count(*) AS n FROM dualwrite.dead_letters AS d "
        f"LEFT JOIN LATERAL (SELECT ({tenant})::text AS tenant FROM {relation} AS {SRC} "
        f"WHERE {match} LIMIT 1) AS s ON true WHERE d.mapping = $1 GROUP BY 1"
    )


async def dead_letters_by_tenant(
    conn: asyncpg.Connection, mapping: CompiledMapping
) -> dict[str | None, int]:
    """Per tenant (None: unknown) the mapping's dead letters; a source the session cannot
    read leaves them all unknown (in a savepoint, so the report's snapshot survives)."""
    sql = dead_letters_by_tenant_sql(mapping)
    if sql is not None:
        try:
            async with conn.transaction():
                return {r["tenant"]: int(r["n"]) for r in await conn.fetch(sql, mapping.name)}
        except asyncpg.PostgresError:
            pass
    total = await conn.fetchval(
        "SELECT count(*) FROM dualwrite.dead_letters WHERE mapping = $1", mapping.name
    )
    return {None: int(total)} if total else {}


def _in_order(group: dict[str, Any], columns: Sequence[str]) -> dict[str, Any]:
    """jsonb sorts an object's keys: put the group's back in the invariant's order."""
    return {c: group[c] for c in columns if c in group} | group


async def read_repairs(
    conn: asyncpg.Connection,
    since: datetime,
    *,
    mapping: str | None = None,
    dry_runs: bool = False,
    images: bool = False,
) -> list[Repair]:
    """Repairs since ``since``, newest first (dry runs and row images only when asked)."""
    return [
        Repair(
            id=r["id"],
            mapping=r["mapping"],
            at=r["at"],
            requested_by=r["requested_by"],
            reason=r["reason"],
            dry_run=r["dry_run"],
            run_id=r["run_id"],
            keys=r["keys"],
            divergent_after=r["divergent_after"],
            upserted=r["upserted"],
            deleted=r["deleted"],
            images=json.loads(r["images"]) if r["images"] else None,
            tenants=None if r["tenants"] is None else tuple(r["tenants"]),
        )
        for r in await conn.fetch(_REPAIRS, since, mapping, dry_runs, images)
    ]


async def read_backfill(conn: asyncpg.Connection, mapping: str) -> Backfill | None:
    row = await conn.fetchrow(_BACKFILL, mapping)
    if row is None:
        return None
    return Backfill(row["status"], row["rows_done"], row["rows_estimate"], row["finished_at"])


async def read_activity(
    conn: asyncpg.Connection, mapping: str, since: datetime, bucket: timedelta, now: datetime
) -> list[Bucket]:
    """Mirroring per bucket from ``since`` to ``now``, empty buckets included."""
    seconds = bucket.total_seconds()
    rows = await conn.fetch(_ACTIVITY, mapping, since, seconds)
    found = {
        r["start"]: Bucket(
            r["start"], int(r["statements"]), int(r["rows"]), int(r["failures"]),
            int(r["unmirrored"]),
        )
        for r in rows
    }
    return [found.get(start, Bucket(start)) for start in bucket_starts(since, now, bucket)]


def bucket_starts(since: datetime, now: datetime, bucket: timedelta) -> list[datetime]:
    """Bucket boundaries aligned like the SQL's (multiples of the bucket since the epoch)."""
    seconds = bucket.total_seconds()
    first = datetime.fromtimestamp((since.timestamp() // seconds) * seconds, since.tzinfo)
    starts = []
    start = first
    while start <= now:
        starts.append(start)
        start += bucket
    return starts


async def latest_runs(conn: asyncpg.Connection) -> dict[str, dict[str, Any]]:
    """Per mapping, the most recent reconcile pass and when the last clean one finished."""
    last_clean = {r["mapping"]: r["at"] for r in await conn.fetch(_LAST_CLEAN)}
    result: dict[str, dict[str, Any]] = {}
    for row in await conn.fetch(_LATEST_RUNS):
        run = dict(row.items())
        del run["mapping"]
        run.update({k: run[k].isoformat() for k in ("started_at", "finished_at") if run[k]})
        result[row["mapping"]] = {
            "last_reconcile": run,
            "last_clean_pass_at": _iso(last_clean.get(row["mapping"])),
        }
    return result


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()



async def export_gauges(conn: asyncpg.Connection, mappings: Sequence[str]) -> None:
    """Set the last-pass, last-clean-pass and backfill gauges of ``mappings`` from the tables."""
    names = list(mappings)
    last = {r["mapping"]: r for r in await conn.fetch(_LATEST_FULL_RUN, names)}
    clean = {r["mapping"]: r["at"] for r in await conn.fetch(_LAST_CLEAN)}
    backfills = {r["mapping"]: r for r in await conn.fetch(_BACKFILLS, names)}
    for name in names:
        _export_pass(name, last.get(name), clean.get(name))
        _export_backfill(name, backfills.get(name))


def _export_pass(name: str, last: asyncpg.Record | None, clean_at: datetime | None) -> None:
    metrics.LAST_PASS_TIMESTAMP.labels(name).set(last["finished_at"].timestamp() if last else 0)
    metrics.LAST_CLEAN_PASS_TIMESTAMP.labels(name).set(clean_at.timestamp() if clean_at else 0)
    if last is not None:
        for cls in DIVERGENCE_CLASSES:
            metrics.LAST_PASS_DIVERGENT_ROWS.labels(name, cls).set(last[cls])


def _export_backfill(name: str, row: asyncpg.Record | None) -> None:
    metrics.BACKFILL_ROWS_DONE.labels(name).set(row["rows_done"] if row else 0)
    metrics.BACKFILL_ROWS_ESTIMATE.labels(name).set((row["rows_estimate"] or 0) if row else 0)
    metrics.BACKFILL_COMPLETE.labels(name).set(1 if row and row["status"] == "done" else 0)


#: shadow mismatches count as a tenant's trouble since they were first recorded
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_LATEST_BY_TENANT = """
SELECT DISTINCT ON (mapping) mapping, by_tenant::text AS by_tenant
FROM dualwrite.reconcile_runs
WHERE kind = 'reconcile' AND status = 'done' AND tenant IS NULL AND mapping = ANY($1::text[])
ORDER BY mapping, finished_at DESC, id DESC
"""
_LATEST_INVARIANT_BY_TENANT = """
SELECT DISTINCT ON (invariant) invariant, by_tenant::text AS by_tenant
FROM dualwrite.invariant_runs
WHERE status = 'done' AND tenant IS NULL AND invariant = ANY($1::text[])
ORDER BY invariant, finished_at DESC, id DESC
"""


async def tenant_trouble(
    conn: asyncpg.Connection, mappings: Sequence[CompiledMapping], invariants: Sequence[str]
) -> dict[str, int]:
    """Per tenant, its open trouble: divergent rows in each tenant mapping's latest full pass,
    dead letters, failing groups in the latest full check of tenant-aware invariants, and
    shadow reads attributed to it that mismatched (core/shadow.py)."""
    trouble: dict[str, int] = {}

    def add(tenant: str | None, count: int) -> None:
        if tenant is not None and count:
            trouble[tenant] = trouble.get(tenant, 0) + count

    names = [m.name for m in mappings]
    for row in await conn.fetch(_LATEST_BY_TENANT, names):
        for tenant, counts in json.loads(row["by_tenant"] or "{}").items():
            add(tenant, sum(int(n) for n in counts.values()))
    for mapping in mappings:
        for tenant, count in (await dead_letters_by_tenant(conn, mapping)).items():
            add(tenant, count)
    for row in await conn.fetch(_LATEST_INVARIANT_BY_TENANT, list(invariants)):
        for tenant, count in json.loads(row["by_tenant"] or "{}").items():
            add(tenant, int(count))
    for tenant, shadow in (await read_tenants(conn, _EPOCH)).items():
        add(tenant, shadow.counts["mismatch"])
    return trouble


_TENANTS_OF_PASSES = """
SELECT DISTINCT t FROM (
    SELECT tenant AS t FROM dualwrite.reconcile_runs
    WHERE kind = 'reconcile' AND status = 'done' AND mapping = ANY($1::text[])
      AND finished_at >= $2 AND tenant IS NOT NULL
    UNION ALL
    SELECT jsonb_object_keys(by_tenant) FROM dualwrite.reconcile_runs
    WHERE kind = 'reconcile' AND status = 'done' AND mapping = ANY($1::text[])
      AND finished_at >= $2 AND jsonb_typeof(by_tenant) = 'object'
) AS s
"""


async def tenants_of_passes(
    conn: asyncpg.Connection, mappings: Sequence[CompiledMapping], since: datetime
) -> set[str]:
    """Tenants the passes since ``since`` name (limited to them, or divergent in them): the
    report judges each of them, so the tenant gauges count them too."""
    rows = await conn.fetch(_TENANTS_OF_PASSES, [m.name for m in mappings], since)
    return {r["t"] for r in rows}


def export_tenant_gauges(trouble: dict[str, int], named: Iterable[str]) -> None:
    """dualwrite_tenants by verdict, and the worst tenants by name (capped).

    ``named``: every other tenant the report judges (report.tenants, cutover.tenants, the
    tenants of recent passes); those without open trouble count as go."""
    no_go = {t for t, n in trouble.items() if n > 0}
    metrics.TENANTS.labels("no_go").set(len(no_go))
    metrics.TENANTS.labels("go").set(len(set(named) - no_go))
    worst = sorted(no_go, key=lambda t: (-trouble[t], t))[: metrics.WORST_TENANTS_MAX]
    metrics.WORST_TENANT_TROUBLE.clear()
    for tenant in worst:
        metrics.WORST_TENANT_TROUBLE.labels(tenant).set(trouble[tenant])
