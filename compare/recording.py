"""Reconcile and backfill records in the control schema: runs, findings, repairs, checkpoints.

Also the session advisory locks that keep one pass (or backfill) per mapping at a time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from compare.findings import Divergence, Tally
from core.control import LOCK_CLASS

#: classid of the session advisory locks held for a whole pass or backfill (the xact-level
#: per-key locks of sync_keys use LOCK_CLASS; a different class keeps the two apart)
RUN_LOCK_CLASS = LOCK_CLASS + 1

_START_RUN = """
INSERT INTO dualwrite.reconcile_runs
    (mapping, kind, method, tenant, dry_run, sidecar, requested_by, cutover_tenants)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text[]) RETURNING id
"""
_ABANDONED = """
UPDATE dualwrite.reconcile_runs
SET status = 'interrupted', finished_at = coalesce(finished_at, now()),
    error = coalesce(error, 'the process running it went away')
WHERE mapping = $1 AND kind = $2 AND status = 'running'
"""
_PROGRESS = """
UPDATE dualwrite.reconcile_runs
SET checkpoint = $2::jsonb, rows_compared = $3, missing = $4, extra = $5, changed = $6,
    pending = $7, repaired = $8, dead_lettered = $9
WHERE id = $1
"""
_FINISH = """
UPDATE dualwrite.reconcile_runs
SET status = $2, finished_at = now(), checkpoint = coalesce($3::jsonb, checkpoint),
    rows_compared = $4, missing = $5, extra = $6, changed = $7, pending = $8, repaired = $9,
    dead_lettered = $10, clean = $11, by_tenant = $12::jsonb, by_column = $13::jsonb, error = $14
WHERE id = $1
"""
_FINDING = """
INSERT INTO dualwrite.reconcile_findings
    (run_id, mapping, class, key, tenant, columns, expected, actual)
VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7::jsonb, $8::jsonb)
"""
_REPAIR = """
INSERT INTO dualwrite.repairs
    (run_id, mapping, requested_by, dry_run, keys, divergent_before, divergent_after,
     upserted, deleted, reason, images)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11::jsonb)
