"""Shadow sessions: captured reads replayed on the shadow's own connections and judged.

Views mode (same database): one ``REPEATABLE READ READ ONLY`` transaction runs the original,
then the rewrite onto the views, then the original again, each under a savepoint so that one
failing does not end the others. All three see one snapshot, so concurrent writes cannot
make them differ; the second original is the A/A noise baseline. DSN mode: the statement runs
unchanged on the other server while the primary runs the A/A pair.

A statement with parameters is replayed as ``PREPARE`` (with the types the application
declared) and ``EXECUTE`` with the values as literals (proxy/shadow/params.py). Replays start
at most ``max_replays_per_second``; meanwhile the tap's bounded queue fills and drops. All of it
runs in the shadow's worker process (proxy/shadow/worker.py), so a replay's CPU is never spent
on the relay's event loop. A shadow server that is down costs the relay nothing: its captures
are counted as errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Final

import asyncpg

from core import shadow as results
from core.config import ShadowConfig
from core.errors import DatabaseUnreachable, ProtocolViolation
from core.logs import get_logger
from proxy.shadow.compare import (
    ERROR,
    MATCH,
    MISMATCH,
    NOISE,
    Answer,
    Verdict,
    judge,
    tenants_of,
)
from proxy.shadow.params import UnsupportedParameter, literals, needs_types, text_of
from proxy.shadow.plan import Planner, ShadowPlan
from proxy.shadow.tap import Capture
from proxy.wire import messages as m

_log = get_logger("shadow")
_OLD, _NEW = "dw_shadow_old", "dw_shadow_new"
#: seconds a worker waits before connecting again after a failure
RECONNECT_SECONDS: Final = 1.0
#: statement shapes remembered as non-deterministic
MAX_NOISY_SHAPES: Final = 10_000

Connect = Callable[[], Awaitable[asyncpg.Connection]]
#: the next captured read (waits for one)
NextCapture = Callable[[], Awaitable[Capture]]
#: one judged replay: its outcome and, for a match or mismatch, the new/old latency ratio
OnVerdict = Callable[[str, "float | None"], None]


class ShadowReplayer:
    """Workers (one connection each, at most ``max_sessions``) draining the captured reads.

    It runs in the shadow's worker process (proxy/shadow/worker.py), never on the relay's
    event loop: ``next_capture`` takes the next capture from the bounded queue the relay
    fills, ``on_verdict`` reports each outcome (and latency ratio) for the metrics, which the
    worker ships to the sidecar, and :meth:`flush` writes the results to the control schema.
    """

    def __init__(
        self,
        config: ShadowConfig,
        next_capture: NextCapture,
        planner: Planner,
        connect_primary: Connect,
        connect_other: Connect | None = None,
        *,
        connect_service: Connect | None = None,
        on_verdict: OnVerdict | None = None,
    ) -> None:
        self.config = config
        self.next_capture = next_capture
        self.planner = planner
        self.connect_primary = connect_primary
        self.connect_other = connect_other
        self.connect_service = connect_service
        self.on_verdict = on_verdict
        self.log = results.ShadowLog()
        self.reveal = frozenset(config.reveal_columns)
        self._interval = 1.0 / config.max_replays_per_second
        self._next_start = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._service: asyncpg.Connection | None = None
        self._flushing = asyncio.Lock()
        #: fingerprints whose A/A pair once differed: their differences are noise from then on
        self._noisy: set[str] = set()

    async def start(self) -> None:
        """Start the workers and (with a service connection) the flusher."""
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._worker(), name=f"shadow-{n}")
            for n in range(self.config.max_sessions)
        ]
        if self.connect_service is not None:
            self._tasks.append(loop.create_task(self._flush_loop(), name="shadow-flush"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.flush()
        await _discard(self._service)
        self._service = None

    async def flush(self) -> None:
        """Write what was judged since the last flush to the control schema."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        shapes, tenants = self.log.take()
        if not (shapes or tenants) or self.connect_service is None:
            return
        try:
            if self._service is None or self._service.is_closed():
                self._service = await self.connect_service()
            await results.flush(self._service, shapes, tenants)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, DatabaseUnreachable) as exc:
            _log.warning("shadow_flush_failed", error=str(exc), shapes=len(shapes))
            await _discard(self._service)
            self._service = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_seconds)
            await self.flush()

    # --- workers ----------------------------------------------------------------------------

    async def _pace(self) -> None:
        """Start at most max_replays_per_second replays, across all workers."""
        now = time.monotonic()
        start = max(now, self._next_start)
        self._next_start = start + self._interval
        if start > now:
            await asyncio.sleep(start - now)

    async def _worker(self) -> None:
        primary: asyncpg.Connection | None = None
        other: asyncpg.Connection | None = None
        try:
            while True:
                await self._pace()
                capture = await self.next_capture()
                plan = self.planner.plan(capture.sql.decode(capture.codec, "surrogateescape"))
                if plan is None:
                    continue
                try:
                    if primary is None or primary.is_closed():
                        primary = await self.connect_primary()
                    if self.connect_other is not None and (other is None or other.is_closed()):
                        other = await self.connect_other()
                    verdict, latency = await self.replay(primary, other, plan, capture)
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    self._record(plan, Verdict(ERROR, {"replay": type(exc).__name__}), None)
                    _log.warning("shadow_replay_failed", error=str(exc))
                    await _discard(primary)
                    await _discard(other)
                    primary = other = None
                    await asyncio.sleep(RECONNECT_SECONDS)
                    continue
                self._record(plan, verdict, latency)
        finally:
            await _discard(primary)
            await _discard(other)

    def _record(
        self, plan: ShadowPlan, verdict: Verdict, latency: tuple[float, float] | None
    ) -> None:
        sample = None
        if verdict.outcome != MATCH:
            sample = {"statement": plan.normalized, **(verdict.diff or {})}
        ratio = None
        if latency is not None and verdict.outcome in (MATCH, MISMATCH):
            if latency[0] > 0:
                ratio = latency[1] / latency[0]
        else:
            latency = None
        tenants = verdict.tenants
        if tenants is None and self.planner.tenant_columns:
            tenants = (plan.tenant,) if plan.tenant is not None else ()
        self.log.add(plan.fingerprint, plan.normalized, verdict.outcome, sample, latency, tenants)
        if self.on_verdict is not None:
            self.on_verdict(verdict.outcome, ratio)

    # --- one replay -------------------------------------------------------------------------

    async def replay(
        self,
        primary: asyncpg.Connection,
        other: asyncpg.Connection | None,
        plan: ShadowPlan,
        capture: Capture,
    ) -> tuple[Verdict, tuple[float, float] | None]:
        """Run the original twice and the new side once; judge the three answers."""
        timeout = self.config.statement_timeout_ms
        try:
            async with _read_only(primary, timeout):
                old = await _Statement.prepare(primary, _OLD, plan.original, capture)
                try:
                    first = await old.run()
                    if other is None:
                        assert plan.rewritten is not None
                        new = await old.sibling(primary, _NEW, plan.rewritten)
                        second = await new.run()
                        await new.close()
                    else:
                        second = await self._on_other(other, plan, capture, old.types)
                    again = await old.run()
                finally:
                    await old.close()
        except UnsupportedParameter as exc:
            return Verdict(ERROR, {"parameters": str(exc)}), None
        if plan.fingerprint in self._noisy:
            plan = replace(plan, deterministic=False)
        verdict = judge(plan, first, second, again, self.reveal)
        if verdict.outcome == NOISE and len(self._noisy) < MAX_NOISY_SHAPES:
            self._noisy.add(plan.fingerprint)
        columns = self.planner.tenant_columns
        if columns:
            named = _named_tenant(plan, capture, old.types)
            tenants = tenants_of(
                verdict.outcome, first, second, columns, named, results.MAX_TENANTS_PER_REPLAY
            )
            verdict = replace(verdict, tenants=tenants)
        return verdict, (first.seconds, second.seconds)

    async def _on_other(
        self,
        other: asyncpg.Connection,
        plan: ShadowPlan,
        capture: Capture,
        types: list[str] | None,
    ) -> Answer:
        async with _read_only(other, self.config.statement_timeout_ms):
            new = await _Statement.prepare(other, _NEW, plan.original, capture, types=types)
            try:
                return await new.run()
            finally:
                await new.close()


