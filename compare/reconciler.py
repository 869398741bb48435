"""One reconcile pass over a mapping: chunks, re-checks, tally, repair, records and metrics.

Passes of one mapping never overlap (a session advisory lock), so any number of sidecars and
cron jobs can ask for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from compare.connections import Sessions, open_sessions
from compare.crossdb import CrossDatabaseDiffer
from compare.findings import Chunk, Recheck, Tally
from compare.progress import Progress
from compare.recording import (
    RunInfo,
    add_findings,
    finish_run,
    record_progress,
    start_run,
    try_lock,
    unlock,
)
from compare.repair import Repairer, RepairTally
from compare.resync import batches
from compare.samedb import SameDatabaseDiffer
from compare.throttle import Throttle
from core import metrics
from core.config import Config
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error

_log = get_logger("reconcile")

#: the run's row is updated at most this often while a pass runs
PROGRESS_RECORD_SECONDS = 1.0


class Differ(Protocol):
    method: str
    recheck_delay: float

    def chunks(self, after: str | None) -> AsyncGenerator[Chunk, None]: ...

    async def recheck(self, keys: Sequence[str]) -> Recheck: ...


def default_requester() -> str:
    """Who asked, when nobody said: the OS user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or f"uid:{os.getuid()}"


@dataclass(frozen=True)
class PassOptions:
    #: limit the pass to one tenant (the mapping's tenant_column)
    tenant: str | None = None
    repair: bool = False
    #: with repair: plan and record, write nothing to the target
    dry_run: bool = False
    requested_by: str = field(default_factory=default_requester)
    sidecar: str | None = None
    #: why the repair is made, kept with it (default: the pass that confirmed the rows)
    reason: str | None = None


@dataclass
class PassResult:
    mapping: str
    method: str
    #: done, failed, interrupted, or busy (another pass of this mapping was running)
    status: str
    tally: Tally
    run_id: int | None = None
    repair: RepairTally | None = None
    dry_run: bool = False
    seconds: float = 0.0
    error: str | None = None

    @property
    def divergent(self) -> int:
        return self.tally.divergent

    @property
    def remaining(self) -> int:
        """Divergent keys left after the pass (and its repair, when it wrote), dead-lettered
        keys included: repair leaves them to the applier's retries, and they are stuck."""
        if self.repair is None or self.dry_run:
            return self.tally.divergent + self.tally.dead_lettered
        return self.repair.remaining + self.tally.dead_lettered


def make_differ(
    config: Config, mapping: CompiledMapping, sessions: Sessions, tenant: str | None
) -> Differ:
    chunk_rows = config.reconcile.chunk_rows
    if sessions.target is None:
        return SameDatabaseDiffer(
            mapping, sessions.source, chunk_rows, tenant, readers=sessions.readers
        )
    return CrossDatabaseDiffer(
        mapping,
        sessions.source,
        sessions.target,
        chunk_rows,
        tenant,
        config.reconcile.recheck_delay_seconds,
    )


