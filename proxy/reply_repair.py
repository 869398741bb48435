"""Response repair: the client sees exactly what PostgreSQL would have sent for its own statement.

Each plan here answers one client message whose statement was rewritten. It turns the reply to
the rewritten statement back into the reply to the original: the command tag (``UPDATE n``,
``INSERT 0 n``, ``DELETE n`` instead of ``SELECT n``), RowDescription and DataRow trimmed to
the application's own columns, or NoData and no rows when it asked for none, and error
positions mapped back into the original text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core import errors, metrics
from core.control import ActivityRecorder
from proxy.rewrite import REWRITE, Rewritten, StatementReply
from proxy.wire import messages as m
from proxy.wire.frames import frame


def repair_error(
    body: bytes,
    raw: bytes,
    rewritten: Rewritten | None,
    reply: StatementReply | None,
    recorder: ActivityRecorder | None = None,
) -> bytes:
    """An ErrorResponse with its position mapped back; counts failures of the mirror part."""
    fields = m.parse_fields(body)
    if reply is not None and reply.targets:
        schema = next((v for c, v in fields if c == ord("s")), b"")
        table = next((v for c, v in fields if c == ord("t")), None)
        where = (schema.decode("utf-8", "replace"), (table or b"").decode("utf-8", "replace"))
        if table is not None and where in reply.targets:
            for name in reply.mappings:
                metrics.MIRROR_FAILURES.labels(name, "statement").inc()
                if recorder is not None:
                    recorder.mirrored(name, reply.operation, 0, failed=True)
    if rewritten is None:
        return raw
    changed = False
    out: list[tuple[int, bytes]] = []
    for code, value in fields:
        if code == errors.FIELD_POSITION and value.isdigit():
            position = rewritten.original_position(int(value))
            if position is None:
                changed = True
                continue  # it points into text the rewrite added: say nothing rather than lie
            if position != int(value):
                changed = True
                out.append((code, str(position).encode()))
                continue
        out.append((code, value))
    return frame(b"E", errors.build_fields(out)) if changed else raw


def _count_value(value: bytes | None, binary: bool) -> int:
    if value is None:
        return 0
    return int.from_bytes(value, "big", signed=True) if binary else int(value)


#: per StatementReply (by id, with the reply to tell a reused id): each mapping's name and its
#: statements-rewritten and rows-mirrored series
_SERIES: dict[int, tuple[StatementReply, tuple[tuple[str, Any, Any], ...]]] = {}


def _series(reply: StatementReply) -> tuple[tuple[str, Any, Any], ...]:
    found = _SERIES.get(id(reply))
    if found is not None and found[0] is reply:
        return found[1]
    series = tuple(
        (
            name,
            metrics.child(metrics.STATEMENTS_REWRITTEN, name, reply.operation),
            metrics.child(metrics.ROWS_MIRRORED, name, reply.operation),
        )
        for name in reply.mappings
    )
    if len(_SERIES) >= 4096:
        _SERIES.clear()
    _SERIES[id(reply)] = (reply, series)
    return series


def _record_success(
    reply: StatementReply, written: Sequence[int], recorder: ActivityRecorder | None
) -> None:
    for (name, statements, mirrored), rows in zip(_series(reply), written, strict=True):
        statements.inc()
        if rows:
            mirrored.inc(rows)
        if recorder is not None:
            recorder.mirrored(name, reply.operation, rows)


class Counted:
    """Whether one execution's success was recorded (a portal run in several Executes, under
    a row limit, is one execution: counted at its first reply that carries the counts)."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = False


