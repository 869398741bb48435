"""One client connection relayed to one upstream connection, from startup to close.

The session is a pair of asyncio protocols around a small state machine:

    STARTUP   reading untyped packets: SSLRequest/GSSENCRequest (answered 'N'), CancelRequest,
              StartupMessage
    CONNECT   opening the upstream connection; client bytes wait in a buffer
    AUTH      relaying authentication both ways, unchanged, until the first ReadyForQuery
    READY     relaying; client messages that expect a reply are queued in the tracker, replies
              are matched against it (and repaired when a statement was rewritten)
    CLOSED

Frames the proxy has no reason to read are forwarded without being parsed: runs of them go
out in one write. Backpressure both ways: when one side's write buffer passes the high-water
mark the other side stops being read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from core import metrics
from core.errors import (
    DualwriteError,
    MessageTooLarge,
    ProtocolViolation,
    StartupTimeout,
    UpstreamUnavailable,
)
from core.logs import get_logger
from proxy.frontend import Frontend
from proxy.tracker import CYCLE_END, Pending, ResponseTracker
from proxy.upstream import connect_upstream
from proxy.wire import messages as m
from proxy.wire.frames import FrameScanner, frame_end, type_table

if TYPE_CHECKING:
    from proxy.server import ProxyServer

STARTUP, CONNECT, AUTH, READY, CLOSED = "startup", "connect", "auth", "ready", "closed"

#: PostgreSQL's own ceiling on the first packet (MAX_STARTUP_PACKET_LENGTH)
MAX_STARTUP_PACKET: Final = 10000
_PROTOCOL_MAJOR: Final = 3

_STREAMABLE_CLIENT: Final = frozenset({m.COPY_DATA})
_STREAMABLE_SERVER: Final = frozenset({m.DATA_ROW, m.COPY_DATA})
#: one socket read in 256 is timed for dualwrite_proxy_processing_seconds
_SAMPLE_MASK: Final = 255

_HOT = metrics.HOT
_PROCESSING_IN = metrics.PROXY_PROCESSING_SECONDS.labels("client_to_upstream")
_PROCESSING_OUT = metrics.PROXY_PROCESSING_SECONDS.labels("upstream_to_client")


class _Side(asyncio.Protocol):
    """The asyncio protocol of one socket; its callbacks are the session's own methods.

    ``data_received`` is set per instance to the session's bound method, so the event loop
    (which looks it up once per transport) calls the session with no hop in between.
    """

    def __init__(
        self,
        on_data: Callable[[bytes], None],
        on_lost: Callable[[Exception | None], None],
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
        on_made: Callable[[], None] | None = None,
        on_eof: Callable[[], bool] | None = None,
    ) -> None:
        self.data_received = on_data  # type: ignore[method-assign,assignment]
        self.connection_lost = on_lost  # type: ignore[method-assign,assignment]
        self.pause_writing = on_pause  # type: ignore[method-assign]
        self.resume_writing = on_resume  # type: ignore[method-assign]
        if on_eof is not None:
            self.eof_received = on_eof  # type: ignore[method-assign]
        self._on_made = on_made
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._on_made is not None:
            self._on_made()


class Session:
    """The relay of one client connection."""

    def __init__(self, server: ProxyServer, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.state = STARTUP
        self.log = get_logger("proxy").bind(conn_id=conn_id)
        limits = server.config.limits
        self.client = _Side(
            self._client_data,
            self._client_lost,
            self._client_full,
            self._client_drained,
            on_made=lambda: server.session_started(self),
            on_eof=self._client_eof,
        )
        self.upstream = _Side(
            self._upstream_data, self._upstream_lost, self._upstream_full, self._upstream_drained
        )
        self.tracker = ResponseTracker()
        mirror = server.mirror
        logging = server.config.logging
        self.frontend = Frontend(
            mirror.rewriter if mirror is not None else None,
            mirror.recorder if mirror is not None else None,
            statement_log=self.log if logging.level == "debug" and logging.log_statements else None,
            traffic=mirror.traffic if mirror is not None else None,
            prepared_writes=limits.prepared_writes_per_connection,
            shadow=mirror.shadow if mirror is not None else None,
        )
        self.frontend.tracker = self.tracker
        self.client_scan = FrameScanner(
            _CLIENT_TABLE, max_length=limits.max_message_bytes, streamable=_STREAMABLE_CLIENT
        )
        self.server_scan = FrameScanner(_SERVER_TABLE, streamable=_STREAMABLE_SERVER)
        self.startup_buffer = bytearray()
        self.pending_client = bytearray()  # client bytes that arrived while connecting
        self.startup_params: dict[str, str] = {}
        self.cancel_key: m.CancelKey | None = None
        self.shutdown_requested = False
        self.closed = asyncio.get_running_loop().create_future()
        self._startup_timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._calls = 0
        self._terminating = False
        #: the server sent a FATAL (or PANIC) ErrorResponse: its close needs no error of ours
        self._upstream_fatal = False
        #: the client sent EOF (a half-close, or a close without Terminate): it sends no more
        self._client_done = False

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Called once the client socket is accepted."""
        assert self.client.transport is not None
        self.client.transport.set_write_buffer_limits(
            high=self.server.config.limits.write_buffer_high_bytes
        )
        timeout = self.server.config.limits.startup_timeout_seconds
        self._startup_timer = asyncio.get_running_loop().call_later(
            timeout, self._startup_timed_out
        )

    def request_shutdown(self) -> None:
        """Close as soon as no transaction or request is in flight (SIGTERM)."""
        self.shutdown_requested = True
        if self.state != READY:
            self.refuse(
                "57P01", "terminating connection due to administrator command", "shutting_down"
            )
        elif self._quiescent():
            self.refuse("57P01", "terminating connection due to administrator command", None)

    def force_close(self) -> None:
        """Close now (grace period over): tell the client why when a frame boundary allows."""
        if self.state == CLOSED:
            return
        self.refuse("57P01", "terminating connection due to administrator command", None)

    def _quiescent(self) -> bool:
        return (
            self.tracker.idle and not self.client_scan.mid_frame and not self.server_scan.mid_frame
        )

    def refuse(self, sqlstate: str, message: str, reason: str | None) -> None:
        """Send a FATAL ErrorResponse to the client (if at a frame boundary) and close."""
        if reason is not None:
            metrics.CLIENT_CONNECTIONS_REJECTED.labels(reason).inc()
        client = self.client.transport
        if client is not None and not client.is_closing() and not self.server_scan.mid_frame:
            client.write(m.error_response(sqlstate, message, severity="FATAL"))
        self.close()

    def close(self) -> None:
        if self.state == CLOSED:
            return
        previous = self.state
        self.state = CLOSED
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        upstream = self.upstream.transport
        if upstream is not None and not upstream.is_closing():
            if previous == READY and self.tracker.idle and not self._client_done:
                upstream.write(m.TERMINATE_MESSAGE)
            # Closing (not aborting) flushes what is queued; PostgreSQL rolls back an open
            # transaction when its connection ends.
            upstream.close()
        client = self.client.transport
        if client is not None and not client.is_closing():
            client.close()
        if self.cancel_key is not None:
            self.server.cancels.forget(self.cancel_key)
        self.server.session_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)
        self.log.debug("closed", after=previous)

    # --- client side ----------------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        _HOT.bytes_client_to_upstream += len(data)
        self._calls += 1
        if self._calls & _SAMPLE_MASK == 0:
            started = time.perf_counter()
            self._client_data_checked(data)
            _PROCESSING_IN.observe(time.perf_counter() - started)
        else:
            self._client_data_checked(data)

    def _client_data_checked(self, data: bytes) -> None:
        try:
            if self.state == READY or self.state == AUTH:
                self._client_frames(data)
            elif self.state == STARTUP:
                self._client_startup(data)
            elif self.state == CONNECT:
                self.pending_client += data
        except MessageTooLarge as exc:
            metrics.PROTOCOL_ERRORS.labels("too_large").inc()
            self.log.warning("protocol_violation", reason=str(exc))
            self.refuse(exc.sqlstate, str(exc), None)
        except ProtocolViolation as exc:
            metrics.PROTOCOL_ERRORS.labels("malformed").inc()
            self.log.warning("protocol_violation", reason=str(exc))
            self.refuse(exc.sqlstate, str(exc), None)
        except Exception:
            # A bug of ours: the connection's protocol state is unknown now, so end it the
            # way PostgreSQL ends a session it cannot continue, rather than dropping it.
            self.log.exception("internal_error")
            self.refuse("XX000", "dualwrite: internal error; the connection was closed", None)

    def _client_lost(self, exc: Exception | None) -> None:
        if self.state != CLOSED:
            self.log.debug("client_disconnected", in_transaction=self.tracker.status != b"I")
        self.close()

    def _client_eof(self) -> bool:
        """The client sends no more but may still read: pass the EOF on, as a direct
        connection would, and relay the server's replies until the server closes."""
        self._client_done = True
        if self.state == CONNECT:
            return True  # _connect passes the EOF on after the bytes buffered meanwhile
        upstream = self.upstream.transport
        if (
            self.state in (AUTH, READY)
            and upstream is not None
            and not upstream.is_closing()
            and upstream.can_write_eof()
        ):
            upstream.write_eof()
            return True
        self.close()
        return True

    def _client_full(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def _client_drained(self) -> None:
        if self.upstream.transport is not None and not self.upstream.transport.is_closing():
            self.upstream.transport.resume_reading()

    def _client_startup(self, data: bytes) -> None:
        self.startup_buffer += data
        while self.state == STARTUP and len(self.startup_buffer) >= 4:
            length = m.startup_packet_length(bytes(self.startup_buffer[:4]), MAX_STARTUP_PACKET)
            if len(self.startup_buffer) < length:
                return
            packet = m.parse_startup_packet(bytes(self.startup_buffer[:length]))
            raw = bytes(self.startup_buffer[:length])
            del self.startup_buffer[:length]
            self._on_startup_packet(packet, raw)

    def _on_startup_packet(self, packet: m.StartupPacket, raw: bytes) -> None:
        client = self.client.transport
        assert client is not None
        if packet.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
            # TLS and GSS encryption towards clients are not offered; clients fall back to
            # plain text (or fail if they insist), exactly as with a server without SSL.
            client.write(b"N")
            return
        if packet.code == m.CANCEL_REQUEST_CODE:
            self.server.cancels.forward(m.parse_cancel_request(packet))
            self.close()
            return
        if packet.code >> 16 != _PROTOCOL_MAJOR:
            major, minor = packet.code >> 16, packet.code & 0xFFFF
            self.refuse(
                "0A000",
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
                "protocol_error",
            )
            return
        self.startup_params = packet.parameters()
        self.log = self.log.bind(
            user=self.startup_params.get("user"),
            database=self.startup_params.get("database", self.startup_params.get("user")),
        )
        if self.server.shutting_down:
            self.refuse("57P03", "the database system is shutting down", "shutting_down")
            return
        if self.server.at_capacity():
            # Answer the way PostgreSQL does once its own slots are gone.
            self.refuse("53300", "sorry, too many clients already", "max_connections")
            return
        self.state = CONNECT
        self.pending_client += self.startup_buffer
        self.startup_buffer.clear()
        self._connect_task = asyncio.get_running_loop().create_task(self._connect(raw))

    async def _connect(self, startup_packet: bytes) -> None:
        try:
            transport, _ = await connect_upstream(self.server.config.upstream, self.upstream)
        except UpstreamUnavailable as exc:
            metrics.UPSTREAM_CONNECT_ERRORS.inc()
            self.log.warning("upstream_unavailable", reason=str(exc))
            self.refuse(exc.sqlstate, str(exc), "upstream_unavailable")
            return
        if self.state == CLOSED:
            transport.close()
            return
        self.upstream.transport = transport
        transport.set_write_buffer_limits(high=self.server.config.limits.write_buffer_high_bytes)
        self.state = AUTH
        transport.write(startup_packet)
        if self.pending_client:
            pending = bytes(self.pending_client)
            self.pending_client.clear()
            self._client_data_checked(pending)
        if self._client_done and self.state != CLOSED:
            if transport.can_write_eof():
                transport.write_eof()
            else:
                self.close()

    def _startup_timed_out(self) -> None:
        if self.state in (STARTUP, CONNECT, AUTH):
            exc = StartupTimeout("timeout expired before the connection finished starting up")
            self.log.warning("startup_timeout", state=self.state)
            self.refuse(exc.sqlstate, str(exc), "startup_timeout")

    def _client_frames(self, data: bytes) -> None:
        """Relay typed client messages; record those that expect a reply."""
        buf, ready, kinds, starts, flags, ends, after, _ = self.client_scan.feed(data)
        if not ready:
            return
        upstream = self.upstream.transport
        if upstream is None or upstream.is_closing():
            return
        if kinds and self.state == READY:
            if flags & _INSPECT:
                if not (
                    # the commonest inspected read: one simple Query that concerns no mapping
                    kinds == _ONE_QUERY and self.frontend.plain_query(buf[starts[0] + 5 : ready])
                ):
                    self._client_inspect(upstream, buf, ready, starts[0])
                    return
            elif flags & _NAMED and not self.frontend.plain_extended(buf, kinds, starts):
                # Bind/Describe/Execute/Close naming a rewritten statement or portal
                self._client_inspect(upstream, buf, ready, starts[0])
                return
            self.tracker.sent(kinds, ends, after)
        upstream.write(buf if ready == len(buf) else memoryview(buf)[:ready])

    def _client_inspect(
        self, upstream: asyncio.Transport, buf: bytes, ready: int, first: int
    ) -> None:
        """Slow path: look at every frame of this read (a Query, Parse, or rewritten portal)."""
        frontend = self.frontend
        out: list[bytes | memoryview] = []
        # Bytes before the first inspected frame are whole uninspected frames (or the end of
        # a streamed one) unless the proxy is discarding a refused pipeline.
        run = first if frontend.discarding else 0
        pos = first
        while pos < ready:
            end = frame_end(buf, pos)
            if end > ready:
                break  # the first piece of a streamed frame: forwarded as it is
            typ = buf[pos]
            if typ == m.TERMINATE:
                self._terminating = True
            replacement, entries = frontend.message(typ, buf[pos + 5 : end])
            for entry in entries:
                self._expect(entry)
            if replacement is not None:
                if pos > run:
                    out.append(memoryview(buf)[run:pos])
                if replacement:
                    out.append(replacement)
                run = end
            pos = end
        if ready > run:
            out.append(memoryview(buf)[run:ready])
        if out:
            upstream.write(b"".join(out))
        self.client_scan.table = (
            _CLIENT_TABLE_ALL
            if frontend.discarding
            else _CLIENT_TABLE_REWRITING
            if frontend.inspects_extended
            else _CLIENT_TABLE
        )
        if self._terminating:
            self.close()

    def _expect(self, entry: int | Pending) -> None:
        """Queue one expected reply; answer at once if it is the proxy's own and due now."""
        tracker = self.tracker
        tracker.expect(entry)
        if type(entry) is not Pending:
            return
        if entry.plan is not None:
            self.server_scan.table = _SERVER_TABLE_ALL
        if entry.inject is not None and tracker.queue and tracker.queue[0] is entry:
            client = self.client.transport
            injected = tracker.take_injections()
            if client is not None and not client.is_closing():
                client.write(injected)

    # --- upstream side --------------------------------------------------------------------

    def _upstream_data(self, data: bytes) -> None:
        _HOT.bytes_upstream_to_client += len(data)
        self._calls += 1
        if self._calls & _SAMPLE_MASK == 0:
            started = time.perf_counter()
            self._server_data(data)
            _PROCESSING_OUT.observe(time.perf_counter() - started)
        else:
            self._server_data(data)

    def _server_data(self, data: bytes) -> None:
        buf, ready, kinds, starts, flags, readies, after, _ = self.server_scan.feed(data)
        if not ready:
            return
        if kinds and kinds[-1] == m.ERROR_RESPONSE:
            # A FATAL is the server's last message (pg_terminate_backend, a failed login...).
            self._upstream_fatal = _is_fatal(buf, starts[-1])
        if flags & _PARAMETER:
            self._parameter_status(buf, kinds, starts)
        if self.state == READY:
            if self.tracker.queue is None:
                # FAST mode: nothing to repair; O(1) bookkeeping, one write.
                self.tracker.received(buf, kinds, starts, readies, after)
                self._send_client(buf, ready)
            else:
                self._server_frames(buf, ready, kinds, starts)
        elif self.state == AUTH:
            self._server_auth_frames(buf, ready, kinds, starts)

    def _upstream_lost(self, exc: Exception | None) -> None:
        if self.state == CLOSED:
            return
        if self._terminating or self._upstream_fatal or self._client_done:
            # The client asked for the close (Terminate or EOF), or the server's FATAL already
            # told it why: another error of ours after that would not be what PostgreSQL sends.
            self.close()
            return
        self.log.warning("upstream_closed", in_transaction=self.tracker.status != b"I")
        self.refuse("08006", "upstream server closed the connection unexpectedly", None)

    def _upstream_full(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def _upstream_drained(self) -> None:
        if self.client.transport is not None and not self.client.transport.is_closing():
            self.client.transport.resume_reading()

    def _parameter_status(self, buf: bytes, kinds: bytes, starts: list[int]) -> None:
        """Follow client_encoding and standard_conforming_strings: the rewrite decodes and
        lexes statement text with them."""
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.PARAMETER_STATUS:
                name, value = m.parse_parameter_status(buf[start + 5 : frame_end(buf, start)])
                self.frontend.server_parameter(
                    name.decode("ascii", "replace"), value.decode("ascii", "replace")
                )

    def _send_client(self, buf: bytes, ready: int) -> None:
        client = self.client.transport
        if client is not None and not client.is_closing():
            client.write(buf if ready == len(buf) else memoryview(buf)[:ready])
        if self.shutdown_requested and self._quiescent():
            self.refuse("57P01", "terminating connection due to administrator command", None)

    def _server_auth_frames(self, buf: bytes, ready: int, kinds: bytes, starts: list[int]) -> None:
        """Relay authentication unchanged; note the cancel key; READY at the first ReadyForQuery."""
        client = self.client.transport
        if client is None or client.is_closing():
            return
        if m.AUTHENTICATION in kinds and self._upstream_tls():
            buf, ready, kinds, starts = self._without_channel_binding(buf, ready, kinds, starts)
        for typ, start in zip(kinds, starts, strict=True):
            if typ == m.BACKEND_KEY_DATA:
                end = frame_end(buf, start)
                self.cancel_key = m.parse_backend_key_data(buf[start + 5 : end])
                self.server.cancels.register(self.cancel_key, self)
            elif typ == m.READY_FOR_QUERY:
                end = start + 6
                self.tracker.status = buf[start + 5 : end]
                client.write(buf[:end])
                self._became_ready()
                if end < ready:
                    # Frames after the first ReadyForQuery (rare) go through the READY path.
                    self._send_after_auth(buf[end:ready])
                return
        client.write(buf if ready == len(buf) else buf[:ready])

    def _upstream_tls(self) -> bool:
        upstream = self.upstream.transport
        return upstream is not None and upstream.get_extra_info("ssl_object") is not None

    def _without_channel_binding(
        self, buf: bytes, ready: int, kinds: bytes, starts: list[int]
    ) -> tuple[bytes, int, bytes, list[int]]:
        """Drop SCRAM-SHA-256-PLUS from the server's offer.

        Over a TLS upstream the server offers channel binding, but the client's own connection
        (to the proxy) is plain text: libpq rightly refuses a -PLUS offer there as a downgrade.
        Without it the client binds nothing and says so ('n'), which the server accepts.
        """
        pieces: list[bytes] = []
        run = 0
        for typ, start in zip(kinds, starts, strict=True):
            end = frame_end(buf, start)
            if typ == m.AUTHENTICATION and m.auth_code(buf[start + 5 : end]) == m.AUTH_SASL:
                pieces += [buf[run:start], m.sasl_without_plus(buf[start + 5 : end])]
                run = end
        if not pieces:
            return buf, ready, kinds, starts
        # Only whole frames (buf[:ready]) are rebuilt; what follows stays in the scanner.
        rebuilt = b"".join([*pieces, buf[run:ready]])
        found = FrameScanner(_SERVER_TABLE).feed(rebuilt)
        return rebuilt, len(rebuilt), found[2], found[3]

    def _send_after_auth(self, rest: bytes) -> None:
        scanner = FrameScanner(_SERVER_TABLE)
        buf, ready, kinds, starts, flags, readies, after, _ = scanner.feed(rest)
        if flags & _PARAMETER:
            self._parameter_status(buf, kinds, starts)
        self.tracker.received(buf, kinds, starts, readies, after)
        self._send_client(buf, ready)

    def _became_ready(self) -> None:
        self.state = READY
        if self._startup_timer is not None:
            self._startup_timer.cancel()
            self._startup_timer = None
        self.log.info("session_ready", application=self.startup_params.get("application_name"))
        if self.shutdown_requested and self._quiescent():
            self.refuse("57P01", "terminating connection due to administrator command", None)

    def _server_frames(self, buf: bytes, ready: int, kinds: bytes, starts: list[int]) -> None:
        """PRECISE mode: match each reply to its entry; repair rewritten replies."""
        client = self.client.transport
        if client is None or client.is_closing():
            return
        tracker = self.tracker
        queue = tracker.queue
        assert queue is not None
        out: list[bytes | memoryview] = []
        run = 0
        for typ, start in zip(kinds, starts, strict=True):
            head = queue[0] if queue else None
            if type(head) is int:
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
            run = self._reply_slow(out, buf, run, start, frame_end(buf, start), typ)
        if not out:
            client.write(buf if ready == len(buf) else memoryview(buf)[:ready])
        else:
            if ready > run:
                out.append(memoryview(buf)[run:ready])
            client.write(b"".join(out))
        if tracker.settle():
            self.server_scan.table = _SERVER_TABLE
        if self.shutdown_requested and self._quiescent():
            self.refuse("57P01", "terminating connection due to administrator command", None)

    def _reply_slow(
        self, out: list[bytes | memoryview], buf: bytes, run: int, start: int, end: int, typ: int
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

    def describe(self) -> dict[str, Any]:
        """A summary for logs and /status (no secrets, no statement text)."""
        return {
            "conn_id": self.conn_id,
            "state": self.state,
            "user": self.startup_params.get("user"),
            "database": self.startup_params.get("database"),
            "transaction_status": self.tracker.status.decode(),
            "pending_cycles": self.tracker.cycles + len(self.tracker.queue or ()),
        }


def _is_fatal(buf: bytes, start: int) -> bool:
    """True when the ErrorResponse at ``start`` has severity FATAL or PANIC."""
    fields = dict(m.parse_fields(buf[start + 5 : frame_end(buf, start)]))
    severity = fields.get(m.FIELD_SEVERITY_NONLOCALIZED, fields.get(m.FIELD_SEVERITY, b""))
    return severity in (b"FATAL", b"PANIC")


_REPLY_KINDS: Final = frozenset(
    {m.PARSE, m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE, m.SYNC, m.QUERY, m.FUNCTION_CALL}
)
_ONE_QUERY: Final = bytes((m.QUERY,))
#: table bit: the frame needs a closer look than recording that it expects a reply
_INSPECT: Final = 4
#: table bit: a ParameterStatus (client_encoding is followed)
_PARAMETER: Final = 8
#: client frames: every message that expects a reply is reported, cycle ends are marked,
#: Query/Parse (statement text) and Terminate are inspected
_CLIENT_TABLE: Final = type_table(
    _REPLY_KINDS, mark=CYCLE_END, flag_4={m.QUERY, m.PARSE, m.TERMINATE}
)
#: table bit: Bind/Describe/Execute/Close, which may name a rewritten statement or portal
_NAMED: Final = 16
#: the same once statements of this session were rewritten: Bind, Describe, Execute and Close
#: then name statements and portals whose replies may need repair. A read of them that names
#: none is recognised by Frontend.plain_extended and takes the fast path all the same.
_CLIENT_TABLE_REWRITING: Final = type_table(
    _REPLY_KINDS,
    mark=CYCLE_END,
    flag_4={m.QUERY, m.PARSE, m.TERMINATE},
    flag_16={m.BIND, m.DESCRIBE, m.EXECUTE, m.CLOSE},
)
#: every client frame inspected: while a refused pipeline is being discarded
_CLIENT_TABLE_ALL: Final = type_table(range(256), mark=CYCLE_END, flag_4=range(256))
_ASYNC_DATA: Final = {m.DATA_ROW, m.COPY_DATA, m.NOTICE_RESPONSE, m.NOTIFICATION_RESPONSE}
#: server frames while nothing needs repair: everything but rows, copy data and the
#: asynchronous messages (none of which moves the tracker); ReadyForQuery marked
_SERVER_TABLE: Final = type_table(
    set(range(256)) - _ASYNC_DATA - {m.PARAMETER_STATUS},
    mark={m.READY_FOR_QUERY},
    flag_8={m.PARAMETER_STATUS},
)
#: server frames while a reply is being repaired: all of them
_SERVER_TABLE_ALL: Final = type_table(
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

__all__ = ["DualwriteError", "Session"]
