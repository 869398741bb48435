"""Finds PostgreSQL v3 message boundaries in a byte stream, without reading bodies it need not read.

Sans-IO: bytes go in through :meth:`FrameScanner.feed`, boundaries come out; no sockets, no
asyncio. A *frame* is one protocol message: a type byte, a big-endian int32 length that counts
itself, and ``length - 4`` body bytes.

The caller describes, per frame type, what it wants to know with a 256-byte *table*:

    bit 1 (REPORT)  the frame is reported: its type byte in ``kinds``, its offset in ``starts``
    bit 2 (MARK)    the frame is also counted in ``marked`` (e.g. ReadyForQuery, Sync)
    other bits      OR-ed into ``flags`` for reported frames (e.g. "needs a closer look")

Frames of unreported types are not looked at beyond their length: they are simply part of the
forwardable prefix ``buf[:ready]``. That is what lets the relay forward a result set unread,
and what lets it decide in O(1) Python operations per socket read that nothing needs doing.

Frames longer than ``stream_threshold`` whose type is in ``streamable`` (and not reported) are
not buffered whole: what has arrived is forwardable at once, the rest as it arrives. That keeps
a 1 GB DataRow or CopyData from being held in memory by a relay that only forwards it.

The loop runs once per socket read in each direction, so it has a C implementation
(``_speedups.c``); :func:`_scan_python` is the reference it is tested against and the fallback
when the extension is not built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from struct import Struct
from typing import Final

from core.errors import MessageTooLarge

HEADER_SIZE: Final = 5
REPORT: Final = 1
MARK: Final = 2

_LENGTH = Struct("!i")

#: what :meth:`FrameScanner.feed` returns, as a plain tuple (it runs once per socket read):
#: ``(buf, ready, kinds, starts, flags, marked, after_marked, need)`` where
#:   buf           the buffer all offsets refer to (a carried tail, if any, plus the new data)
#:   ready         ``buf[:ready]`` holds only whole frames and pieces of streamed ones
#:   kinds         type bytes of the reported frames, in order; ``starts`` their offsets
#:   flags         OR of the table values of the reported frames
#:   marked        how many reported frames had the MARK bit
#:   after_marked  index into ``kinds`` just after the last marked frame (0 when none)
#:   need          (internal) bytes the next incomplete frame needs in total
Scan = tuple[bytes, int, bytes, list[int], int, int, int, int]


def _scan_python(buf: bytes, pos: int, table: bytes, max_length: int) -> Scan:
    """Reference implementation of the frame loop (see ``_speedups.c`` for the contract)."""
    if pos < 0:
        raise ValueError("pos must not be negative")
    end = len(buf)
    need = HEADER_SIZE
    kinds = bytearray()
    starts: list[int] = []
    flags = marked = after_marked = 0
    unpack = _LENGTH.unpack_from
    while end - pos >= HEADER_SIZE:
        (length,) = unpack(buf, pos + 1)
        if length < 4 or length > max_length:
            return buf, -1, b"", [], 0, 0, 0, length
        stop = pos + 1 + length
        if stop > end:
            need = 1 + length
            break
        typ = buf[pos]
        value = table[typ]
        if value & REPORT:
            starts.append(pos)
            kinds.append(typ)
            flags |= value
            if value & MARK:
                marked += 1
                after_marked = len(kinds)
        pos = stop
    return buf, pos, bytes(kinds), starts, flags, marked, after_marked, need


_scan: Callable[[bytes, int, bytes, int], Scan]
try:
    from proxy.wire._speedups import scan as _scan  # type: ignore[import-not-found,no-redef]

    ACCELERATED = True
except ImportError:  # no compiler at install time: the pure-Python loop, same results
    _scan = _scan_python
    ACCELERATED = False


def type_table(
    report: Iterable[int] = (), *, mark: Iterable[int] = (), **bits: Iterable[int]
) -> bytes:
    """Build a scan table: ``report`` and ``mark`` types, plus named extra flag bits.

    Extra bits are given as ``flag_4=[...]`` style keywords whose suffix is the bit value.
    """
    table = bytearray(256)
    for typ in report:
        table[typ] |= REPORT
    for typ in mark:
        table[typ] |= REPORT | MARK
    for name, types in bits.items():
        bit = int(name.rpartition("_")[2])
        for typ in types:
            table[typ] |= REPORT | bit
    return bytes(table)


class FrameScanner:
    """Splits a stream into frames; keeps only an incomplete tail between feeds."""

    __slots__ = (
        "_carry",
        "_max_length",
        "_need",
        "_stream_left",
        "stream_threshold",
        "streamable",
        "table",
    )

    def __init__(
        self,
        table: bytes,
        *,
        max_length: int | None = None,
        streamable: frozenset[int] = frozenset(),
        stream_threshold: int = 65536,
    ) -> None:
        #: the incomplete tail; a bytearray so a large frame arriving in pieces costs O(n)
        self._carry = bytearray()
        #: how many bytes ``_carry`` must hold before another frame can complete
        self._need = 0
        self._max_length = max_length or 0x7FFFFFFF
        #: body bytes still to come for a frame being streamed (0 when none)
        self._stream_left = 0
        #: what to report about each frame type (see the module docstring)
        self.table = table
        self.streamable = streamable
        self.stream_threshold = stream_threshold

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._carry)

    @property
    def mid_frame(self) -> bool:
        """True while a frame has started but not finished (streamed or buffered)."""
        return self._stream_left > 0 or bool(self._carry)

    def feed(self, data: bytes) -> Scan:
        """Add ``data`` and report the frames it completes (see :data:`Scan`).

        Raises :class:`MessageTooLarge` for a length below 4 or above ``max_length``; the
        stream cannot be resynchronised after that, so the caller must close it.
        """
        if self._stream_left or self._carry:
            return self._feed_continued(data)
        found = _scan(data, 0, self.table, self._max_length)
        if found[1] == len(data):
            return found  # the common case: whole frames only
        return self._settle(found)

    def _feed_continued(self, data: bytes) -> Scan:
        """``data`` continues a frame begun in an earlier feed."""
        if self._stream_left:
            take = min(self._stream_left, len(data))
            self._stream_left -= take
            if take == len(data):
                return (data, take, b"", [], 0, 0, 0, 0)
            return self._settle(_scan(data, take, self.table, self._max_length))
        self._carry += data
        if len(self._carry) < self._need:
            return (b"", 0, b"", [], 0, 0, 0, 0)
        buf = bytes(self._carry)
        self._carry = bytearray()
        found = _scan(buf, 0, self.table, self._max_length)
        return found if found[1] == len(buf) else self._settle(found)

    def _settle(self, found: Scan) -> Scan:
        """Deal with what follows the last whole frame: an error, a streamed or a carried frame."""
        buf, ready, kinds, starts, flags, marked, after, need = found
        if ready < 0:
            raise MessageTooLarge(need, self._max_length)
        end = len(buf)
        if ready < end:
            typ = buf[ready]
            if (
                need > self.stream_threshold + 1
                and typ in self.streamable
                and not self.table[typ] & REPORT
            ):
                self._stream_left = ready + need - end
                ready = end
            else:
                self._need = need
                self._carry = bytearray(buf[ready:])
        return (buf, ready, kinds, starts, flags, marked, after, need)


def frame_end(buf: bytes, start: int) -> int:
    """Offset just past the frame starting at ``start``."""
    return start + 1 + int(_LENGTH.unpack_from(buf, start + 1)[0])


def frame(typ: bytes, body: bytes) -> bytes:
    """Build one frame from its type byte and body."""
    return typ + (len(body) + 4).to_bytes(4, "big") + body
