"""The relay core of one session, without I/O: bytes from either side in, what to send where out.

In the manner of asyncpg's CoreProtocol and h11's Connection, ``Relay`` owns the protocol
state of one client connection and its upstream connection and touches no socket. Its
inputs are methods (``from_client``, ``from_server``, ``upstream_connected``, ``client_eof``,
``upstream_lost``, ``request_shutdown``...); each returns what the glue in proxy/session.py
must do, in order:

    forward   bytes for the other side, written first (``from_client``: to the server;
              ``from_server``: to the client). On the fast path these are the bytes that
              arrived, forwarded unread (whole frames only; a partial one waits).
    effects   a sequence of ``Effect`` objects: more bytes for either side, connect upstream,
              forward a CancelRequest, register the cancel key, pass an EOF on, close. On the
              fast path this is ``NO_EFFECTS``, the empty tuple.

States and the events that move between them are data (``TRANSITIONS``); any other move is
a bug and raises. ``DRAINING`` is a client that said goodbye (Terminate or EOF) while replies
were still owed: they are relayed, in order, until the server closes, as PostgreSQL itself
answers every message it read before a Terminate.

    STARTUP --startup message--> CONNECT --upstream connected--> AUTH --ready--> READY
    READY --client done--> DRAINING;   STARTUP --cancel request--> CANCELLING
    any state but CLOSED --close--> CLOSED

A CancelRequest connection is closed only once the cancel was forwarded (the glue closes it
when the forwarding is done), as PostgreSQL closes it only after signalling the backend:
a client that waits for the close knows its cancel was delivered.

Client messages that expect a reply are recorded in the tracker (proxy/tracker.py) and
replies are matched against it; the Frontend (proxy/frontend.py) decides about statements.
Startup and authentication details live in proxy/startup.py.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from core import errors, metrics
from core.errors import (
    ADMIN_SHUTDOWN,
    INTERNAL_ERROR,
    STARTING_SHUTDOWN,
    STARTUP_TIMEOUT,
    TOO_MANY_CLIENTS,
    UPSTREAM_CLOSED,
    ClientError,
    MessageTooLarge,
    ProtocolViolation,
    UpstreamUnavailable,
)
from proxy.frontend import Frontend
from proxy.host import SessionHost
from proxy.startup import (
    NOT_SUPPORTED,
    StartupReader,
    authentication_step,
    is_encryption_request,
    unsupported_protocol,
)
from proxy.tracker import CYCLE_END, Pending, ResponseTracker
from proxy.wire import messages as m
from proxy.wire.frames import FrameScanner, frame_end, type_table


class State(enum.Enum):
    STARTUP = "startup"  # reading untyped packets (SSLRequest, CancelRequest, StartupMessage)
    CONNECT = "connect"  # the upstream connection is being opened; client bytes wait
    AUTH = "auth"  # authentication relayed both ways, unchanged, until the first ReadyForQuery
    READY = "ready"  # relaying; replies matched against the tracker and repaired
    DRAINING = "draining"  # the client is done; the replies still owed are relayed
    CANCELLING = "cancelling"  # a CancelRequest is being forwarded; closed once it was
    CLOSED = "closed"


class Event(enum.Enum):
    STARTUP_MESSAGE = "a StartupMessage was admitted"
    CANCEL_REQUEST = "a CancelRequest arrived"
    UPSTREAM_CONNECTED = "the upstream connection is open"
    FIRST_READY = "the server's first ReadyForQuery"
    CLIENT_DONE = "the client sent Terminate or EOF with replies still owed"
    CLOSE = "close both sides"


#: every legal move; anything else is a bug of ours
TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = {
    (State.STARTUP, Event.STARTUP_MESSAGE): State.CONNECT,
    (State.STARTUP, Event.CANCEL_REQUEST): State.CANCELLING,
    (State.CONNECT, Event.UPSTREAM_CONNECTED): State.AUTH,
    (State.AUTH, Event.FIRST_READY): State.READY,
    (State.READY, Event.CLIENT_DONE): State.DRAINING,
    (State.STARTUP, Event.CLOSE): State.CLOSED,
    (State.CONNECT, Event.CLOSE): State.CLOSED,
    (State.AUTH, Event.CLOSE): State.CLOSED,
    (State.READY, Event.CLOSE): State.CLOSED,
    (State.DRAINING, Event.CLOSE): State.CLOSED,
    (State.CANCELLING, Event.CLOSE): State.CLOSED,
}


class TransitionError(RuntimeError):
    """A move the TRANSITIONS table does not allow (a bug of ours)."""


# --- effects --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToClient:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True, slots=True)
class ToServer:
    """Write these bytes to the server."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Connect:
    """Open the upstream connection; report with ``upstream_connected`` or ``upstream_failed``."""


