"""What the proxy does with each client message it looks at: count it, rewrite it, or refuse it.

Owns the per-connection registry of prepared statements and portals that were rewritten, so
that a Bind, Describe or Execute naming one gets its reply repaired; and the extended-protocol
rejection dance: a refused Parse is answered by the proxy, the rest of the pipeline up to Sync
is discarded (as the server itself would after an error), and at Sync a statement that raises
is sent in its place so the server's transaction state matches what the client was told.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Final

from core import metrics
from core.control import ActivityRecorder
from core.errors import STATEMENT_REJECTED
from core.sqllex import lexes_alike
from proxy.classify import statement_kind
from proxy.lexing import AMBIGUOUS, SessionLexing
from proxy.literals import (
    FAST_CODECS,
    Known,
    Parameterized,
    parameterize,
    remember_known,
    split_known,
)
from proxy.prepared_reply import PreparedReply
from proxy.prepared_writes import READY, PreparedShape, PreparedWrites, drops_statements
from proxy.reply_repair import (
    Counted,
    DescribeRepair,
    ExecuteRepair,
    ParseRepair,
    QueryRepair,
)
from proxy.rewrite import (
    REJECT,
    REWRITE,
    UNMIRRORED,
    Rewriter,
    Rewritten,
    StatementPlan,
    reject_message,
)
from proxy.shadow.tap import ConnectionTap, ShadowTap
from proxy.tracker import Pending, ResponseTracker
from proxy.traffic import ConnectionTraffic, TrafficRecorder
from proxy.wire import messages as m
from proxy.wire.frames import frame_end

#: PostgreSQL encoding names whose Python codec name differs
_ENCODINGS: Final = {
    "UTF8": "utf-8",
    "SQL_ASCII": "latin-1",
    "LATIN1": "latin-1",
    "LATIN9": "iso8859-15",
    "WIN1252": "cp1252",
    "EUC_JP": "euc_jp",
    "SJIS": "shift_jis",
    "BIG5": "big5",
    "GBK": "gbk",
    "UHC": "cp949",
}

_STATEMENT_COUNTS = metrics.HOT.statements
_EXECUTED: Final = metrics.child(metrics.PREPARED_WRITES, "executed")
_DESCRIBE_UNNAMED_PORTAL: Final = m.build_describe(ord("P"), b"")
_EXECUTE_UNNAMED_PORTAL: Final = m.build_execute(b"", 0)
_DESCRIBE_EXECUTE_SYNC: Final = _DESCRIBE_UNNAMED_PORTAL + _EXECUTE_UNNAMED_PORTAL + m.SYNC_MESSAGE
_CLOSE_UNNAMED_STATEMENT: Final = m.build_close(ord("S"), b"")
#: transaction statuses a prepared write may run in (idle, in a transaction block)
_LIVE: Final = (b"I", b"T")


def _prepared_outcome(outcome: str) -> None:
    metrics.child(metrics.PREPARED_WRITES, outcome).inc()


def python_codec(pg_encoding: str) -> str:
    """The Python codec for a PostgreSQL client_encoding (UTF-8 when unknown)."""
    name = _ENCODINGS.get(pg_encoding.upper(), "")
    if name:
        return name
    try:
        return codecs.lookup(pg_encoding).name
    except LookupError:
        return "utf-8"


@dataclass(frozen=True)
class Prepared:
    """A prepared statement whose text concerns a mapping."""

    rewritten: Rewritten
    plan: StatementPlan
    #: the application's own text and parameter types, to prepare it again if needed
    sql: bytes
    param_types: tuple[int, ...]
    #: mapping-state version the rewrite was planned under
    version: int
    #: standard_conforming_strings when the server parsed it (how its text reads); None when
    #: that could not be known and mattered (the statement got the unsupported policy)
    standard: bool | None = True


class Portal:
    """A portal bound to a prepared statement that concerns a mapping (made per Bind: a plain
    slotted class, cheaper to make than a frozen dataclass)."""

    __slots__ = ("binary", "counted", "statement")

    def __init__(self, statement: Prepared, *, binary: bool) -> None:
        self.statement = statement
        #: the result format of the columns the rewrite added is binary (one format code, 1)
        self.binary = binary
        #: its execution was counted (a portal run under a row limit takes several Executes)
        self.counted = Counted()


class Frontend:
    """The per-connection logic for client messages that expect a reply."""

    def __init__(
        self,
        rewriter: Rewriter | None,
        recorder: ActivityRecorder | None,
        *,
        statement_log: Any = None,
        traffic: TrafficRecorder | None = None,
        prepared_writes: int = 256,
        shadow: ShadowTap | None = None,
    ) -> None:
        self.rewriter = rewriter
        self.recorder = recorder
        #: notes statement texts for the traffic evidence (None: not recorded)
        self.traffic: ConnectionTraffic | None = traffic.connection() if traffic else None
        #: samples reads for the shadow replay (None: shadow reads are off)
        self.shadow: ConnectionTap | None = shadow.connection() if shadow else None
        #: a logger when statement text may be logged (debug level and log_statements only)
        self.statement_log = statement_log
        self.codec = "utf-8"
        #: statements of a known shape may be split without a parse (proxy/literals.py)
        self.known_shapes = True
        self.lexing = SessionLexing()
        self.statements: dict[bytes, Prepared] = {}
        self.portals: dict[bytes, Portal] = {}
        #: after the proxy refused a Parse, drop client messages until Sync
        self.discarding = False
        #: the connection's tracker, set by whoever owns it: without it the proxy cannot tell
        #: when the connection is at rest, and writes are never prepared
        self.tracker: ResponseTracker | None = None
        #: simple-protocol writes to mapped tables as prepared statements (None: off)
        self.prepared_writes = (
            PreparedWrites(prepared_writes) if rewriter is not None and prepared_writes else None
        )
        #: the client prepared an unnamed statement, which a simple Query would drop
        self.unnamed_statement = False
        #: the last Query text the rewriter's pre-filter passed (the full path needs not ask)
        self._candidate = b""

    @property
    def inspects_extended(self) -> bool:
        """Bind/Describe/Execute/Close must be looked at (some statement was rewritten, or
        the shadow samples executions of a prepared read)."""
        return (
            bool(self.statements)
            or self.discarding
            or (self.shadow is not None and bool(self.shadow.prepared))
        )

    def set_client_encoding(self, pg_encoding: str) -> None:
        self.codec = python_codec(pg_encoding)
        self.known_shapes = self.codec in FAST_CODECS
        if self.traffic is not None:
            self.traffic.codec = self.codec
        if self.shadow is not None:
            self.shadow.codec = self.codec

    def server_parameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the server: the settings statement text is read with."""
        if name == "client_encoding":
            self.set_client_encoding(value)
        else:
            self.lexing.server_parameter(name, value)

    # --- one message ---------------------------------------------------------------------

    def message(self, typ: int, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        """Decide about one client message: (replacement bytes or None to forward, entries).

        ``b""`` as replacement drops the message. ``entries`` are what the tracker must
        expect, in order (usually one; several when the proxy injects messages).
        """
        if self.discarding:
            return self._while_discarding(typ, body)
        if typ == m.QUERY:
            return self._query(body)
        if typ == m.PARSE:
            return self._parse(body)
        if typ == m.BIND:
            return self._bind(body)
        if typ == m.DESCRIBE:
            return self._describe(body)
        if typ == m.EXECUTE:
            return self._execute(body)
        if typ == m.CLOSE:
            kind, name = m.parse_describe_or_close(body)
            (self.statements if kind == ord("S") else self.portals).pop(name, None)
            if kind == ord("S") and self.shadow is not None:
                self.shadow.close(name)
            return None, [typ]
        if typ in (m.SYNC, m.FUNCTION_CALL):
            return None, [typ]
        return None, []

    def plain_query(self, body: bytes) -> bool | tuple[bytes, Pending]:
        """Fast path for a lone Query: count it and return True if it needs nothing else;
        for a write of a shape prepared on this connection, what to send instead and the
        one entry its reply needs.

        False means the full path must handle it (it may concern a mapping, or the proxy is
        discarding); nothing has been counted then.
        """
        if self.discarding:
            return False
        sql = m.parse_query(body)
        rewriter = self.rewriter
        if rewriter is not None:
            lowered = sql.lower()
            if rewriter.candidate(sql, lowered):
                self._candidate = sql  # the full path asks again
                return self._known_write(sql, lowered) or False
            writes = self.prepared_writes
            if writes is not None and (
                writes.pending or (writes.shapes and drops_statements(sql, lowered))
            ):
                return False
        if self.traffic is not None:
            self.traffic.query(sql)
        if self.shadow is not None:
            self.shadow.query(sql)
        self._log_statement(sql)
        _STATEMENT_COUNTS[statement_kind(sql)] += 1
        return True

    def plain_extended(self, buf: bytes, kinds: bytes, starts: list[int]) -> bool:
        """Fast path for a read of Bind/Describe/Execute/Close/Sync/Flush: True if none of
        them names a rewritten statement or portal (nothing to repair, nothing to expect
        beyond the reply counts); False means the full path must handle the read.

        A Bind of a plain statement still forgets the portal it replaces, as the full path
        does; doing that here and again on the full path is harmless.
        """
        if self.discarding:
            return False
        statements, portals, shadow = self.statements, self.portals, self.shadow
        if shadow is not None and not statements and not portals:
            # only the shadow looks at these reads: one sample per read, O(1) when it says no
            shadow.binds(buf, kinds, starts)
            return True
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.SYNC:
                continue
            end = frame_end(buf, start)
            if typ == m.BIND:
                portal, statement = m.bind_names(buf, start + 5, end)
                if statement in statements:
                    return False
                if shadow is not None:
                    # (should a later frame send the read to the full path, this Bind is
                    # sampled a second time there: a rare, harmless extra replay)
                    shadow.bind(statement, buf, start + 5, end)
                if portals:
                    portals.pop(portal, None)
            elif typ == m.EXECUTE:
                if portals and m.cstring_at(buf, start + 5, end) in portals:
                    return False
            elif typ == m.DESCRIBE or typ == m.CLOSE:
                kind, name = m.parse_describe_or_close(buf[start + 5 : end])
                if name in (statements if kind == ord("S") else portals):
                    return False
            else:
                return False  # not one of the above: the full path decides
        return True

    def _known_write(self, sql: bytes, lowered: bytes) -> tuple[bytes, Pending] | None:
        """``_query`` for a write of a shape already prepared on this connection, when
        nothing else is due (no batch of the proxy's own, no traffic, shadow or statement
        log to feed): a split along the shape's text and a Bind; None: the full path."""
        writes, tracker, rewriter = self.prepared_writes, self.tracker, self.rewriter
        if (
            writes is None
            or tracker is None
            or rewriter is None
            or writes.pending
            or not self.known_shapes
            or not self.lexing.standard_conforming_strings
            or self.traffic is not None
            or self.shadow is not None
            or self.statement_log is not None
        ):
            return None
        known = split_known(sql)
        if known is None:
            return None
        shape = writes.get((known.shape, known.types, rewriter.states.version))
        if (
            shape is None
            or shape.state != READY
            or tracker.status_at_rest() not in _LIVE
            or drops_statements(sql, lowered)
        ):
            return None
        _STATEMENT_COUNTS[shape.kind] += 1
        return self._run_prepared(writes, shape, known, sql)

    def _log_statement(self, sql: bytes) -> None:
        if self.statement_log is not None:
            text = sql[:200].decode(self.codec, "replace")
            self.statement_log.debug("statement", sql=text, truncated=len(sql) > 200)

    def _settled(self) -> bool:
        """Every message sent has been answered: the settings the server reported are the
        ones it will read the next text with (a message in flight may be changing them).
        Without the connection's tracker that cannot be known, so it is not assumed."""
        return self.tracker is not None and self.tracker.status_at_rest() is not None

    def _plan(
        self, sql: bytes, *, prepared: bool, standard: bool | None = None
    ) -> Rewritten | None:
        """The rewrite of a Query's or Parse's text, read as the server reads it (with
        ``standard``, as it read it then); None when it concerns no mapping."""
        self._log_statement(sql)
        rewriter = self.rewriter
        if rewriter is None or not rewriter.candidate(sql):
            return None
        try:
            text = sql.decode(self.codec)
        except UnicodeDecodeError:
            if self.codec == "utf-8":
                return None  # the server refuses it (22021) before running any of it
            text = sql.decode(self.codec, "surrogateescape")  # the rewriter applies a policy
        reading = self.lexing.read(text, settled=self._settled(), standard=standard)
        if reading.kind == AMBIGUOUS:
            return rewriter.unsupported_text(text, "lexing")
        if reading.respelled is None:
            return rewriter.rewrite(text, remember_text=prepared)
        rewritten = rewriter.rewrite(reading.text, remember_text=False)
        return rewritten.respelled_from(reading.respelled) if rewritten is not None else None

    def _encode(self, text: str) -> bytes:
        return text.encode(self.codec, "surrogateescape")

    def _record_unmirrored(self, rewritten: Rewritten) -> None:
        for statement in rewritten.statements:
            template = statement.template
            if statement.action == UNMIRRORED:
                for name in template.mappings:
                    metrics.UNMIRRORED_STATEMENTS.labels(name, template.reason or "unknown").inc()
                if self.recorder is not None:
                    self.recorder.unmirrored(template.mappings, template.reason or "unknown")
            elif statement.action == REJECT:
                for name in template.mappings:
                    metrics.REJECTED_STATEMENTS.labels(name, template.reason or "unknown").inc()

    def _query(self, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        sql = m.parse_query(body)
        _STATEMENT_COUNTS[statement_kind(sql)] += 1
        if self.traffic is not None:
            self.traffic.query(sql)
        if self.shadow is not None:
            self.shadow.query(sql)
        writes = self.prepared_writes
        if writes is None or self.tracker is None:
            return self._simple_query(sql, body)
        if writes.shapes and drops_statements(sql):
            writes.forget_all()
        shape, params = self._prepared_write(writes, sql)
        # The proxy's own batch (Parses at rest, Closes) goes first; it may prepare ``shape``.
        lead, lead_entries = (
            writes.housekeeping(self.tracker.status_at_rest(), self.tracker.synced)
            if writes.pending
            else (b"", [])
        )
        # Only at rest outside a failed transaction: there the server would refuse the Bind,
        # not the Query, and say so from another place in its code.
        if shape is not None and params is not None and self.tracker.status_at_rest() in _LIVE:
            main, entry = self._run_prepared(writes, shape, params, sql)
            entries: list[int | Pending] = [entry]
        else:
            if shape is not None:
                _prepared_outcome("unprepared")
            replacement, entries = self._simple_query(sql, body)
            if not lead:
                return replacement, entries
            main = replacement if replacement is not None else m.frame_of(m.QUERY, body)
        return (lead + main if lead else main), [*lead_entries, *entries]

    def _simple_query(self, sql: bytes, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        """The Query as it always ran: rewritten (and repaired) when it concerns a mapping."""
        rewritten = self._plan(sql, prepared=False)
        if rewritten is None:
            return None, [m.QUERY]
        self._record_unmirrored(rewritten)
        if not rewritten.changed:
            return None, [m.QUERY]
        replacement = m.build_query(self._encode(rewritten.sql))
        return replacement, [Pending(m.QUERY, QueryRepair(rewritten, self.recorder))]

    def _prepared_write(
        self, writes: PreparedWrites, sql: bytes
    ) -> tuple[PreparedShape | None, Known | Parameterized | None]:
        """The prepared shape for a write to a mapped table, with its literals; (shape, None)
        when the shape is not ready yet (a new one is added); (None, None) when the statement
        does not qualify (not one rewritten write, or nothing to take out of it).

        A statement of a shape already prepared on this connection costs a split along the
        shape's fixed text (``split_known``), no parse and no rewrite lookup.
        """
        rewriter = self.rewriter
        if rewriter is None or (sql != self._candidate and not rewriter.candidate(sql)):
            return None, None
        if not self.lexing.standard_conforming_strings:
            return None, None  # read as the server reads it: the plain path respells it
        known = split_known(sql) if self.known_shapes else None
        if known is not None:
            shape = writes.get((known.shape, known.types, rewriter.states.version))
            if shape is not None:
                return shape, (known if shape.state == READY else None)
        try:
            text = sql.decode(self.codec)
        except UnicodeDecodeError:
            return None, None  # the plain path forwards it for the server's own error
        params = parameterize(text)
        # The shape is prepared later, at rest: it must read the same whatever the setting
        # is by then (a plain literal holding a backslash stays in the shape's text).
        if params is None or not lexes_alike(params.shape):
            return None, None
        shaped = rewriter.rewrite(params.shape, remember_text=True)
        if shaped is None or len(shaped.statements) != 1 or shaped.statements[0].action != REWRITE:
            return None, None
        if known is None and self.known_shapes:
            remember_known(sql, self.codec, params)
        key = (params.shape, params.types, rewriter.states.version)
        shape = writes.get(key)
        if shape is None:
            kind = statement_kind(self._encode(params.shape))
            writes.add(key, shaped, self._encode(shaped.sql), params.types, kind)
            return writes.get(key), None
        if shape.state != READY:
            return shape, None
        return shape, params

    def _run_prepared(
        self,
        writes: PreparedWrites,
        shape: PreparedShape,
        params: Known | Parameterized,
        sql: bytes,
    ) -> tuple[bytes, Pending]:
        """Bind, Describe, Execute, Sync for one write of a prepared shape.

        One tracker entry, a Sync's, stands for the whole batch: every reply up to the
        ReadyForQuery goes to the one plan, an error included (the server skips the rest
        of the batch up to that Sync).
        """
        _EXECUTED.inc()
        self._log_statement(sql)
        rewritten = shape.rewritten
        assert isinstance(rewritten, Rewritten)
        reply = rewritten.statements[0].template.reply
        assert reply is not None

        if isinstance(params, Known):
            values = params.values
        else:
            values = tuple(self._encode(lit.value) for lit in params.literals)
        plan = PreparedReply(reply, rewritten, params, shape.broken, self.recorder, self.codec)
        batch = m.build_bind_text(b"", shape.name, values) + _DESCRIBE_EXECUTE_SYNC
        if self.unnamed_statement:
            # A simple Query drops the unnamed statement; so does the prepared form of it.
            self.unnamed_statement = False
            batch = _CLOSE_UNNAMED_STATEMENT + batch
        return batch, Pending(m.SYNC, plan, whole=None if reply.returning else plan.whole)

    def _parse(self, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        parse = m.parse_parse(body)
        if not parse.name:
            self.unnamed_statement = True
        _STATEMENT_COUNTS[statement_kind(parse.sql)] += 1
        if self.traffic is not None:
            self.traffic.parse(parse.name, parse.sql)
        if self.shadow is not None:
            self.shadow.parse(parse)
        rewritten = self._plan(parse.sql, prepared=True)
        if rewritten is None or len(rewritten.statements) != 1:
            self.statements.pop(parse.name, None)
            return None, [m.PARSE]
        plan = rewritten.statements[0]
        if plan.action == REJECT:
            self._record_unmirrored(rewritten)
            self.discarding = True
            error = STATEMENT_REJECTED.response(message=reject_message(plan.template))
            return b"", [Pending(m.PARSE, inject=error)]
        if plan.action not in (UNMIRRORED, REWRITE):
            self.statements.pop(parse.name, None)
            return None, [m.PARSE]
        assert self.rewriter is not None
        self.statements[parse.name] = Prepared(
            rewritten,
            plan,
            parse.sql,
            parse.param_types,
            self.rewriter.states.version,
            None if plan.template.reason == "lexing" else self.lexing.standard_conforming_strings,
        )
        if plan.action == UNMIRRORED:
            return None, [m.PARSE]
        replacement = m.build_parse(parse.name, self._encode(rewritten.sql), parse.param_types)
        return replacement, [Pending(m.PARSE, ParseRepair(rewritten))]

    def _refresh(
        self, name: bytes, prepared: Prepared
    ) -> tuple[Prepared, bytes, list[int | Pending]]:
        """Prepare a statement again if a pause/resume changed how it must be rewritten.

        A sync mapping that is paused must stop writing its target even through statements
        the client prepared before the pause (and start again on resume).
        """
        rewriter = self.rewriter
        if (
            rewriter is None
            or prepared.version == rewriter.states.version
            or prepared.standard is None
        ):
            return prepared, b"", []
        rewritten = self._plan(prepared.sql, prepared=True, standard=prepared.standard)
        if rewritten is None or len(rewritten.statements) != 1:
            return prepared, b"", []
        fresh = Prepared(
            rewritten,
            rewritten.statements[0],
            prepared.sql,
            prepared.param_types,
            rewriter.states.version,
            prepared.standard,
        )
        self.statements[name] = fresh
        if rewritten.sql == prepared.rewritten.sql or fresh.plan.action != REWRITE:
            return fresh, b"", []
        injected = b""
        entries: list[int | Pending] = []
        if name:
            injected += m.build_close(ord("S"), name)
            entries.append(Pending(m.CLOSE, _DROP_SUCCESS))
        injected += m.build_parse(name, self._encode(rewritten.sql), prepared.param_types)
        entries.append(Pending(m.PARSE, _DROP_SUCCESS))
        return fresh, injected, entries

    def _bind(self, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        head = m.parse_bind(body)
        if self.shadow is not None:
            self.shadow.bind(head.statement, body, 0, len(body))
        prepared = self.statements.get(head.statement)
        if prepared is None:
            self.portals.pop(head.portal, None)
            return None, [m.BIND]
        prepared, injected, entries = self._refresh(head.statement, prepared)
        formats = head.result_formats
        # With one format code per column the added columns are text (see the Bind below).
        self.portals[head.portal] = Portal(prepared, binary=len(formats) == 1 and formats[0] == 1)
        reply = prepared.plan.template.reply
        if reply is not None and reply.returning and len(formats) > 1:
            # One format code per column: the columns the rewrite added need theirs.
            bind = m.bind_with_extra_result_columns(body, head, reply.extra_columns)
            return injected + bind, [*entries, m.BIND]
        if injected:
            return injected + m.frame_of(m.BIND, body), [*entries, m.BIND]
        return None, [m.BIND]

    def _describe(self, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        kind, name = m.parse_describe_or_close(body)
        prepared = (
            self.statements.get(name) if kind == ord("S") else _statement(self.portals.get(name))
        )
        if prepared is None or prepared.plan.action != REWRITE:
            return None, [m.DESCRIBE]
        reply = prepared.plan.template.reply
        assert reply is not None
        return None, [Pending(m.DESCRIBE, DescribeRepair(reply))]

    def _execute(self, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        name, _ = m.parse_execute(body)
        portal = self.portals.get(name)
        if portal is None:
            return None, [m.EXECUTE]
        prepared = portal.statement
        if prepared.plan.action == UNMIRRORED:
            self._record_unmirrored(prepared.rewritten)
            return None, [m.EXECUTE]
        reply = prepared.plan.template.reply
        assert reply is not None
        plan = ExecuteRepair(
            reply,
            prepared.rewritten,
            binary_count=portal.binary,
            recorder=self.recorder,
            counted=portal.counted,
        )
        return None, [Pending(m.EXECUTE, plan)]

    def _while_discarding(self, typ: int, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        """After a refused Parse: drop everything up to Sync; then make the server fail too."""
        if typ == m.FLUSH:
            return None, []  # harmless, and lets replies to earlier messages through
        if typ != m.SYNC:
            return b"", []
        self.discarding = False
        failing = (
            "DO $dualwrite$ BEGIN RAISE EXCEPTION USING "
            f"ERRCODE = '{STATEMENT_REJECTED.sqlstate}', "
            "MESSAGE = 'dualwrite: statement rejected'; END $dualwrite$"
        )
        injected = (
            m.build_parse(b"", failing.encode())
            + m.build_bind(b"", b"")
            + m.build_execute(b"")
            + m.SYNC_MESSAGE
        )
        return injected, [
            Pending(m.PARSE, swallow=True),
            Pending(m.BIND, swallow=True),
            Pending(m.EXECUTE, swallow=True),
            m.SYNC,
        ]


class _DropSuccess:
    """Reply plan for a message the proxy injected: hide its success, show its error."""

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        return raw if typ == m.ERROR_RESPONSE else b""


_DROP_SUCCESS: Final = _DropSuccess()


def _statement(portal: Portal | None) -> Prepared | None:
    return portal.statement if portal is not None else None