class StatementRows:
    """Repairs the rows and tag of one rewritten statement (shared by Execute and Query).

    The rewritten statement's rows end with one count per mapping of the rows written to its
    target (the same on every row; a no-RETURNING statement's count row has them after the
    count): they are read from the first row and stripped with the other added columns.
    """

    __slots__ = ("binary_count", "count", "counted", "recorder", "reply", "written")

    def __init__(
        self,
        reply: StatementReply,
        *,
        binary_count: bool = False,
        recorder: ActivityRecorder | None = None,
        counted: Counted | None = None,
    ) -> None:
        self.reply = reply
        self.binary_count = binary_count
        self.recorder = recorder
        self.count = 0
        #: rows written to each mapping's target (None until a row carried them)
        self.written: list[int] | None = None
        self.counted = counted or Counted()

    def row_description(self, body: bytes) -> bytes:
        if not self.reply.returning:
            return b""  # the application's statement returns no rows: no RowDescription
        total = m.row_description_count(body)
        return m.trim_row_description(body, total - self.reply.extra_columns)

    def data_row(self, body: bytes) -> bytes:
        if not self.reply.returning:
            values = m.data_row_values(body)
            self.count = _count_value(values[0], self.binary_count)
            self._written(values)
            return b""
        if self.written is None:
            self._written(m.data_row_values(body))
        total = int.from_bytes(body[:2], "big")
        return m.trim_data_row(body, total - self.reply.extra_columns)

    def _written(self, values: list[bytes | None]) -> None:
        mapped = len(self.reply.mappings)
        self.written = [_count_value(v, self.binary_count) for v in values[-mapped:]]

    def command_complete(self, body: bytes) -> bytes:
        tag = m.parse_command_complete(body)
        rows = (m.command_tag_rows(tag) or 0) if self.reply.returning else self.count
        self.record()
        return m.command_complete(self.reply.tag + str(rows).encode())

    def record(self) -> None:
        """Count the statement and the rows written to each target, once per execution."""
        if self.counted.done:
            return
        self.counted.done = True
        _record_success(self.reply, self.written or [0] * len(self.reply.mappings), self.recorder)


class ParseRepair:
    """Parse of a rewritten statement: only a parse-time error needs its position mapped."""

    __slots__ = ("rewritten",)

    def __init__(self, rewritten: Rewritten) -> None:
        self.rewritten = rewritten

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.ERROR_RESPONSE:
            return repair_error(body, raw, self.rewritten, None)
        return raw


class DescribeRepair:
    """Describe (statement or portal) of a rewritten statement: trim or hide its columns."""

    __slots__ = ("reply",)

    def __init__(self, reply: StatementReply) -> None:
        self.reply = reply

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.ROW_DESCRIPTION:
            if not self.reply.returning:
                return m.NO_DATA_MESSAGE
            total = m.row_description_count(body)
            return m.trim_row_description(body, total - self.reply.extra_columns)
        return raw


class ExecuteRepair:
    """Execute of a portal bound to a rewritten statement."""

    __slots__ = ("rewritten", "rows")

    def __init__(
        self,
        reply: StatementReply,
        rewritten: Rewritten,
        *,
        binary_count: bool,
        recorder: ActivityRecorder | None = None,
        counted: Counted | None = None,
    ) -> None:
        self.rows = StatementRows(
            reply, binary_count=binary_count, recorder=recorder, counted=counted
        )
        self.rewritten = rewritten

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.DATA_ROW:
            return self.rows.data_row(body)
        if typ == m.COMMAND_COMPLETE:
            return self.rows.command_complete(body)
        if typ == m.PORTAL_SUSPENDED:
            if not self.rows.reply.returning:
                # A row limit on a statement that returns no rows: the count row was the only
                # one; finish the way the original statement would have.
                return self.rows.command_complete(m.command_complete(b"SELECT 1")[5:])
            # A row limit (asyncpg's fetchrow/fetchval): the statement ran to completion
            # (PostgreSQL runs data-modifying WITH at once), and its first row had the counts.
            self.rows.record()
        if typ == m.ERROR_RESPONSE:
            return repair_error(body, raw, self.rewritten, self.rows.reply, self.rows.recorder)
        return raw


class QueryRepair:
    """A simple Query whose statements were (partly) rewritten: repair statement by statement."""

    __slots__ = ("current", "index", "recorder", "rewritten")

    def __init__(self, rewritten: Rewritten, recorder: ActivityRecorder | None = None) -> None:
        self.rewritten = rewritten
        self.recorder = recorder
        self.index = 0
        self.current = self._rows_for(0)

    def _rows_for(self, index: int) -> StatementRows | None:
        statements = self.rewritten.statements
        if index < len(statements) and statements[index].action == REWRITE:
            reply = statements[index].template.reply
            assert reply is not None
            return StatementRows(reply, recorder=self.recorder)
        return None

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        if typ == m.ERROR_RESPONSE:
            reply = self.current.reply if self.current is not None else None
            return repair_error(body, raw, self.rewritten, reply, self.recorder)
        current = self.current
        if typ == m.COMMAND_COMPLETE:
            out = raw if current is None else current.command_complete(body)
            self.index += 1
            self.current = self._rows_for(self.index)
            return out
        if current is None:
            return raw
        if typ == m.ROW_DESCRIPTION:
            return current.row_description(body)
        if typ == m.DATA_ROW:
            return current.data_row(body)
        return raw