@dataclass(frozen=True, slots=True)
class ForwardCancel:
    """A CancelRequest arrived: forward it (if the key is a live session's), then ``close``."""

    key: m.CancelKey


@dataclass(frozen=True, slots=True)
class CancelKeyKnown:
    """The server told this session's backend key: cancels for it may now be routed here."""

    key: m.CancelKey


@dataclass(frozen=True, slots=True)
class EndUpstream:
    """The client sends no more: pass its EOF on to the server (or close if that is not
    possible)."""


@dataclass(frozen=True, slots=True)
class Started:
    """The session reached READY: the startup timeout no longer applies."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close both sides, after what was written before."""


Effect = (
    ToClient | ToServer | Connect | ForwardCancel | CancelKeyKnown | EndUpstream | Started | Close
)
Effects = Sequence[Effect]
Buffer = bytes | memoryview

NO_EFFECTS: Final[Effects] = ()
_NOTHING: Final[tuple[Buffer, Effects]] = (b"", NO_EFFECTS)
_CLOSE: Final = Close()


# --- scan tables ----------------------------------------------------------------------------

STREAMABLE_CLIENT: Final = frozenset({m.COPY_DATA})
STREAMABLE_SERVER: Final = frozenset({m.DATA_ROW, m.COPY_DATA})
REPLY_KINDS: Final = frozenset(
    {m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.QUERY, m.FUNCTION_CALL}
)
_ONE_QUERY: Final = bytes((m.QUERY,))
#: table bit: the frame needs a closer look than recording that it expects a reply
INSPECT: Final = 4
#: table bit: a ParameterStatus
PARAMETER: Final = 8
#: table bit: Bind/Describe/Execute/Close, which may name a rewritten statement or portal
NAMED: Final = 16
#: client frames: every message that expects a reply is reported, cycle ends are marked,
#: Query/Parse (statement text) and Terminate are inspected
CLIENT_TABLE: Final = type_table(
    REPLY_KINDS, mark=CYCLE_END, flag_4={m.QUERY, m.PARSE, m.TERMINATE}
)
#: the same once statements of this session were rewritten: Bind, Describe, Execute and Close
#: then name statements and portals whose replies may need repair. A read of them that names
#: none is recognised by Frontend.plain_extended and takes the fast path all the same.
CLIENT_TABLE_REWRITING: Final = type_table(
    REPLY_KINDS,
    mark=CYCLE_END,
    flag_4={m.QUERY, m.PARSE, m.TERMINATE},
    flag_16={m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE},
)
#: every client frame inspected: while a refused pipeline is being discarded
CLIENT_TABLE_ALL: Final = type_table(range(256), mark=CYCLE_END, flag_4=range(256))
_ASYNC_DATA: Final = {m.DATA_ROW, m.COPY_DATA, m.NOTICE_RESPONSE, m.NOTIFICATION_RESPONSE}
#: server frames while nothing needs repair: everything but rows, copy data and the
#: asynchronous messages (none of which moves the tracker); ReadyForQuery marked
SERVER_TABLE: Final = type_table(
    set(range(256)) - _ASYNC_DATA - {m.PARAMETER_STATUS},
    mark={m.READY_FOR_QUERY},
    flag_8={m.PARAMETER_STATUS},
)
#: server frames while a reply is being repaired: all of them
SERVER_TABLE_ALL: Final = type_table(
    range(256), mark={m.READY_FOR_QUERY}, flag_8={m.PARAMETER_STATUS}
)
#: reply type -> the client message it completes, for the inlined fast path
_COMPLETES: Final = {
    m.PARSE_COMPLETE: m.PARSE,
    m.BIND_COMPLETE: m.BIND,
    m.COMMAND_COMPLETE: m.EXECUTE,
    m.CLOSE_COMPLETE: m.CLOSE,
}
#: replies inside a simple Query's cycle that change nothing we track
_QUERY_PARTS: Final = frozenset({m.ROW_DESCRIPTION, m.COMMAND_COMPLETE, m.EMPTY_QUERY_RESPONSE})

