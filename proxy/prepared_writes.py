"""Simple-protocol writes to mapped tables as server-side prepared statements, one per shape.

In simple protocol PostgreSQL parses, analyses and plans the rewritten statement (the
application's write plus the mirror's CTEs) on every execution. Per connection, this cache
keeps one named prepared statement per statement shape (the text with its literals as ``$n``,
proxy/literals.py, and the parameter types) and runs each write as Bind, Describe, Execute,
Sync with the literals as text parameters; proxy/prepared_reply.py turns the reply back into
the simple Query's.

A shape's Parse is only ever sent when the connection is at rest outside a transaction block
(nothing in flight, status ``I``), in a batch of its own ended by its own Sync, and its replies
are hidden from the client: a Parse that fails (a literal whose unknown type the context does
not resolve, say) then changes nothing, and that shape keeps running as a simple Query. A shape
first seen inside a transaction runs as a simple Query and is prepared at the next rest.

Bounded per connection (``limits.prepared_writes_per_connection``): the least recently used
shape is deallocated (Close) when a new one needs its place. A client's DISCARD ALL or
DEALLOCATE ALL drops the server's statements: the cache forgets them (and closes them, in case
the command failed). An error that says a prepared statement is broken drops it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Final

from core import metrics
from proxy.tracker import Pending
from proxy.wire import messages as m

#: prepared statements of the proxy's own are named with this prefix and a serial number
NAME_PREFIX: Final = b"__dualwrite_w"
WANTED, PARSING, READY, FAILED = "wanted", "parsing", "ready", "failed"

_DROPS_STATEMENTS: Final = re.compile(rb"\b(?:discard|deallocate)\b", re.I)
_FATAL: Final = (b"FATAL", b"PANIC")


def _outcome(name: str) -> None:
    metrics.child(metrics.PREPARED_WRITES, name).inc()


def _ignore(exists: bool) -> None:
    pass


def drops_statements(sql: bytes, lowered: bytes | None = None) -> bool:
    """Could this simple Query deallocate prepared statements (DISCARD ALL, DEALLOCATE ALL)?
    (``lowered``: ``sql.lower()``, when the caller has it.)"""
    if lowered is None:
        lowered = sql.lower()
    if lowered.find(b"discard") < 0 and lowered.find(b"deallocate") < 0:
        return False  # (the expression's search costs more than two finds)
    return _DROPS_STATEMENTS.search(sql) is not None


class PreparedShape:
    """One statement shape of this connection and its prepared statement."""

    __slots__ = ("broken", "key", "kind", "name", "rewritten", "sql", "state", "types")

    def __init__(
        self,
        key: object,
        name: bytes,
        rewritten: object,
        sql: bytes,
        types: tuple[int, ...],
        kind: str = "write",
        broken: Callable[[bool], None] | None = None,
    ) -> None:
        self.key = key
        #: the statement kind its texts count as (proxy.classify.statement_kind)
        self.kind = kind
        #: called when an error says the statement should go (True: it still exists)
        self.broken: Callable[[bool], None] = broken or _ignore
        self.name = name
        #: the rewrite of the shape text (a proxy.rewrite.Rewritten)
        self.rewritten = rewritten
        #: the rewritten shape text, encoded, as sent in the Parse
        self.sql = sql
        self.types = types
        self.state = WANTED


class _Silent:
    """Reply plan for a message of the proxy's own batch: the client sees none of it (but a
    FATAL, which ends the connection, goes through)."""

    __slots__ = ()

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.ERROR_RESPONSE and _is_fatal(body):
            return raw
        return b""


class _ParseOutcome:
    """Reply plan for a shape's Parse: hidden; its success or failure decides the shape."""

    __slots__ = ("cache", "shape")

    def __init__(self, cache: PreparedWrites, shape: PreparedShape) -> None:
        self.cache = cache
        self.shape = shape

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.PARSE_COMPLETE:
            if self.shape.state == PARSING:
                self.shape.state = READY
            _outcome("prepared")
        elif typ == m.ERROR_RESPONSE:
            self.shape.state = FAILED
            _outcome("parse_failed")
            if _is_fatal(body):
                return raw
        return b""


