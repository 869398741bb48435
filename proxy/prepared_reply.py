"""The extended-protocol reply to a prepared write, as the reply to the simple Query it replaced.

A simple Query answered by PostgreSQL sends RowDescription, DataRow..., CommandComplete and
ReadyForQuery (or an ErrorResponse and ReadyForQuery). The prepared form of the same statement
(Bind, Describe portal, Execute, Sync) adds BindComplete (and NoData for a statement without
rows); those go, and the rest gets the repair every rewritten statement gets
(proxy/reply_repair.py). Errors point where the direct reply points: positions in the shape
text map back to the client's text, and a parameter that failed its type's input function
(reported at Bind with a CONTEXT line naming ``$n``) is reported at its literal's position, as
the parser reports a bad literal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from core import errors
from core.control import ActivityRecorder
from proxy.literals import Known, Parameterized
from proxy.reply_repair import StatementRows, repair_error
from proxy.rewrite import Rewritten, StatementReply
from proxy.wire import messages as m
from proxy.wire.frames import frame, frame_end

#: fields that come after the position in PostgreSQL's ErrorResponse (elog.c's order)
_AFTER_POSITION: Final = frozenset(b"pqWstcdnFLR")
#: the CONTEXT line exec_bind_message adds when a parameter's input function fails
_BIND_PARAMETER: Final = re.compile(
    rb"(?:^|\n)unnamed portal parameter \$([0-9]+)(?: = .*)?$", re.S
)
#: SQLSTATEs after which the prepared statement itself is not to be trusted again:
#: invalid_sql_statement_name (deallocated behind our back), feature_not_supported
#: (cached plan must not change result type)
_BROKEN: Final = frozenset({b"26000", b"0A000"})

_BIND_COMPLETE: Final = frame(b"2", b"")
_CLOSE_COMPLETE: Final = frame(b"3", b"")
_SILENT: Final = frozenset({m.BIND_COMPLETE, m.NO_DATA, m.CLOSE_COMPLETE, m.PARSE_COMPLETE})


class PreparedReply:
    """Shared by the Bind, Describe, Execute and Sync the proxy sent for one simple Query."""

    __slots__ = ("bound", "codec", "on_broken", "params", "rewritten", "rows")

    def __init__(
        self,
        reply: StatementReply,
        rewritten: Rewritten,
        params: Parameterized | Known,
        on_broken: Callable[[bool], None],
        recorder: ActivityRecorder | None = None,
        codec: str = "utf-8",
    ) -> None:
        self.rows = StatementRows(reply, recorder=recorder)
        #: the rewrite of the shape text (its positions are the prepared statement's)
        self.rewritten = rewritten
        #: where the literals were (or how to find out: only an error needs it)
        self.params = params
        #: the client encoding (a Known split's positions are bytes until an error needs them)
        self.codec = codec
        #: called when an error says the prepared statement should go (True: it still exists)
        self.on_broken = on_broken
        self.bound = False

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.DATA_ROW:
            return self.rows.data_row(body)
        if typ == m.COMMAND_COMPLETE:
            return self.rows.command_complete(body)
        if typ == m.ROW_DESCRIPTION:
            return self.rows.row_description(body)
        if typ in _SILENT:
            if typ == m.BIND_COMPLETE:
                self.bound = True
            return b""
        if typ == m.ERROR_RESPONSE:
            return self._error(body, raw)
        return raw  # ReadyForQuery, and the asynchronous messages

    def whole(self, buf: bytes, start: int, ready: int) -> tuple[bytes, int] | None:
        """The usual reply to a write without RETURNING, at once (see tracker.Pending.whole):
        [CloseComplete], BindComplete, RowDescription, DataRow, CommandComplete and
        ReadyForQuery become the CommandComplete the simple Query gets, and ReadyForQuery."""
        pos = start
        if buf.startswith(_CLOSE_COMPLETE, pos):
            pos += 5
        if not buf.startswith(_BIND_COMPLETE, pos):
            return None
        pos += 5
        if buf[pos : pos + 1] != b"T" or pos + 5 > ready:
            return None
        data = frame_end(buf, pos)
        if buf[data : data + 1] != b"D" or data + 5 > ready:
            return None
        done = frame_end(buf, data)
        if buf[done : done + 1] != b"C" or done + 5 > ready:
            return None
        rfq = frame_end(buf, done)
        end = rfq + 6
        if buf[rfq : rfq + 1] != b"Z" or end > ready:
            return None
        self.bound = True
        rows = self.rows
        values = m.data_row_values(buf[data + 5 : done])
        count = values[0]
        rows.count = int(count) if count is not None else 0
        rows.written = [int(v) if v is not None else 0 for v in values[-len(rows.reply.mappings) :]]
        rows.record()
        tag = rows.reply.tag + str(rows.count).encode()
        return frame(b"C", tag + b"\0") + buf[rfq:end], end

    def _error(self, body: bytes, raw: bytes) -> bytes:
        sqlstate = m.error_sqlstate(body)
        if sqlstate in _BROKEN:
            self.on_broken(sqlstate != b"26000")
        repaired = repair_error(body, raw, self.rewritten, self.rows.reply, self.rows.recorder)
        params = self.params
        if isinstance(params, Known):
            params = params.parameterized(self.codec)
        return client_error(repaired, params)


def client_error(frame_bytes: bytes, params: Parameterized) -> bytes:
    """An ErrorResponse about the prepared shape as the one about the client's own text."""
    fields = m.parse_fields(frame_bytes[5:])
    out: list[tuple[int, bytes]] = []
    position: bytes | None = None
    changed = False
    for code, value in fields:
        if code == errors.FIELD_POSITION and value.isdigit():
            mapped = params.original_position(int(value))
            changed = True
            if mapped is not None:
                position = str(mapped).encode()
            continue
        if code == errors.FIELD_CONTEXT:
            match = _BIND_PARAMETER.search(value)
            if match is not None:
                changed = True
                number = int(match.group(1))
                if 1 <= number <= len(params.literals):
                    position = str(params.literal_position(number)).encode()
                rest = value[: match.start()]
                if rest:
                    out.append((code, rest))
                continue
        out.append((code, value))
    if not changed:
        return frame_bytes
    if position is not None:
        at = next((i for i, (code, _) in enumerate(out) if code in _AFTER_POSITION), len(out))
        out.insert(at, (errors.FIELD_POSITION, position))
    return frame(b"E", errors.build_fields(out))