"""


async def try_lock(conn: asyncpg.Connection, kind: str, mapping: str) -> bool:
    """Take the session lock of (kind, mapping); False when another session holds it."""
    return bool(
        await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2 || ':' || $3))",
            RUN_LOCK_CLASS,
            kind,
            mapping,
        )
    )


async def unlock(conn: asyncpg.Connection, kind: str, mapping: str) -> None:
    await conn.execute(
        "SELECT pg_advisory_unlock($1, hashtext($2 || ':' || $3))", RUN_LOCK_CLASS, kind, mapping
    )


@dataclass(frozen=True)
class RunInfo:
    mapping: str
    kind: str
    method: str
    tenant: str | None = None
    dry_run: bool = False
    sidecar: str | None = None
    requested_by: str | None = None
    #: staged cutover: the tenants moved when the pass ran (None: the mapping is in no pair)
    cutover_tenants: tuple[str, ...] | None = None


async def start_run(conn: asyncpg.Connection, info: RunInfo) -> int:
    """Insert a ``running`` run (closing runs of a process that died; the caller holds the
    mapping's lock, so no other run of this kind can be live)."""
    await conn.execute(_ABANDONED, info.mapping, info.kind)
    run_id = await conn.fetchval(
        _START_RUN,
        info.mapping,
        info.kind,
        info.method,
        info.tenant,
        info.dry_run,
        info.sidecar,
        info.requested_by,
        None if info.cutover_tenants is None else list(info.cutover_tenants),
    )
    return int(run_id)


async def record_progress(
    conn: asyncpg.Connection, run_id: int, checkpoint: str | None, tally: Tally, repaired: int
) -> None:
    await conn.execute(_PROGRESS, run_id, checkpoint, *_figures(tally, repaired))


def _figures(tally: Tally, repaired: int) -> tuple[int, int, int, int, int, int, int]:
    """A run's figures in the order _PROGRESS and _FINISH take them: rows compared, missing,
    extra, changed, pending, repaired, dead-lettered."""
    counts = tally.counts
    return (
        tally.compared,
        counts["missing"],
        counts["extra"],
        counts["changed"],
        tally.pending,
        repaired,
        tally.dead_lettered,
    )


async def finish_run(
    conn: asyncpg.Connection,
    run_id: int,
    status: str,
    tally: Tally,
    *,
    repaired: int = 0,
    checkpoint: str | None = None,
    error: str | None = None,
) -> None:
    """Close a run; ``clean`` is only set for a pass that finished (True: nothing divergent
    and nothing dead-lettered)."""
    clean = tally.clean if status == "done" else None
    await conn.execute(
        _FINISH,
        run_id,
        status,
        checkpoint,
        *_figures(tally, repaired),
        clean,
        json.dumps(tally.by_tenant),
        json.dumps(tally.by_column),
        error,
    )


async def add_findings(
    conn: asyncpg.Connection, run_id: int, mapping: str, samples: Sequence[Divergence]
) -> None:
    if samples:
        await conn.executemany(
            _FINDING,
            [
                (
                    run_id,
                    mapping,
                    d.cls,
                    d.key,
                    d.tenant,
                    list(d.columns) or None,
                    d.expected,
                    d.actual,
                )
                for d in samples
            ],
        )


@dataclass(frozen=True)
class RowImage:
    """A repaired key's target row before and after (redacted jsonb texts; None: no row)."""

    key: str
    cls: str
    before: str | None
    after: str | None
    #: the row's tenant (mappings with a tenant_column)
    tenant: str | None = None

    def as_json(self) -> str:
        return (
            f'{{"key": {self.key}, "class": {json.dumps(self.cls)}, '
            f'"tenant": {json.dumps(self.tenant)}, '
            f'"before": {self.before or "null"}, "after": {self.after or "null"}}}'
        )


@dataclass(frozen=True)
class RepairRecord:
    mapping: str
    requested_by: str
    dry_run: bool
    keys: Sequence[str]
    divergent_before: int
    divergent_after: int | None
    upserted: int
    deleted: int
    reason: str | None = None
    images: Sequence[RowImage] = ()


async def record_repair(conn: asyncpg.Connection, run_id: int | None, record: RepairRecord) -> None:
    await conn.execute(
        _REPAIR,
        run_id,
        record.mapping,
        record.requested_by,
        record.dry_run,
        "[" + ", ".join(record.keys) + "]",
        record.divergent_before,
        record.divergent_after,
        record.upserted,
        record.deleted,
        record.reason,
        "[" + ", ".join(i.as_json() for i in record.images) + "]",
    )


# --- backfill state ---------------------------------------------------------------------------

_BACKFILL_GET = "SELECT * FROM dualwrite.backfill_state WHERE mapping = $1"
_BACKFILL_BEGIN = """
INSERT INTO dualwrite.backfill_state
    (mapping, status, started_at, updated_at, finished_at, high_water, checkpoint, rows_done,
     rows_estimate)
VALUES ($1, 'running', now(), now(), NULL, $2::jsonb, NULL, 0, $3)
ON CONFLICT (mapping) DO UPDATE SET status = 'running', started_at = now(), updated_at = now(),
    finished_at = NULL, high_water = EXCLUDED.high_water, checkpoint = NULL, rows_done = 0,
    rows_estimate = EXCLUDED.rows_estimate
"""
_BACKFILL_STATUS = """
UPDATE dualwrite.backfill_state
SET status = $2, updated_at = now(),
    finished_at = CASE WHEN $2 = 'done' THEN now() ELSE finished_at END
WHERE mapping = $1
"""
_BACKFILL_CHECKPOINT = """
UPDATE dualwrite.backfill_state
SET checkpoint = $2::jsonb, rows_done = rows_done + $3, updated_at = now()
WHERE mapping = $1
"""


@dataclass(frozen=True)
class BackfillState:
    status: str
    high_water: str | None
    checkpoint: str | None
    rows_done: int
    rows_estimate: int | None


async def load_backfill(conn: asyncpg.Connection, mapping: str) -> BackfillState | None:
    row = await conn.fetchrow(_BACKFILL_GET, mapping)
    if row is None:
        return None
    return BackfillState(
        status=row["status"],
        high_water=_text(row["high_water"]),
        checkpoint=_text(row["checkpoint"]),
        rows_done=int(row["rows_done"]),
        rows_estimate=row["rows_estimate"],
    )


def _text(value: Any) -> str | None:
    # asyncpg hands jsonb over as its text; normalise through PostgreSQL's own spelling later
    return None if value is None else str(value)


async def begin_backfill(
    conn: asyncpg.Connection, mapping: str, high_water: str | None, estimate: int | None
) -> None:
    await conn.execute(_BACKFILL_BEGIN, mapping, high_water, estimate)


async def set_backfill_status(conn: asyncpg.Connection, mapping: str, status: str) -> None:
    await conn.execute(_BACKFILL_STATUS, mapping, status)


async def backfill_checkpoint(
    conn: asyncpg.Connection, mapping: str, checkpoint: str, rows: int
) -> None:
    await conn.execute(_BACKFILL_CHECKPOINT, mapping, checkpoint, rows)