class _Statement:
    """One side's statement on one connection: PREPAREd when it has parameters."""

    def __init__(
        self, conn: asyncpg.Connection, name: str, query: str, types: list[str] | None
    ) -> None:
        self.conn = conn
        self.name = name
        #: what runs it: the text itself, or EXECUTE name(literals)
        self.query = query
        self.types = types
        self.prepared = False
        self.capture: Capture | None = None
        self.failed: Answer | None = None

    @classmethod
    async def prepare(
        cls,
        conn: asyncpg.Connection,
        name: str,
        sql: str,
        capture: Capture,
        *,
        types: list[str] | None = None,
    ) -> _Statement:
        if capture.bind is None:
            return cls(conn, name, sql, None)
        statement = cls(conn, name, sql, types)
        statement.capture = capture
        await statement._prepare(sql)
        return statement

    async def sibling(self, conn: asyncpg.Connection, name: str, sql: str) -> _Statement:
        """The same parameters for another text (the rewrite)."""
        if self.capture is None:
            return _Statement(conn, name, sql, None)
        statement = _Statement(conn, name, sql, self.types)
        statement.capture = self.capture
        await statement._prepare(sql)
        return statement

    async def _prepare(self, sql: str) -> None:
        capture = self.capture
        assert capture is not None
        assert capture.bind is not None
        try:
            formats, values = m.bind_parameters(capture.bind)
        except ProtocolViolation as exc:
            raise UnsupportedParameter(str(exc)) from None
        declared = await _type_names(self.conn, capture.param_types or ())
        head = f"PREPARE {self.name}" + (f" ({', '.join(declared)})" if declared else "")
        try:
            async with self.conn.transaction():
                await self.conn.execute(f"{head} AS {sql}")
        except asyncpg.PostgresError as exc:
            self.failed = Answer(sqlstate=exc.sqlstate)
            return
        self.prepared = True
        if self.types is None and needs_types(formats):
            self.types = await self.conn.fetchval(
                "SELECT parameter_types::text[] FROM pg_prepared_statements WHERE name = $1",
                self.name,
            )
        args = literals(formats, values, self.types or [], capture.codec)
        self.query = f"EXECUTE {self.name}({', '.join(args)})" if args else f"EXECUTE {self.name}"

    async def run(self) -> Answer:
        if self.failed is not None:
            return self.failed
        started = time.perf_counter()
        try:
            async with self.conn.transaction():
                statement = await self.conn.prepare(self.query)
                rows = await statement.fetch()
                columns = tuple((a.name, a.type.name) for a in statement.get_attributes())
        except asyncpg.PostgresError as exc:
            return Answer(sqlstate=exc.sqlstate, seconds=time.perf_counter() - started)
        return Answer(
            columns=columns,
            rows=tuple(tuple(row) for row in rows),
            seconds=time.perf_counter() - started,
        )

    async def close(self) -> None:
        if self.prepared:
            await self.conn.execute(f"DEALLOCATE {self.name}")
            self.prepared = False


