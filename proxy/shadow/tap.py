"""The shadow's tap on the relay: a sampled read is captured into a bounded queue, nothing more.

The relay calls :meth:`ConnectionTap.query` for each simple Query, :meth:`ConnectionTap.parse`
for each Parse and :meth:`ConnectionTap.bind` for each Bind of a statement the tap remembers.
When the sample says no, a call costs one ``random()`` and a comparison. A sampled read is one
tuple appended to a deque; the replay (proxy/shadow/replay.py) takes it from there, after the
fact and on its own connections. When the queue is full the read is dropped and counted
(``dualwrite_shadow_statements_total{outcome="dropped"}``), never waited for.

Parse is not sampled: an eligible-looking prepared statement is remembered per connection (a
dict lookup per text, cached) so that each of its executions can be sampled at Bind.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import Final, NamedTuple

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

    def __init__(self, config: ShadowConfig) -> None:
        self.rate = config.sample_rate
        self.capacity = config.queue
        self.queue: deque[Capture] = deque()
        self.wake = asyncio.Event()
        #: lower-case relation names the views mode looks for (empty: any read, dsn mode)
        self._names = tuple({old.split(".", 1)[1].lower().encode() for old in config.views})
        self._candidates: dict[bytes, bool] = {}

    def connection(self) -> ConnectionTap:
        return ConnectionTap(self)

    def full(self) -> bool:
        """No room for another capture: the caller drops it and this counts it."""
        if len(self.queue) < self.capacity:
            return False
        _OUTCOMES["dropped"] += 1
        return True

    def offer(self, capture: Capture) -> None:
        """Queue a sampled read (the caller checked :meth:`full` first)."""
        self.queue.append(capture)
        wake = self.wake
        if not wake.is_set():
            wake.set()

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

    __slots__ = ("codec", "prepared", "rate", "tap")

    def __init__(self, tap: ShadowTap) -> None:
        self.tap = tap
        self.rate = tap.rate
        self.codec = "utf-8"
        #: statement name -> (text, declared parameter types), for eligible-looking statements
        self.prepared: dict[bytes, tuple[bytes, tuple[int, ...]]] = {}

    def query(self, sql: bytes) -> None:
        """A simple Query (relay path)."""
        if random.random() >= self.rate:  # noqa: S311 - a sample, not a secret
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
        remembered statement."""
        if random.random() >= self.rate:  # noqa: S311 - a sample, not a secret
            return
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.BIND:
                end = frame_end(buf, start)
                statement = m.bind_names(buf, start + 5, end)[1]
                self._capture_bind(statement, buf, start + 5, end)

    def _capture_bind(self, statement: bytes, buf: bytes, start: int, end: int) -> None:
        found = self.prepared.get(statement)
        tap = self.tap
        if found is not None and not tap.full():
            tap.offer(Capture(found[0], self.codec, found[1], bytes(buf[start:end])))

    def close(self, statement: bytes) -> None:
        self.prepared.pop(statement, None)