#: dualwrite_client_connections_rejected_total's reason for a refused admission
_REFUSALS: Final[Mapping[ClientError, str]] = {
    TOO_MANY_CLIENTS: "max_connections",
    STARTING_SHUTDOWN: "shutting_down",
}

_READY: Final = State.READY
_AUTH: Final = State.AUTH
_DRAINING: Final = State.DRAINING


class Relay:
    """The protocol state of one session and the decisions on every byte; no I/O."""

    #: precise mode pops plain entries inline (False: every reply through the tracker's
    #: on_reply, which the tests use to check that both agree)
    inline_replies = True

    def __init__(self, host: SessionHost, log: Any, *, frontend: Frontend | None = None) -> None:
        self.host = host
        self.log = log
        self.state = State.STARTUP
        limits = host.config.limits
        if frontend is None:
            mirror = host.mirror
            logging = host.config.logging
            frontend = Frontend(
                mirror.rewriter if mirror is not None else None,
                mirror.recorder if mirror is not None else None,
                statement_log=log if logging.level == "debug" and logging.log_statements else None,
                traffic=mirror.traffic if mirror is not None else None,
                prepared_writes=limits.prepared_writes_per_connection,
                shadow=mirror.shadow if mirror is not None else None,
            )
        self.frontend = frontend
        self.tracker = ResponseTracker()
        frontend.tracker = self.tracker
        self.client_scan = FrameScanner(
            CLIENT_TABLE, max_length=limits.max_message_bytes, streamable=STREAMABLE_CLIENT
        )
        self.server_scan = FrameScanner(SERVER_TABLE, streamable=STREAMABLE_SERVER)
        self.startup = StartupReader()
        self.startup_packet = b""
        self.startup_params: dict[str, str] = {}
        #: every ParameterStatus the server sent, latest value per name
        self.server_parameters: dict[str, str] = {}
        #: client bytes that arrived while connecting upstream
        self.pending_client = bytearray()
        self.upstream_tls = False
        self.shutdown_requested = False
        #: the client sent Terminate or EOF: it sends no more
        self.client_done = False
        #: the server sent a FATAL (or PANIC) ErrorResponse: its close needs no error of ours
        self.upstream_fatal = False

    # --- state ------------------------------------------------------------------------

    def move(self, event: Event) -> State:
        """Take the transition ``event`` from the current state; raise if there is none."""
        try:
            self.state = TRANSITIONS[self.state, event]
        except KeyError:
            raise TransitionError(f"{event.name} in state {self.state.name}") from None
        return self.state

    def quiescent(self) -> bool:
        """Nothing in flight, no open transaction, no half-relayed frame either way."""
        return (
            self.tracker.idle and not self.client_scan.mid_frame and not self.server_scan.mid_frame
        )

    # --- client side --------------------------------------------------------------------

    def from_client(self, data: bytes) -> tuple[Buffer, Effects]:
        """Bytes from the client: what to forward to the server, and what else to do."""
        try:
            if self.state is _READY:
                buf, ready, kinds, starts, flags, ends, after, _ = self.client_scan.feed(data)
                if not ready:
                    return _NOTHING
                if kinds:
                    if flags & INSPECT:
                        if kinds != _ONE_QUERY:
                            return self._client_inspect(buf, ready, starts[0])
                        # the commonest inspected read: one simple Query that concerns no
                        # mapping, or a write of a shape prepared on this connection
                        plain = self.frontend.plain_query(buf[starts[0] + 5 : ready])
                        if plain is False:
                            return self._client_inspect(buf, ready, starts[0])
                        if plain is not True:
                            return self._client_replaced(buf, ready, starts[0], *plain)
                    elif flags & NAMED and not self.frontend.plain_extended(buf, kinds, starts):
                        # Bind/Describe/Execute/Close naming a rewritten statement or portal
                        return self._client_inspect(buf, ready, starts[0])
                    self.tracker.sent(kinds, ends, after)
                return (buf if ready == len(buf) else memoryview(buf)[:ready]), NO_EFFECTS
            return self._client_other(data)
        except MessageTooLarge as exc:
            metrics.PROTOCOL_ERRORS.labels("too_large").inc()
            self.log.warning("protocol_violation", reason=str(exc))
            return b"", self.refuse(exc.response())
        except ProtocolViolation as exc:
            metrics.PROTOCOL_ERRORS.labels("malformed").inc()
            self.log.warning("protocol_violation", reason=str(exc))
            return b"", self.refuse(exc.response())
        except Exception:
            # A bug of ours: the connection's protocol state is unknown now, so end it the
            # way PostgreSQL ends a session it cannot continue, rather than dropping it.
            self.log.exception("internal_error")
            return b"", self.refuse(INTERNAL_ERROR.response())

    def _client_other(self, data: bytes) -> tuple[Buffer, Effects]:
        state = self.state
        if state is _AUTH:
            # authentication messages are relayed unread (whole frames only)
            buf, ready = self.client_scan.feed(data)[:2]
            return (buf if ready == len(buf) else memoryview(buf)[:ready]), NO_EFFECTS
        if state is State.STARTUP:
            self.startup.feed(data)
            return b"", self._startup_packets()
        if state is State.CONNECT:
            self.pending_client += data
        # DRAINING: the client said Terminate; PostgreSQL reads nothing after it either
        return _NOTHING

    def _startup_packets(self) -> Effects:
        effects: list[Effect] = []
        while self.state is State.STARTUP:
            found = self.startup.next_packet()
            if found is None:
                break
            packet, raw = found
            effects += self._startup_packet(packet, raw)
        return effects

    def _startup_packet(self, packet: m.StartupPacket, raw: bytes) -> Effects:
        if is_encryption_request(packet):
            # TLS and GSS encryption towards clients are not offered; clients fall back to
            # plain text (or fail if they insist), exactly as with a server without SSL.
            return (ToClient(NOT_SUPPORTED),)
        if packet.code == m.CANCEL_REQUEST_CODE:
            key = m.parse_cancel_request(packet)
            self.move(Event.CANCEL_REQUEST)
            return (ForwardCancel(key),)
        refusal = unsupported_protocol(packet)
        if refusal is not None:
            return self.refuse(refusal, "protocol_error")
        self.startup_params = packet.parameters()
        self.log = self.log.bind(
            user=self.startup_params.get("user"),
            database=self.startup_params.get("database", self.startup_params.get("user")),
        )
        refused = self.host.admission()
        if refused is not None:
            return self.refuse(refused.response(), _REFUSALS.get(refused, "refused"))
        self.move(Event.STARTUP_MESSAGE)
        self.startup_packet = raw
        self.pending_client += self.startup.take_rest()
        return (Connect(),)

    def _client_inspect(self, buf: bytes, ready: int, first: int) -> tuple[Buffer, Effects]:
        """Slow path: look at every frame of this read (a Query, Parse, or rewritten portal)."""
        frontend = self.frontend
        out: list[Buffer] = []
        injected = b""
        terminated = False
        # Bytes before the first inspected frame are whole uninspected frames (or the end of
        # a streamed one) unless the proxy is discarding a refused pipeline.
        run = first if frontend.discarding else 0
        pos = first
        while pos < ready:
            end = frame_end(buf, pos)
            if end > ready:
                break  # the first piece of a streamed frame: forwarded as it is
            typ = buf[pos]
            replacement, entries = frontend.message(typ, buf[pos + 5 : end])
            for entry in entries:
                injected += self._expect(entry)
            if replacement is not None:
                if pos > run:
                    out.append(memoryview(buf)[run:pos])
                if replacement:
                    out.append(replacement)
                run = end
            pos = end
            if typ == m.TERMINATE:
                # The server answers what it read before the Terminate, then closes; what
                # follows it is not read, by the server or by us.
                terminated = True
                ready = end
                break
        if ready > run:
            out.append(memoryview(buf)[run:ready])
        self.client_scan.table = (
            CLIENT_TABLE_ALL
            if frontend.discarding
            else CLIENT_TABLE_REWRITING
            if frontend.inspects_extended
            else CLIENT_TABLE
        )
        forward = b"".join(out)
        effects: list[Effect] = [ToClient(injected)] if injected else []
        if terminated:
            effects += self._client_terminated()
        return forward, effects

    def _client_replaced(
        self, buf: bytes, ready: int, start: int, replacement: bytes, entry: Pending
    ) -> tuple[Buffer, Effects]:
        """The read's one Query goes as ``replacement``, whose reply ``entry`` expects."""
        self._expect(entry)
        end = frame_end(buf, start)
        if start == 0 and end == ready:
            return replacement, NO_EFFECTS
        return b"".join((buf[:start], replacement, buf[end:ready])), NO_EFFECTS

    def _client_terminated(self) -> Effects:
        """Terminate sent (and forwarded): close now if nothing is owed, else drain."""
        self.client_done = True
        if self.tracker.idle:
            return self.close()
        self.move(Event.CLIENT_DONE)
        return NO_EFFECTS

    def expect(self, entry: int | Pending) -> bytes:
        """Queue one expected reply; return the proxy's own answer if it is due now."""
        return self._expect(entry)

    def _expect(self, entry: int | Pending) -> bytes:
        tracker = self.tracker
        tracker.expect(entry)
        if type(entry) is not Pending:
            return b""
        if entry.plan is not None:
            self.server_scan.table = SERVER_TABLE_ALL
        if entry.inject is not None and tracker.queue and tracker.queue[0] is entry:
            return tracker.take_injections()
        return b""

    def client_eof(self) -> Effects:
        """The client sends no more but may still read: pass the EOF on, as a direct
        connection would, and relay the server's replies until the server closes."""
        self.client_done = True
        state = self.state
        if state is State.CONNECT:
            return NO_EFFECTS  # upstream_connected passes it on after the buffered bytes
        if state is _AUTH:
            return (EndUpstream(),)
        if state is _READY:
            self.move(Event.CLIENT_DONE)
            return (EndUpstream(),)
        if state is _DRAINING or state is State.CANCELLING:
            return NO_EFFECTS  # a Terminate already told the server; the cancel is on its way
        return self.close()

    # --- upstream side ------------------------------------------------------------------

    def upstream_connected(self, *, tls: bool) -> tuple[Buffer, Effects]:
        """The upstream connection is open: the startup packet and what the client sent
        meanwhile go to the server."""
        self.move(Event.UPSTREAM_CONNECTED)
        self.upstream_tls = tls
        forward: list[Buffer] = [self.startup_packet]
        effects: list[Effect] = []
        if self.pending_client:
            pending = bytes(self.pending_client)
            self.pending_client.clear()
            more, then = self.from_client(pending)
            forward.append(more)
            effects += then
        if self.client_done and self.state is not State.CLOSED:
            effects.append(EndUpstream())
        return b"".join(forward), effects

    def upstream_failed(self, exc: UpstreamUnavailable) -> Effects:
        metrics.UPSTREAM_CONNECT_ERRORS.inc()
        self.log.warning("upstream_unavailable", reason=str(exc))
        return self.refuse(exc.response(), "upstream_unavailable")

    def from_server(self, data: bytes) -> tuple[Buffer, Effects]:
        """Bytes from the server: what to forward to the client, and what else to do."""
        buf, ready, kinds, starts, flags, readies, after, _ = self.server_scan.feed(data)
        if not ready:
            return _NOTHING
        if kinds and kinds[-1] == m.ERROR_RESPONSE:
            # A FATAL is the server's last message (pg_terminate_backend, a failed login...).
            self.upstream_fatal = _is_fatal(buf, starts[-1])
        if flags & PARAMETER:
            self._parameter_status(buf, kinds, starts)
        state = self.state
        if state is _READY or state is _DRAINING:
            if self.tracker.queue is None:
                # FAST mode: nothing to repair; O(1) bookkeeping, forwarded unread.
                self.tracker.received(buf, kinds, starts, readies, after)
                forward = buf if ready == len(buf) else memoryview(buf)[:ready]
            else:
                forward = self._server_frames(buf, ready, kinds, starts)
            if self.shutdown_requested and self.quiescent():
                return forward, self.refuse(ADMIN_SHUTDOWN.response())
            return forward, NO_EFFECTS
        if state is _AUTH:
            return self._server_auth(buf, ready)
        return _NOTHING

    def _parameter_status(self, buf: bytes, kinds: bytes, starts: list[int]) -> None:
        """Note every ParameterStatus and tell the frontend (it follows client_encoding)."""
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.PARAMETER_STATUS:
                body = buf[start + 5 : frame_end(buf, start)]
                raw_name, raw_value = m.parse_parameter_status(body)
                name = raw_name.decode("ascii", "replace")
                value = raw_value.decode("utf-8", "replace")
                self.server_parameters[name] = value
                self.frontend.server_parameter(name, value)

    def _server_auth(self, buf: bytes, ready: int) -> tuple[Buffer, Effects]:
        """Relay authentication; note the cancel key; READY at the first ReadyForQuery."""
        step = authentication_step(buf, ready, upstream_tls=self.upstream_tls)
        effects: list[Effect] = []
        if step.cancel_key is not None:
            effects.append(CancelKeyKnown(step.cancel_key))
        if step.ready_status is None:
            return step.to_client, effects
        self.tracker.status = step.ready_status
        self.move(Event.FIRST_READY)
        effects.append(Started())
        self.log.info("session_ready", application=self.startup_params.get("application_name"))
        forward: Buffer = step.to_client
        if step.after_ready:
            # Frames after the first ReadyForQuery (rare) go through the READY path; they are
            # whole frames, so a scanner of their own reports them all.
            scanner = FrameScanner(SERVER_TABLE)
            rest, rest_ready, kinds, starts, flags, readies, after, _ = scanner.feed(
                step.after_ready
            )
            if flags & PARAMETER:
                self._parameter_status(rest, kinds, starts)
            self.tracker.received(rest, kinds, starts, readies, after)
            forward = step.to_client + rest[:rest_ready]
        if self.client_done:
            self.move(Event.CLIENT_DONE)
        if self.shutdown_requested and self.quiescent():
            effects += self.refuse(ADMIN_SHUTDOWN.response())
        return forward, effects

    def _server_frames(self, buf: bytes, ready: int, kinds: bytes, starts: list[int]) -> Buffer:
        """PRECISE mode: match each reply to its entry; repair rewritten replies."""
        tracker = self.tracker
        queue = tracker.queue
        assert queue is not None
        inline = self.inline_replies
        out: list[Buffer] = []
        run = 0
        resume = 0  # frames before this offset were answered whole (see Pending.whole)
        for typ, start in zip(kinds, starts, strict=True):
            if start < resume:
                continue
            head = queue[0] if queue else None
            if inline and type(head) is int:
                # The reply needs no repair: the commonest completions pop their entry inline.
                if typ == m.DATA_ROW or typ == m.COPY_DATA:
                    continue
                if typ == m.READY_FOR_QUERY:
                    tracker.status = buf[start + 5 : start + 6]
                    tracker.copy_in = False
                    if queue.popleft() not in CYCLE_END:
                        tracker.on_reply(typ, tracker.status)
                elif _COMPLETES.get(typ) == head:
                    queue.popleft()
                elif not (head == m.QUERY and typ in _QUERY_PARTS):
                    tracker.on_reply(typ, b"")
                if not tracker.injections:
                    continue
                end = frame_end(buf, start)
                out.append(memoryview(buf)[run:end])
                out.append(tracker.take_injections())
                run = end
                continue
            if type(head) is Pending and head.whole is not None:
                whole = head.whole(buf, start, ready)
                if whole is not None:
                    replacement, resume = whole
                    queue.popleft()
                    tracker.status = buf[resume - 1 : resume]
                    tracker.copy_in = False
                    if start > run:
                        out.append(memoryview(buf)[run:start])
                    out.append(replacement)
                    run = resume
                    if tracker.injections:
                        out.append(tracker.take_injections())
                    continue
            run = self._reply_slow(out, buf, run, start, frame_end(buf, start), typ)
        if tracker.settle():
            self.server_scan.table = SERVER_TABLE
        if not out:
            return buf if ready == len(buf) else memoryview(buf)[:ready]
        if ready > run:
            out.append(memoryview(buf)[run:ready])
        return b"".join(out)

    def _reply_slow(
        self, out: list[Buffer], buf: bytes, run: int, start: int, end: int, typ: int
    ) -> int:
        """A reply to a message whose response is repaired or swallowed; returns the new run."""
        body = buf[start + 5 : end]
        entry = self.tracker.on_reply(typ, body)
        replacement: bytes | None = None
        if type(entry) is Pending:
            if entry.swallow:
                replacement = b""
            elif entry.plan is not None:
                raw = buf[start:end]
                new = entry.plan.on_reply(typ, body, raw)
                if new is not raw:
                    replacement = new
        injections = self.tracker.take_injections()
        if replacement is None and not injections:
            return run
        if start > run:
            out.append(memoryview(buf)[run:start])
        out.append(memoryview(buf)[start:end] if replacement is None else replacement)
        if injections:
            out.append(injections)
        return end

    def upstream_lost(self) -> Effects:
        """The server closed its side."""
        state = self.state
        if state is State.CLOSED:
            return NO_EFFECTS
        if state is _DRAINING or self.client_done or self.upstream_fatal:
            # The client asked for the close (Terminate or EOF), or the server's FATAL already
            # told it why: another error of ours after that would not be what PostgreSQL sends.
            return self.close()
        self.log.warning("upstream_closed", in_transaction=self.tracker.status != b"I")
        return self.refuse(UPSTREAM_CLOSED.response())

    # --- lifecycle ----------------------------------------------------------------------

    def startup_timed_out(self) -> Effects:
        if self.state not in (State.STARTUP, State.CONNECT, _AUTH):
            return NO_EFFECTS
        self.log.warning("startup_timeout", state=self.state.value)
        return self.refuse(STARTUP_TIMEOUT.response(), "startup_timeout")

    def request_shutdown(self) -> Effects:
        """Close as soon as no transaction or request is in flight (SIGTERM)."""
        self.shutdown_requested = True
        if self.state is State.CLOSED or self.state is State.CANCELLING:
            return NO_EFFECTS  # (the cancel's forwarding ends on its own, and closes)
        if self.state is not _READY and self.state is not _DRAINING:
            return self.refuse(ADMIN_SHUTDOWN.response(), "shutting_down")
        if self.quiescent():
            return self.refuse(ADMIN_SHUTDOWN.response())
        return NO_EFFECTS

    def force_close(self) -> Effects:
        """Close now (grace period over): tell the client why when a frame boundary allows."""
        if self.state is State.CLOSED:
            return NO_EFFECTS
        if self.state is State.CANCELLING:
            return self.close()  # a cancel connection is never answered
        return self.refuse(ADMIN_SHUTDOWN.response())

    def refuse(self, error: bytes, reason: str | None = None) -> Effects:
        """A FATAL ErrorResponse to the client (if at a frame boundary), then close."""
        if reason is not None:
            metrics.CLIENT_CONNECTIONS_REJECTED.labels(reason).inc()
        if self.state is State.CLOSED:
            return NO_EFFECTS
        tell = () if self.server_scan.mid_frame else (ToClient(error),)
        return (*tell, *self.close())

    def close(self) -> Effects:
        """Close both sides; a server that owes nothing is told Terminate first."""
        previous = self.state
        if previous is State.CLOSED:
            return NO_EFFECTS
        self.move(Event.CLOSE)
        self.log.debug("closed", after=previous.value)
        if previous is _READY and self.tracker.idle and not self.client_done:
            return (ToServer(m.TERMINATE_MESSAGE), _CLOSE)
        # Closing (not aborting) flushes what is queued; PostgreSQL rolls back an open
        # transaction when its connection ends.
        return (_CLOSE,)


def _is_fatal(buf: bytes, start: int) -> bool:
    """True when the ErrorResponse at ``start`` has severity FATAL or PANIC."""
    fields = dict(m.parse_fields(buf[start + 5 : frame_end(buf, start)]))
    fallback = fields.get(errors.FIELD_SEVERITY, b"")
    severity = fields.get(errors.FIELD_SEVERITY_NONLOCALIZED, fallback)
    return severity in (b"FATAL", b"PANIC")