def _named_tenant(plan: ShadowPlan, capture: Capture, types: list[str] | None) -> str | None:
    """The tenant the statement's WHERE names: a constant, or the value of its parameter."""
    if plan.tenant is not None:
        return plan.tenant
    number = plan.tenant_parameter
    if number is None or capture.bind is None:
        return None
    try:
        formats, values = m.bind_parameters(capture.bind)
        value = values[number - 1]
        if value is None:
            return None
        kind = types[number - 1] if types and number <= len(types) else "unknown"
        return text_of(formats[number - 1], value, kind, capture.codec)
    except (ProtocolViolation, UnsupportedParameter, IndexError, ValueError):
        return None


async def _type_names(conn: asyncpg.Connection, oids: tuple[int, ...]) -> list[str]:
    """PREPARE's type list for Parse's declared types (0, undeclared, is ``unknown``)."""
    if not oids:
        return []
    names = await conn.fetchval(
        "SELECT array_agg(CASE WHEN t = 0 THEN 'unknown' ELSE format_type(t, NULL) END "
        "ORDER BY n) FROM unnest($1::oid[]) WITH ORDINALITY AS u(t, n)",
        list(oids),
    )
    return list(names)


@contextlib.asynccontextmanager
async def _read_only(conn: asyncpg.Connection, timeout_ms: int):  # type: ignore[no-untyped-def]
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        yield


async def _discard(conn: asyncpg.Connection | None) -> None:
    if conn is not None:
        with contextlib.suppress(Exception):
            await conn.close(timeout=1.0)


__all__ = ["ShadowReplayer"]
