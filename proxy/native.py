"""The native hot path of one session: hands steady-state relaying to the C loop and takes it back.

Once a session is READY and its relay core (proxy/relay.py) is in its plain steady state, both
sockets are relayed by ``proxy.wire._relayloop.Loop`` in a thread of the session's own, with
the GIL released: frame scanning, FAST-mode tracking, the mapped-name pre-filter and
forwarding run in C, and Python runs no code per socket read. The asyncio transports stay
open but paused (nothing is read or written through them meanwhile).

The loop stops before the first frame Python must see (a statement that may concern a
mapping, Terminate, COPY, an ErrorResponse, a ParameterStatus, anything unusual), on EOF or
a socket error, or when ``stop()`` is called (shutdown, close). It returns, per direction,
the bytes scanned but not written and the bytes read but not consumed; :meth:`NativeRelay.done`
puts the tracker's FAST state back, resumes the transports, writes what was pending and feeds
the rest through the ordinary Python path, which may hand the session back to the loop at the
next frame boundary where it qualifies again.

A session qualifies for the loop only when nothing must be seen per statement: no TLS either
way, no statement logging (``relay.native`` in the config; ``off`` keeps every session on the
Python path, which stays the reference). Shadow-read sessions stay on the Python path unless
``relay.native_shadow``; with it, the loop also stops at a Parse
naming a relation the shadow replays (every text in the ``dsn`` mode), and at such a simple
Query when its own draw at the sample rate says yes (the tap then takes it without drawing
again); the rest of the session's traffic stays in the loop. Traffic recording is done in batches:
the loop notes each Query and Parse text it relays, and hands the notes to the recorder when
they pass 64 KiB, at every hand-back, and at least twice per ``traffic.flush_interval_seconds``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, Final

from core import metrics
from core.config import Config
from core.errors import ConfigError
from proxy.relay import CLIENT_TABLE, CLIENT_TABLE_REWRITING, SERVER_TABLE, State

#: a proxy.session.Session (not imported: the session imports this module)
Session = Any

try:
    from proxy.wire._relayloop import Loop  # type: ignore[import-not-found]

    AVAILABLE = True
except ImportError:  # no compiler at install time: every session takes the Python path
    Loop = None
    AVAILABLE = False

#: why ``Loop.run`` returned (the C enum)
REASONS: Final = (
    "stopped",
    "client_frame",
    "server_frame",
    "client_eof",
    "server_eof",
    "client_error",
    "server_error",
    "internal",
    "notes",
)
#: the loop keeps at most this many message types of FAST-mode state per direction
_KINDS_MAX: Final = 200
#: a Query or Parse longer than this is handed to Python (which buffers it as before)
MAX_WHOLE: Final = 1 << 20
#: needles that send a simple Query to Python while prepared writes may be deallocated by it
_DROPS: Final = (b"discard", b"deallocate")

_QUERY: Final = ord("Q")
_HOT = metrics.HOT
_READY: Final = State.READY


def check(config: Config) -> None:
    """``relay.native: on`` needs the C extension: refuse to start without it."""
    if config.relay.native == "on" and not AVAILABLE:
        raise ConfigError(
            "relay.native", "is 'on' but the C extension proxy.wire._relayloop is not built"
        )


def qualifies(session: Session) -> bool:
    """Can this session (just READY) ever be relayed natively?"""
    if not AVAILABLE or session.server.config.relay.native == "off":
        return False
    relay = session.relay
    frontend = relay.frontend
    if relay.upstream_tls:
        return False
    if frontend.shadow is not None and not session.server.config.relay.native_shadow:
        return False
    if frontend.statement_log is not None:
        return False
    for side in (session.client, session.upstream):
        transport = side.transport
        if transport is None or transport.get_extra_info("ssl_object") is not None:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or sock.fileno() < 0:
            return False
    return True


class NativeRelay:
    """The native loop of one session, and the thread it runs in."""

    def __init__(self, session: Session) -> None:
        self.session = session
        relay = session.relay
        rewriter = relay.frontend.rewriter
        needles: tuple[bytes, ...] = ()
        if rewriter is not None:
            needles = tuple(rewriter.needles)
            if relay.frontend.prepared_writes is not None:
                needles += _DROPS
        client = session.client.transport
        upstream = session.upstream.transport
        assert client is not None
        assert upstream is not None
        self.loop = Loop(
            client.get_extra_info("socket").fileno(),
            upstream.get_extra_info("socket").fileno(),
            needles,
            rewriter is not None,
            session.server.config.limits.max_message_bytes,
            MAX_WHOLE,
            relay.frontend.traffic is not None,
            # with shadow reads, a Parse naming a relation they replay stops the loop (the
            # tap remembers the prepared read, which keeps the session on the Python path
            # while it exists, so that its executions are sampled at Bind), and so does such a
            # simple Query when the loop's own draw at the shadow's sample rate says yes
            None if relay.frontend.shadow is None else relay.frontend.shadow.tap.needles,
            1.0 if relay.frontend.shadow is None else relay.frontend.shadow.rate,
        )
        self.running = False
        #: the loop saw an EOF or a socket error: it does not run for this session again
        self.ended = False
        #: what to do once the loop has handed back (close, shutdown requests)
        self._after: list[Callable[[], None]] = []
        self._published = (0, 0, 0, 0, 0)
        self._requests: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._event_loop = asyncio.get_running_loop()
        #: times the loop was entered and why it returned (for tests and /status)
        self.entered = 0
        self.reasons: dict[str, int] = {}
        _HOT.live.add(self)
        #: with traffic recording, the texts the loop noted are fetched at least this often
        self._notes_timer: asyncio.TimerHandle | None = None
        self._notes_every = 0.0
        if relay.frontend.traffic is not None:
            self._notes_every = max(0.2, session.server.config.traffic.flush_interval_seconds / 2)
            self._notes_timer = self._event_loop.call_later(self._notes_every, self._notes_due)

    def _notes_due(self) -> None:
        """Texts noted by a running loop reach the recorder before its next flush."""
        if self.running and self.loop.notes_pending():
            self.loop.stop()
        self._notes_timer = self._event_loop.call_later(self._notes_every, self._notes_due)

    # --- entering ------------------------------------------------------------------------

    def ready(self) -> bool:
        """Is the session at a point where the loop can take over?"""
        session = self.session
        relay = session.relay
        if relay.state is not _READY or self.running or self.ended:
            return False
        tracker = relay.tracker
        if tracker.queue is not None or tracker.injections:
            return False
        if len(tracker.open) > _KINDS_MAX or len(tracker.since_ready) > _KINDS_MAX:
            return False
        if relay.client_scan.mid_frame or relay.server_scan.mid_frame:
            return False
        frontend = relay.frontend
        table = relay.client_scan.table
        # (the relay picks its client table on the full path only: a fast-path Query that
        # ended the last inspected statement, such as a simple Query destroying the unnamed
        # statement the shadow watched, leaves the rewriting table set with nothing to inspect)
        if table is not CLIENT_TABLE and not (
            table is CLIENT_TABLE_REWRITING and not frontend.inspects_extended
        ):
            return False
        if relay.server_scan.table is not SERVER_TABLE:
            return False
        if relay.shutdown_requested or relay.client_done:
            return False
        if frontend.discarding or frontend.inspects_extended:
            return False
        writes = frontend.prepared_writes
        if writes is not None and writes.pending:
            return False
        for side in (session.client, session.upstream):
            transport = side.transport
            if transport is None or transport.is_closing() or transport.get_write_buffer_size():
                return False
        return True

    def enter(self) -> None:
        """Pause both transports and start the loop (call only when ``ready()``)."""
        session = self.session
        assert session.client.transport is not None
        assert session.upstream.transport is not None
        session.client.transport.pause_reading()
        session.upstream.transport.pause_reading()
        # the plain table: ready() allowed the rewriting one only with nothing to inspect
        session.relay.client_scan.table = CLIENT_TABLE
        tracker = session.relay.tracker
        self.running = True
        self.entered += 1
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"relay-{session.conn_id}", daemon=True
            )
            self._thread.start()
        self._requests.put(
            (
                tracker.cycles,
                tracker.open,
                tracker.since_ready,
                tracker.status[0],
                tracker.unsynced,
                b"",
                b"",
            )
        )

    def _work(self) -> None:
        """The session's relay thread: runs the loop whenever asked, reports to the event loop."""
        while True:
            request = self._requests.get()
            if request is None:
                return
            result: Any
            try:
                result = self.loop.run(*request)
            except BaseException as exc:  # reported to the event loop, which ends the session
                result = exc
            try:
                self._event_loop.call_soon_threadsafe(self.done, result)
            except RuntimeError:  # the event loop is closed: nobody is left to tell
                return

    # --- handing back --------------------------------------------------------------------

    def after(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the loop has handed back (now if it is not running)."""
        if not self.running:
            action()
            return
        self._after.append(action)
        self.loop.stop()

    def done(self, result: Any) -> None:
        """The loop returned: restore the Python path's state and carry on there."""
        self.running = False
        self.publish()
        session = self.session
        if isinstance(result, BaseException):
            session.log.error("native_relay_failed", error=f"{type(result).__name__}: {result}")
            session.relay.log.exception("internal_error", exc_info=result)
            self._run_after()
            session.internal_error()
            return
        (
            reason,
            to_server,
            client_in,
            client_stream,
            to_client,
            server_in,
            server_stream,
            cycles,
            open_kinds,
            since_ready,
            status,
            unsynced,
            unexpected,
            unnamed_parse,
            notes,
        ) = result
        if notes:
            traffic = session.relay.frontend.traffic
            if traffic is not None:
                for kind, name_, sql in notes:
                    if kind == _QUERY:
                        traffic.query(sql)
                    else:
                        traffic.parse(name_, sql)
        name = REASONS[reason]
        self.reasons[name] = self.reasons.get(name, 0) + 1
        if name.endswith(("_eof", "_error")) or name == "internal":
            # The session is ending: the event loop must see the EOF or error for itself
            # (reading again finds it), so the loop does not take the session back.
            self.ended = True
        relay = session.relay
        tracker = relay.tracker
        tracker.cycles = cycles
        tracker.open = open_kinds
        tracker.since_ready = since_ready
        tracker.status = bytes((status,))
        tracker.unsynced = bool(unsynced)
        tracker.unexpected += unexpected
        if unnamed_parse:
            relay.frontend.unnamed_statement = True
        if self.loop.shadow_sampled() and relay.frontend.shadow is not None:
            # the loop stopped at a Query its own sample took: the tap must not draw again
            relay.frontend.shadow.sampled = True
        relay.client_scan._stream_left = client_stream
        relay.server_scan._stream_left = server_stream
        client = session.client.transport
        upstream = session.upstream.transport
        for transport in (client, upstream):
            if transport is not None and not transport.is_closing():
                transport.resume_reading()
        session.handing_back = True
        try:
            if to_server and upstream is not None and not upstream.is_closing():
                upstream.write(to_server)
            if to_client and client is not None and not client.is_closing():
                client.write(to_client)
            if client_in and relay.state is not State.CLOSED:
                session._client_data(client_in)
            if server_in and relay.state is not State.CLOSED:
                session._upstream_data(server_in)
        finally:
            session.handing_back = False
        self._run_after()
        session.maybe_native()

    def _run_after(self) -> None:
        actions, self._after = self._after, []
        for action in actions:
            action()

    def publish(self) -> None:
        """Add what the loop counted since the last call to the hot counters."""
        now = self.loop.counters()
        before = self._published
        self._published = now
        _HOT.bytes_client_to_upstream += now[0] - before[0]
        _HOT.bytes_upstream_to_client += now[1] - before[1]
        statements = _HOT.statements
        statements["read"] += now[2] - before[2]
        statements["write"] += now[3] - before[3]
        statements["other"] += now[4] - before[4]

    def close(self) -> None:
        """The session is over (the loop is not running): end the thread, close the duplicates."""
        assert not self.running
        self.publish()
        _HOT.live.discard(self)
        if self._notes_timer is not None:
            self._notes_timer.cancel()
            self._notes_timer = None
        if self._thread is not None:
            self._requests.put(None)
            self._thread = None
        self.loop.close()