_SILENT: Final = _Silent()


def _is_fatal(body: bytes) -> bool:
    fields = dict(m.parse_fields(body))
    return fields.get(ord("V"), fields.get(ord("S"), b"")) in _FATAL


class PreparedWrites:
    """The prepared shapes of one connection, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.shapes: OrderedDict[object, PreparedShape] = OrderedDict()
        #: shapes to Parse at the next rest
        self.wanted: list[PreparedShape] = []
        #: names of statements to Close at the next chance
        self.to_close: list[bytes] = []
        self._serial = 0

    @property
    def pending(self) -> bool:
        """Work waits for the next Query: a Parse at rest or a Close."""
        return bool(self.wanted or self.to_close)

    def get(self, key: object) -> PreparedShape | None:
        shape = self.shapes.get(key)
        if shape is not None:
            self.shapes.move_to_end(key)
        return shape

    def add(
        self,
        key: object,
        rewritten: object,
        sql: bytes,
        types: tuple[int, ...],
        kind: str = "write",
    ) -> None:
        """A new shape: prepared at the next rest; the least recently used one makes room."""
        self._serial += 1
        name = NAME_PREFIX + str(self._serial).encode()
        shape = PreparedShape(key, name, rewritten, sql, types, kind)
        shape.broken = partial(self._broken, shape)
        self.shapes[key] = shape
        self.wanted.append(shape)
        while len(self.shapes) > self.capacity:
            _, old = self.shapes.popitem(last=False)
            self._drop(old)
            _outcome("evicted")

    def _broken(self, shape: PreparedShape, exists: bool) -> None:
        self.invalidate(shape, exists=exists)

    def invalidate(self, shape: PreparedShape, *, exists: bool) -> None:
        """An error says the statement is broken (or gone): forget it; Close it if it exists."""
        if self.shapes.get(shape.key) is shape:
            del self.shapes[shape.key]
            _outcome("invalidated")
        if exists:
            self._drop(shape)
        elif shape in self.wanted:
            self.wanted.remove(shape)
        shape.state = FAILED

    def forget_all(self) -> None:
        """The client may have deallocated every prepared statement: start over."""
        for shape in self.shapes.values():
            self._drop(shape)
        self.shapes.clear()

    def _drop(self, shape: PreparedShape) -> None:
        if shape.state in (PARSING, READY):
            self.to_close.append(shape.name)
        elif shape.state == WANTED:
            self.wanted.remove(shape)
        shape.state = FAILED

    def housekeeping(
        self, status_at_rest: bytes | None, synced: bool
    ) -> tuple[bytes, list[int | Pending]]:
        """The proxy's own batch to send before the client's next Query, and its entries.

        Closes go out whenever no batch of the client's is open; Parses only at rest outside
        a transaction block, each with its own Sync so that one failing skips no other.
        """
        if not synced:
            return b"", []
        out: list[bytes] = []
        entries: list[int | Pending] = []
        for name in self.to_close:
            out.append(m.build_close(ord("S"), name))
            entries.append(Pending(m.CLOSE, _SILENT))
        self.to_close.clear()
        if status_at_rest == b"I":
            for shape in self.wanted:
                shape.state = PARSING
                out += [m.build_parse(shape.name, shape.sql, shape.types), m.SYNC_MESSAGE]
                entries += [Pending(m.PARSE, _ParseOutcome(self, shape)), Pending(m.SYNC, _SILENT)]
            self.wanted.clear()
        if out and entries[-1].kind != m.SYNC:  # type: ignore[union-attr]
            out.append(m.SYNC_MESSAGE)
            entries.append(Pending(m.SYNC, _SILENT))
        return b"".join(out), entries
