"""The shadow's tap on the relay: a sampled read is captured into a bounded queue, nothing more.

The relay calls :meth:`ConnectionTap.query` for each simple Query, :meth:`ConnectionTap.parse`
for each Parse and :meth:`ConnectionTap.bind` for each Bind of a statement the tap remembers.
When the sample says no, a call costs one ``random()`` and a comparison. A sampled read is one
tuple put (without waiting) on a bounded multiprocessing queue; the shadow's worker process
(proxy/shadow/worker.py) takes it from there, after the fact, on its own connections and its
own CPU. When the queue is full the read is dropped and counted
(``dualwrite_shadow_statements_total{outcome="dropped"}``), never waited for; fullness is
checked (a semaphore's value) before anything of the read is parsed or copied.

Parse is not sampled: an eligible-looking prepared statement is remembered per connection (a
dict lookup per text, cached) so that each of its executions can be sampled at Bind. A Bind is
read (its statement name, its body copied) only when the sample said yes and the queue has
room; its parameters are decoded by the worker, never here.
"""

from __future__ import annotations

import queue as queue_module
import random
from multiprocessing.queues import Queue
from typing import Any, Final, NamedTuple

from core import metrics
from core.config import ShadowConfig
from proxy.wire import messages as m
from proxy.wire.frames import frame_end

_OUTCOMES = metrics.HOT.shadow_statements
#: named prepared statements remembered per connection (beyond it, the oldest are forgotten)
MAX_PREPARED_PER_CONNECTION: Final = 256
#: statement texts whose prefilter answer is cached
MAX_CACHED_TEXTS: Final = 10_000
_READ_STARTS: Final = (b"select", b"with", b"table", b"values", b"(")


class Capture(NamedTuple):
    """One sampled read, as the application sent it (a tuple: cheap to build on the relay)."""

    sql: bytes
    codec: str
    #: Parse's declared parameter types (None: a simple Query)
    param_types: tuple[int, ...] | None = None
    #: the Bind message's body: parameter formats and values, exactly as sent
    bind: bytes | None = None


class ShadowTap:
    """Every connection's tap: the sample, the prefilter and the one bounded queue."""

    def __init__(self, config: ShadowConfig, captures: Queue[Any] | None = None) -> None:
        self.rate = config.sample_rate
        self.capacity = config.queue
        #: the bounded queue to the shadow's worker process (replaced when a worker dies: a
        #: killed reader may hold the old one's lock); None: no worker yet, all is dropped
        self.queue: Queue[Any] | None = captures
        #: lower-case relation names the views mode looks for (empty: any read, dsn mode)
        self._names = tuple({old.split(".", 1)[1].lower().encode() for old in config.views})
        self._candidates: dict[bytes, bool] = {}
        #: what the native relay loop stops at for this tap to look (b"": every text)
        self.needles: tuple[bytes, ...] = self._names or (b"",)

    def connection(self) -> ConnectionTap:
        return ConnectionTap(self)

    def full(self) -> bool:
        """No room for another capture: the caller drops it and this counts it."""
        captures = self.queue
        if captures is not None and not captures.full():
            return False
        _OUTCOMES["dropped"] += 1
        return True

    def offer(self, capture: Capture) -> None:
        """Queue a sampled read without waiting (the caller checked :meth:`full` first)."""
        captures = self.queue
        try:
            assert captures is not None
            captures.put_nowait(capture)
        except (queue_module.Full, ValueError, AssertionError):
            # full after all, or the queue was closed (a worker being replaced)
            _OUTCOMES["dropped"] += 1

    def depth(self) -> int:
        """Captured reads waiting in the queue (for dualwrite_shadow_queue_depth)."""
        captures = self.queue
        if captures is None:
            return 0
        try:
            return captures.qsize()
        except (NotImplementedError, OSError, ValueError):
            return 0

    def candidate(self, sql: bytes) -> bool:
        """A cheap, cached prefilter: may this text be an eligible read? (The planner decides.)"""
        found = self._candidates.get(sql)
        if found is None:
            found = self._candidates[sql] = self._looks_eligible(sql)
            if len(self._candidates) > MAX_CACHED_TEXTS:
                del self._candidates[next(iter(self._candidates))]
        return found

    def _looks_eligible(self, sql: bytes) -> bool:
        lowered = sql.lstrip().lower()
        if not lowered.startswith(_READ_STARTS):
            return False
        names = self._names
        return not names or any(name in lowered for name in names)


class ConnectionTap:
    """One client connection's tap (its prepared statements live here)."""

    __slots__ = ("codec", "prepared", "rate", "sampled", "tap")

    def __init__(self, tap: ShadowTap) -> None:
        self.tap = tap
        self.rate = tap.rate
        self.codec = "utf-8"
        #: statement name -> (text, declared parameter types), for eligible-looking statements
        self.prepared: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}
        #: the native relay loop already sampled the next simple Query (do not draw again)
        self.sampled = False

    def query(self, sql: bytes) -> None:
        """A simple Query (relay path)."""
        if self.prepared:
            # a simple Query destroys the unnamed prepared statement (protocol docs, Parse);
            # forgetting it lets the session return to the native loop
            self.prepared.pop(b"", None)
        if self.sampled:
            self.sampled = False
        elif random.random() >= self.rate:  # noqa: S311 - a sample, not a secret
            return
        tap = self.tap
        if tap.candidate(sql) and not tap.full():
            tap.offer(Capture(sql, self.codec))

    def parse(self, parse: m.Parse) -> None:
        """A Parse (relay path): remember the statement if it may be an eligible read."""
        prepared = self.prepared
        if self.tap.candidate(parse.sql):
            prepared[parse.name] = (parse.sql, parse.param_types)
            if len(prepared) > MAX_PREPARED_PER_CONNECTION:
                del prepared[next(iter(prepared))]
        elif prepared:
            prepared.pop(parse.name, None)

    def bind(self, statement: bytes, buf: bytes, start: int, end: int) -> None:
        """A Bind whose body is ``buf[start:end]`` (relay path): sample one execution."""
        if random.random() >= self.rate:  # noqa: S311 - a sample, not a secret
            return
        self._capture_bind(statement, buf, start, end)

    def binds(self, buf: bytes, kinds: bytes, starts: list[int]) -> None:
        """A read of Bind/Execute/Sync... frames (relay path): sampled as a whole, so that a
        read the sample skips costs one ``random()``; a sampled read captures each Bind of a
        remembered statement. A sampled read that finds the queue full is dropped (and
        counted) before any of its frames is read."""
        if random.random() >= self.rate or self.tap.full():  # noqa: S311 - a sample
            return
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.BIND:
                end = frame_end(buf, start)
                statement = m.bind_names(buf, start + 5, end)[1]
                found = self.prepared.get(statement)
                if found is not None:
                    body = bytes(buf[start + 5 : end])
                    self.tap.offer(Capture(found[0], self.codec, found[1], body))

    def _capture_bind(self, statement: bytes, buf: bytes, start: int, end: int) -> None:
        found = self.prepared.get(statement)
        tap = self.tap
        if found is not None and not tap.full():
            tap.offer(Capture(found[0], self.codec, found[1], bytes(buf[start:end])))

    def close(self, statement: bytes) -> None:
        self.prepared.pop(statement, None)
