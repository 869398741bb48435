"""Traffic recording beside the relay: statement texts noted on the hot path, analysed later.

The relay's only work per statement is a dict lookup (and a deque append for a text not seen
before): :meth:`ConnectionTraffic.query` and :meth:`ConnectionTraffic.parse`. A background task
drains the bounded queue in small batches, parses and fingerprints each new text
(``core.traffic.analyse``) and remembers the result per text. When the queue is full a text is
dropped and counted, never waited for; lint then says the evidence has a gap. Every
``traffic.flush_interval_seconds`` the counts are written to the control schema.

A statement prepared on a connection that is still open may be executed at any time without
its text crossing the proxy again (Bind/Execute name it), so it counts as seen at every flush
while its connection lives.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque

import asyncpg
from pglast.parser import ParseError, fingerprint

from core import metrics
from core.config import TrafficConfig
from core.logs import get_logger
from core.traffic import StatementShape, TrafficLog, analyse, flush

_log = get_logger("traffic")
_COUNTS = metrics.HOT.traffic_statements
#: texts analysed before the drainer yields to the relay again (a new text costs about 8 µs
#: when its shape is known, 150 µs when it must be parsed into a tree)
BATCH = 16
#: named prepared statements remembered per connection (beyond it, the oldest are forgotten)
MAX_PREPARED_PER_CONNECTION = 1000


class ConnectionTraffic:
    """One client connection's view of the recorder (its prepared statements live here)."""

    __slots__ = ("__weakref__", "codec", "prepared", "recorder")

    def __init__(self, recorder: TrafficRecorder) -> None:
        self.recorder = recorder
        self.codec = "utf-8"
        #: statement name -> text, for named statements prepared on this connection
        self.prepared: dict[bytes, bytes] = {}

    def query(self, sql: bytes) -> None:
        """A simple Query's text (hot path)."""
        self.recorder.note(sql, self.codec)

    def parse(self, name: bytes, sql: bytes) -> None:
        """A Parse message (hot path)."""
        self.recorder.note(sql, self.codec)
        if name:
            prepared = self.prepared
            prepared[name] = sql
            if len(prepared) > MAX_PREPARED_PER_CONNECTION:
                del prepared[next(iter(prepared))]


class TrafficRecorder:
    """Every sidecar's traffic evidence: noted on the hot path, analysed and flushed later."""

    def __init__(self, config: TrafficConfig, sidecar: str) -> None:
        self.config = config
        self.log = TrafficLog(sidecar)
        self.started_at = time.time()
        #: text -> its statements' shapes (None: queued, not analysed yet)
        self._shapes: dict[bytes, tuple[StatementShape, ...] | None] = {}
        #: text -> times seen since the last flush
        self._seen: dict[bytes, int] = {}
        #: PostgreSQL's fingerprint of a whole text -> its shapes: texts that differ only in
        #: their literals are fingerprinted (in C) instead of parsed into a tree again
        self._by_fingerprint: dict[str, tuple[StatementShape, ...]] = {}
        self._queue: deque[tuple[bytes, str]] = deque()
        self._wake = asyncio.Event()
        self._connections: weakref.WeakSet[ConnectionTraffic] = weakref.WeakSet()
        self._tasks: list[asyncio.Task[None]] = []

    def connection(self) -> ConnectionTraffic:
        traffic = ConnectionTraffic(self)
        self._connections.add(traffic)
        return traffic

    # --- the hot path ---------------------------------------------------------------------

    def note(self, sql: bytes, codec: str) -> None:
        seen = self._seen
        seen[sql] = seen.get(sql, 0) + 1
        if sql in self._shapes:
            _COUNTS["cached"] += 1
            return
        if len(self._queue) >= self.config.queue_size:
            _COUNTS["dropped"] += 1
            del seen[sql]
            self.log.drop()
            return
        self._shapes[sql] = None
        self._queue.append((sql, codec))
        _COUNTS["queued"] += 1
        self._wake.set()

    # --- off the hot path -----------------------------------------------------------------

    def analyse_pending(self, limit: int = BATCH) -> int:
        """Analyse up to ``limit`` queued texts; how many were analysed."""
        done = 0
        while self._queue and done < limit:
            sql, codec = self._queue.popleft()
            try:
                shapes = self._analyse(sql.decode(codec, "replace"))
            except Exception as exc:  # never let one statement stop the recording
                _log.warning("traffic_analysis_failed", error=f"{type(exc).__name__}: {exc}")
                self.log.drop()
                shapes = ()
            self._remember(sql, shapes)
            done += 1
        return done

    def _analyse(self, text: str) -> tuple[StatementShape, ...]:
        try:
            key = fingerprint(text)
        except ParseError:
            return ()
        shapes = self._by_fingerprint.get(key)
        if shapes is None:
            shapes = self._by_fingerprint[key] = tuple(analyse(text))
            if len(self._by_fingerprint) > self.config.cache_size:
                del self._by_fingerprint[next(iter(self._by_fingerprint))]
        return shapes

    def _remember(self, sql: bytes, shapes: tuple[StatementShape, ...]) -> None:
        cache = self._shapes
        cache[sql] = shapes
        while len(cache) > self.config.cache_size:
            oldest = next(iter(cache))
            if cache[oldest] is None:
                break  # still queued: keep it
            del cache[oldest]

    def collect(self) -> None:
        """Move what was seen since the last call into the log (texts not analysed yet stay)."""
        now = time.time()
        seen, self._seen = self._seen, {}
        for sql, count in seen.items():
            shapes = self._shapes.get(sql)
            if shapes is None:
                if sql in self._shapes:  # queued: count it once it is analysed
                    self._seen[sql] = self._seen.get(sql, 0) + count
                continue
            for shape in shapes:
                self.log.saw(shape, count, now)
        for connection in list(self._connections):
            for sql in connection.prepared.values():
                if sql not in self._shapes:  # forgotten by the cache: analyse it again
                    self.note(sql, connection.codec)
                    self._seen.pop(sql, None)
                for shape in self._shapes.get(sql) or ():
                    self.log.saw(shape, 0, now)

    async def flush(self, conn: asyncpg.Connection) -> None:
        """Write what was seen (kept for the next flush if the write fails)."""
        self.analyse_pending(limit=len(self._queue))
        self.collect()
        taken = self.log.take()
        if not taken.seen and not taken.dropped:
            return
        try:
            await flush(
                conn,
                taken,
                started_at=self.started_at,
                max_fingerprints=self.config.max_fingerprints,
            )
        except BaseException:
            self.log.put_back(taken)
            raise

    async def start(self, pool: asyncpg.Pool) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._drain(), name="traffic-analyse"),
            loop.create_task(self._flush_loop(pool), name="traffic-flush"),
        ]

    async def stop(self, pool: asyncpg.Pool | None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if pool is not None:
            await self._flush_with(pool)

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.analyse_pending() and self._queue:
                self._wake.set()  # more queued: come back once the relay has had its turn
                await asyncio.sleep(0)

    async def _flush_loop(self, pool: asyncpg.Pool) -> None:
        while True:
            await asyncio.sleep(self.config.flush_interval_seconds)
            await self._flush_with(pool)

    async def _flush_with(self, pool: asyncpg.Pool) -> None:
        try:
            async with pool.acquire() as conn:
                await self.flush(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _log.warning("traffic_flush_failed", error=str(exc))