async def reconcile_mapping(
    config: Config,
    mapping: CompiledMapping,
    options: PassOptions | None = None,
    *,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> PassResult:
    """Run one pass over ``mapping`` (repairing if asked); the result is also recorded."""
    options = options or PassOptions()
    writes = options.repair and not options.dry_run
    # across databases both servers already work at once: one session each
    workers = 1 if mapping.cross_database else config.reconcile.workers
    readers = workers if workers > 1 else 0
    async with open_sessions(
        config, mapping, role="reconcile", writes_target=writes, readers=readers
    ) as sessions:
        if not await try_lock(sessions.control, "reconcile", mapping.name):
            _log.info("reconcile_busy", mapping=mapping.name)
            method = "cross_database" if mapping.cross_database else "same_database"
            return PassResult(mapping.name, method, "busy", Tally(0))
        try:
            return await _Pass(config, mapping, options, sessions, progress, say).run()
        finally:
            if not sessions.control.is_closed():
                await unlock(sessions.control, "reconcile", mapping.name)


class _Pass:
    """The state of one running pass."""

    def __init__(
        self,
        config: Config,
        mapping: CompiledMapping,
        options: PassOptions,
        sessions: Sessions,
        progress: Progress | None,
        say: Callable[[str], None] | None,
    ) -> None:
        self.config = config
        self.mapping = mapping
        self.options = options
        self.sessions = sessions
        self.progress = progress
        self.say = say
        self.differ = make_differ(config, mapping, sessions, options.tenant)
        self.tally = Tally(config.reconcile.max_samples)
        self.throttle = Throttle(
            mapping.name,
            config.reconcile.rows_per_second,
            config.reconcile.pressure,
            [sessions.control, *([sessions.target] if sessions.target else [])],
            activity="reconcile",
        )
        #: suspect keys waiting for their re-check: (due at, keys)
        self.queue: deque[tuple[float, list[str]]] = deque()
        self.checkpoint: str | None = None
        self.repairer: Repairer | None = None
        self.run_id = 0
        self._recorded_at = time.monotonic()

    async def run(self) -> PassResult:
        started = time.monotonic()
        self.run_id = await start_run(self.sessions.control, self._run_info())
        if self.options.repair:
            self.repairer = self._repairer()
        _log.info(
            "reconcile_started",
            mapping=self.mapping.name,
            run_id=self.run_id,
            method=self.differ.method,
            tenant=self.options.tenant,
        )
        if self.progress is not None:
            self.progress.start(f"reconcile {self.mapping.name}", await self._estimate())
        try:
            await self._scan()
        except asyncio.CancelledError:
            await self._close("interrupted", "cancelled", started)
            raise
        except Exception as exc:
            error = describe_error(exc, self.mapping)
            _log.error("reconcile_failed", mapping=self.mapping.name, error=error)
            return await self._close("failed", error, started)
        finally:
            if self.progress is not None:
                self.progress.finish()
        if self.repairer is not None:
            self.repairer.finish()
        return await self._close("done", None, started)

    def _run_info(self) -> RunInfo:
        return RunInfo(
            mapping=self.mapping.name,
            kind="reconcile",
            method=self.differ.method,
            tenant=self.options.tenant,
            dry_run=self.options.repair and self.options.dry_run,
            sidecar=self.options.sidecar,
            requested_by=self.options.requested_by,
            cutover_tenants=None if self.mapping.cutover is None else self.mapping.cutover.tenants,
        )

    def _repairer(self) -> Repairer:
        return Repairer(
            self.mapping,
            self.sessions,
            self.differ.recheck,
            run_id=self.run_id,
            requested_by=self.options.requested_by,
            dry_run=self.options.dry_run,
            lock_timeout_ms=self.config.applier.lock_timeout_ms,
            reason=self.options.reason,
            say=self.say,
        )

    async def _estimate(self) -> int | None:
        estimate = await self.sessions.source.fetchval(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = $1::regclass",
            self.mapping.binding().source.sql,
        )
        return int(estimate) if estimate and estimate > 0 else None

    async def _scan(self) -> None:
        # With reconcile.workers > 1 (same database) up to that many chunks are compared while
        # this loop records, re-checks and paces; a pause for pressure begins after them.
        await self.throttle.wait_for_calm()
        # aclosing: an error here stops the chunks still being compared, not at GC time
        async with contextlib.aclosing(self.differ.chunks(None)) as chunks:
            async for chunk in chunks:
                self._count(chunk)
                await self._recheck_due(wait=False)
                self.checkpoint = chunk.upto or self.checkpoint
                await self._record_progress()
                await self.throttle.pace(chunk.compared)
                await self.throttle.wait_for_calm()
        await self._recheck_due(wait=True)

    def _count(self, chunk: Chunk) -> None:
        self.tally.compared += chunk.compared
        self.tally.pending += chunk.pending
        self.tally.dead_lettered += chunk.dead_lettered
        metrics.RECONCILE_ROWS_COMPARED.labels(self.mapping.name).inc(chunk.compared)
        if chunk.suspects:
            self.queue.append((time.monotonic() + self.differ.recheck_delay, chunk.suspects))
        if self.progress is not None:
            self.progress.advance(chunk.compared)

    async def _recheck_due(self, *, wait: bool) -> None:
        """Re-check the suspects whose delay has passed (all of them, waiting, with ``wait``)."""
        while self.queue:
            due, keys = self.queue[0]
            delay = due - time.monotonic()
            if delay > 0:
                if not wait:
                    return
                await asyncio.sleep(delay)
            self.queue.popleft()
            for batch in batches(keys):
                await self._recheck(batch)

    async def _recheck(self, keys: list[str]) -> None:
        result = await self.differ.recheck(keys)
        self.tally.pending += result.pending
        self.tally.dead_lettered += result.dead_lettered
        self.tally.resolved += result.resolved
        samples = [d for d in result.confirmed if self.tally.add(d)]
        await add_findings(self.sessions.control, self.run_id, self.mapping.name, samples)
        if self.repairer is not None and result.confirmed:
            await self.repairer.repair(result.confirmed)

    async def _record_progress(self) -> None:
        now = time.monotonic()
        if now - self._recorded_at < PROGRESS_RECORD_SECONDS:
            return
        self._recorded_at = now
        await record_progress(
            self.sessions.control, self.run_id, self.checkpoint, self.tally, self._repaired()
        )

    def _repaired(self) -> int:
        return 0 if self.repairer is None else self.repairer.tally.repaired

    async def _close(self, status: str, error: str | None, started: float) -> PassResult:
        seconds = time.monotonic() - started
        try:
            await finish_run(
                self.sessions.control,
                self.run_id,
                status,
                self.tally,
                repaired=self._repaired(),
                checkpoint=self.checkpoint,
                error=error,
            )
        except Exception as exc:  # the session may be what failed; the run stays 'running'
            _log.warning("reconcile_record_failed", mapping=self.mapping.name, error=str(exc))
        result = PassResult(
            mapping=self.mapping.name,
            method=self.differ.method,
            status=status,
            tally=self.tally,
            run_id=self.run_id,
            repair=None if self.repairer is None else self.repairer.tally,
            dry_run=self.options.dry_run,
            seconds=seconds,
            error=error,
        )
        self._export(result)
        _log.info(
            "reconcile_finished",
            mapping=self.mapping.name,
            run_id=self.run_id,
            status=status,
            seconds=round(seconds, 3),
            resolved=self.tally.resolved,
            repaired=self._repaired(),
            **self.tally.as_dict(),
        )
        return result

    def _export(self, result: PassResult) -> None:
        name = self.mapping.name
        outcome = result.status
        if result.status == "done":
            outcome = "clean" if self.tally.clean else "divergent"
        metrics.RECONCILE_PASSES.labels(name, outcome).inc()
        metrics.RECONCILE_PASS_SECONDS.labels(name).observe(result.seconds)
        if result.status != "done":
            return
        metrics.RECONCILE_PENDING_KEYS.labels(name).set(self.tally.pending)
        if self.options.tenant is not None:
            return  # the last-pass gauges describe full passes only
        now = time.time()
        for cls, count in self.tally.counts.items():
            metrics.LAST_PASS_DIVERGENT_ROWS.labels(name, cls).set(count)
        metrics.LAST_PASS_TIMESTAMP.labels(name).set(now)
        if self.tally.clean:
            metrics.LAST_CLEAN_PASS_TIMESTAMP.labels(name).set(now)
