"""Reads the control schema's history for the report, /status and the sidecar's gauges; read-only.

Every figure the report shows comes from one of these queries, so the report runs from any
machine that reaches the database. Times come from the database's clock (``now()``), never the
reporting machine's.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from compare.report.model import Backfill, Bucket, Facts, Pass
from core import metrics

_PASSES = """
SELECT id, started_at, finished_at, rows_compared, missing, extra, changed, pending,
       tenant IS NULL AS full, clean
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
            full=r["full"],
            flagged_unclean=r["clean"] is False,
        )
        for r in await conn.fetch(_PASSES, mapping, since)
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
