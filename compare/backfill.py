"""Backfill: bring a target from empty to complete while writes continue.

Source keys are walked in key order up to the high-water key recorded when the backfill began
(rows inserted later are the mirror's job) and each chunk goes through ``sync_keys``, which is
safe next to the applier and application writes. The checkpoint commits with each batch, so a
killed backfill resumes where it stopped; rate-limited and paused under database pressure.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import asyncpg

from compare.connections import Sessions, open_sessions
from compare.findings import Tally
from compare.progress import Progress
from compare.reconciler import default_requester
from compare.recording import (
    BackfillState,
    RunInfo,
    backfill_checkpoint,
    begin_backfill,
    finish_run,
    load_backfill,
    set_backfill_status,
    start_run,
    try_lock,
    unlock,
)
from compare.resync import apply_keys, batches
from compare.rows import source_keys_sql, source_last_key_sql
from compare.statements import Params
from compare.throttle import Throttle
from core import metrics
from core.config import Config
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error

_log = get_logger("backfill")

#: below this many estimated source rows the estimate is replaced by an exact count
EXACT_COUNT_BELOW = 1_000_000


@dataclass
class BackfillResult:
    mapping: str
    #: done, already_done, interrupted, failed, busy (another backfill of it is running)
    status: str
    #: keys passed to sync_keys by this run
    rows: int = 0
    #: keys done over every run since the backfill began
    rows_done: int = 0
    estimate: int | None = None
    upserted: int = 0
    deleted: int = 0
    seconds: float = 0.0
    resumed: bool = False
    error: str | None = None


async def backfill_mapping(
    config: Config,
    mapping: CompiledMapping,
    *,
    rate: int | None = None,
    restart: bool = False,
    progress: Progress | None = None,
    requested_by: str | None = None,
    sidecar: str | None = None,
) -> BackfillResult:
    """Run (or resume, or with ``restart`` start over) the backfill of one mapping."""
    async with open_sessions(
        config, mapping, role="backfill", writes_target=True, reads=False
    ) as sessions:
        if not await try_lock(sessions.control, "backfill", mapping.name):
            return BackfillResult(mapping.name, "busy")
        job = _Backfill(config, mapping, sessions, rate, progress)
        try:
            return await job.run(restart, requested_by or default_requester(), sidecar)
        finally:
            if not sessions.control.is_closed():
                await unlock(sessions.control, "backfill", mapping.name)


class _Backfill:
    def __init__(
        self,
        config: Config,
        mapping: CompiledMapping,
        sessions: Sessions,
        rate: int | None,
        progress: Progress | None,
    ) -> None:
        self.config = config
        self.mapping = mapping
        self.sessions = sessions
        self.control = sessions.control
        self.progress = progress
        self.throttle = Throttle(
            mapping.name,
            rate or config.backfill.rows_per_second,
            config.reconcile.pressure,
            [c for c in (sessions.control, sessions.target_writer) if c is not None],
            activity="backfill",
        )
        self.result = BackfillResult(mapping.name, "running")
        self.high_water: str | None = None
        self.checkpoint: str | None = None

    async def run(self, restart: bool, requested_by: str, sidecar: str | None) -> BackfillResult:
        started = time.monotonic()
        state = await load_backfill(self.control, self.mapping.name)
        if state is not None and state.status == "done" and not restart:
            self.result.status = "already_done"
            self.result.rows_done, self.result.estimate = state.rows_done, state.rows_estimate
            return self.result
        await (self._begin() if state is None or restart else self._resume(state))
        run_id = await start_run(
            self.control,
            RunInfo(
                self.mapping.name,
                "backfill",
                self._method(),
                sidecar=sidecar,
                requested_by=requested_by,
            ),
        )
        if self.progress is not None:
            self.progress.start(
                f"backfill {self.mapping.name}", self.result.estimate, self.result.rows_done
            )
        try:
            await self._copy()
        except asyncio.CancelledError:
            await self._stop(run_id, "interrupted", "cancelled", started)
            raise
        except Exception as exc:
            await self._stop(run_id, "failed", describe_error(exc, self.mapping), started)
            return self.result
        finally:
            if self.progress is not None:
                self.progress.finish()
        await self._stop(run_id, "done", None, started)
        return self.result

    def _method(self) -> str:
        return "cross_database" if self.mapping.cross_database else "same_database"

    async def _begin(self) -> None:
        self.high_water = await self.control.fetchval(source_last_key_sql(self.mapping))
        self.result.estimate = await self._estimate()
        await begin_backfill(self.control, self.mapping.name, self.high_water, self.result.estimate)
        _log.info(
            "backfill_started",
            mapping=self.mapping.name,
            high_water=self.high_water,
            estimate=self.result.estimate,
        )

    async def _resume(self, state: BackfillState) -> None:
        self.high_water = await self._canonical(state.high_water)
        self.checkpoint = await self._canonical(state.checkpoint)
        self.result.rows_done, self.result.estimate = state.rows_done, state.rows_estimate
        self.result.resumed = True
        await set_backfill_status(self.control, self.mapping.name, "running")
        _log.info(
            "backfill_resumed",
            mapping=self.mapping.name,
            checkpoint=self.checkpoint,
            rows_done=state.rows_done,
            high_water=self.high_water,
        )

    async def _canonical(self, key: str | None) -> str | None:
        if key is None:
            return None
        return str(await self.control.fetchval("SELECT $1::jsonb::text", key))

    async def _estimate(self) -> int | None:
        if self.high_water is None:
            return 0
        source, _, _ = self.mapping.binding()
        estimate = await self.control.fetchval(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass", source.sql
        )
        if estimate is not None and estimate >= EXACT_COUNT_BELOW:
            return int(estimate)
        p = Params()
        keys = source_keys_sql(self.mapping, upto=p.add(self.high_water, "jsonb"))
        return int(await self.control.fetchval(f"SELECT count(*) FROM ({keys}) AS k", *p.values))

    async def _copy(self) -> None:
        chunk_rows = self.config.backfill.chunk_rows
        while self.high_water is not None:
            await self.throttle.wait_for_calm()
            keys = await self._next_keys(chunk_rows)
            if not keys:
                return
            for batch in batches(keys):
                await self._apply(batch)
            self.checkpoint = keys[-1]

    async def _next_keys(self, limit: int) -> list[str]:
        p = Params()
        after = None if self.checkpoint is None else p.add(self.checkpoint, "jsonb")
        upto = p.add(self.high_water, "jsonb")
        sql = source_keys_sql(
            self.mapping, after=after, upto=upto, limit=p.add(limit, "integer")
        )
        return [r["key"] for r in await self.control.fetch(sql, *p.values)]

    async def _apply(self, batch: list[str]) -> None:
        name = self.mapping.name

        async def checkpoint(conn: asyncpg.Connection) -> None:
            await backfill_checkpoint(conn, name, batch[-1], len(batch))

        result = await apply_keys(
            self.sessions,
            self.mapping,
            batch,
            lock_timeout_ms=self.config.applier.lock_timeout_ms,
            after_apply=checkpoint,
        )
        self.result.rows += len(batch)
        self.result.rows_done += len(batch)
        self.result.upserted += result.upserted
        self.result.deleted += result.deleted
        metrics.BACKFILL_ROWS_COPIED.labels(name).inc(len(batch))
        metrics.BACKFILL_ROWS_DONE.labels(name).set(self.result.rows_done)
        metrics.BACKFILL_PROGRESS.labels(name).set(self._ratio())
        if self.progress is not None:
            self.progress.advance(len(batch))
        await self.throttle.pace(len(batch))

    def _ratio(self) -> float:
        estimate = self.result.estimate
        if not estimate:
            return 0.0
        return min(1.0, self.result.rows_done / estimate)

    async def _stop(self, run_id: int, status: str, error: str | None, started: float) -> None:
        name = self.mapping.name
        self.result.status = status
        self.result.error = error
        self.result.seconds = time.monotonic() - started
        tally = Tally(0, compared=self.result.rows)
        try:
            await set_backfill_status(self.control, name, status)
            await finish_run(
                self.control,
                run_id,
                status,
                tally,
                repaired=self.result.upserted,
                checkpoint=self.checkpoint,
                error=error,
            )
        except Exception as exc:  # the session may be what failed; resume still works
            _log.warning("backfill_record_failed", mapping=name, error=str(exc))
        if status == "done":
            metrics.BACKFILL_PROGRESS.labels(name).set(1.0)
            metrics.BACKFILL_COMPLETE.labels(name).set(1)
        log = _log.info if status == "done" else _log.warning
        log(
            "backfill_" + status,
            mapping=name,
            rows=self.result.rows,
            rows_done=self.result.rows_done,
            upserted=self.result.upserted,
            seconds=round(self.result.seconds, 3),
            error=error,
        )
