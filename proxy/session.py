"""One client connection relayed to one upstream connection: the asyncio glue around the relay.

Every protocol decision is made by the sans-IO core in proxy/relay.py (startup and
authentication in proxy/startup.py); this module owns only what touches the event loop: the
two sockets' protocols, the upstream connect task, the startup timer, backpressure, and
carrying out the core's effects (writes, closes, cancel routing).

Backpressure both ways: when one side's write buffer passes the high-water mark the other
side stops being read.

Once READY, a session that qualifies is relayed by the native loop (proxy/native.py) whenever
the core is in its plain steady state: the transports are paused meanwhile, and what must not
touch them while the loop runs (close, shutdown requests) waits for the loop to hand back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

from core import metrics
from core.errors import INTERNAL_ERROR, UpstreamUnavailable
from core.logs import get_logger
from proxy import native
from proxy.host import SessionHost
from proxy.relay import (
    CancelKeyKnown,
    Close,
    Connect,
    Effects,
    EndUpstream,
    ForwardCancel,
    Relay,
    Started,
    State,
    ToClient,
    ToServer,
)
from proxy.tracker import ResponseTracker
from proxy.upstream import connect_upstream
from proxy.wire import messages as m

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
    """The relay of one client connection: two sockets around one ``Relay``."""

    def __init__(self, server: SessionHost, conn_id: int) -> None:
        self.server = server
        self.conn_id = conn_id
        self.relay = Relay(server, get_logger("proxy").bind(conn_id=conn_id))
        # bound once: these two run for every socket read
        self._from_client = self.relay.from_client
        self._from_server = self.relay.from_server
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
        self.cancel_key: m.CancelKey | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._startup_timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._calls = 0
        #: the native loop of this session (None: not READY yet, or it does not qualify)
        self.native: native.NativeRelay | None = None
        #: the native loop's leftovers are being fed through the Python path
        self.handing_back = False

    # --- what the rest of the proxy reads -------------------------------------------------

    @property
    def state(self) -> State:
        return self.relay.state

    @property
    def tracker(self) -> ResponseTracker:
        return self.relay.tracker

    @property
    def startup_params(self) -> dict[str, str]:
        return self.relay.startup_params

    @property
    def log(self) -> Any:
        return self.relay.log

    def describe(self) -> dict[str, Any]:
        """A summary for logs and /status (no secrets, no statement text)."""
        tracker = self.relay.tracker
        status = tracker.status.decode()
        if self.native is not None and self.native.running:
            status = chr(self.native.loop.status())  # (the tracker is updated at hand-back)
        return {
            "conn_id": self.conn_id,
            "state": self.relay.state.value,
            "user": self.startup_params.get("user"),
            "database": self.startup_params.get("database"),
            "transaction_status": status,
            "pending_cycles": tracker.cycles + len(tracker.queue or ()),
        }

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Called once the client socket is accepted."""
        assert self.client.transport is not None
        limits = self.server.config.limits
        self.client.transport.set_write_buffer_limits(high=limits.write_buffer_high_bytes)
        self._startup_timer = asyncio.get_running_loop().call_later(
            limits.startup_timeout_seconds, self._startup_timed_out
        )

    def request_shutdown(self) -> None:
        """Close as soon as no transaction or request is in flight (SIGTERM)."""
        if self.native is not None and self.native.running:
            self.native.after(self.request_shutdown)
            return
        self._apply(self.relay.request_shutdown())

    def force_close(self) -> None:
        """Close now (grace period over): tell the client why when a frame boundary allows."""
        if self.native is not None and self.native.running:
            self.native.after(self.force_close)
            return
        self._apply(self.relay.force_close())

    def close(self) -> None:
        if self.native is not None and self.native.running:
            self.native.after(self.close)
            return
        self._apply(self.relay.close())

    def internal_error(self) -> None:
        """A bug of ours outside the relay core: end the session as PostgreSQL would."""
        self._apply(self.relay.refuse(INTERNAL_ERROR.response()))

    # --- the native loop ------------------------------------------------------------------

    def maybe_native(self) -> None:
        """Hand the session to the native loop if it is at a point where the loop can take it."""
        loop = self.native
        if loop is not None and not self.handing_back and loop.ready():
            loop.enter()

    def _startup_timed_out(self) -> None:
        self._apply(self.relay.startup_timed_out())

    def _closed(self) -> None:
        """Carry out the core's Close: both sockets, timers, registrations."""
        if self.native is not None and self.native.running:
            self.native.after(self._closed)  # (the loop must not use the sockets meanwhile)
            return
        if self._startup_timer is not None:
            self._startup_timer.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        for side in (self.upstream, self.client):
            transport = side.transport
            if transport is not None and not transport.is_closing():
                transport.close()  # not abort: what is queued is flushed first
        if self.native is not None:
            self.native.close()
            self.native = None
        if self.cancel_key is not None:
            self.server.cancels.forget(self.cancel_key)
        self.server.session_closed(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # --- effects --------------------------------------------------------------------------

    def _apply(self, effects: Effects) -> None:
        for effect in effects:
            kind = type(effect)
            if kind is ToClient:
                self._write(self.client.transport, effect.data)  # type: ignore[union-attr]
            elif kind is ToServer:
                self._write(self.upstream.transport, effect.data)  # type: ignore[union-attr]
            elif kind is Close:
                self._closed()
            elif kind is Connect:
                self._connect_task = asyncio.get_running_loop().create_task(self._connect())
            elif kind is ForwardCancel:
                self._forward_cancel(effect.key)  # type: ignore[union-attr]
            elif kind is CancelKeyKnown:
                self.cancel_key = effect.key  # type: ignore[union-attr]
                self.server.cancels.register(self.cancel_key, self)
            elif kind is EndUpstream:
                self._end_upstream()
            elif kind is Started:
                if self._startup_timer is not None:
                    self._startup_timer.cancel()
                    self._startup_timer = None
                if native.qualifies(self):
                    self.native = native.NativeRelay(self)

    @staticmethod
    def _write(transport: asyncio.Transport | None, data: bytes | memoryview) -> None:
        if data and transport is not None and not transport.is_closing():
            transport.write(data)

    def _forward_cancel(self, key: m.CancelKey) -> None:
        """Forward the cancel; close this connection once that is done (or at once when the
        key is no live session's)."""
        forwarding = self.server.cancels.forward(key)
        if forwarding is None:
            self.close()
        else:
            forwarding.add_done_callback(lambda _: self.close())

    def _end_upstream(self) -> None:
        upstream = self.upstream.transport
        if upstream is not None and not upstream.is_closing() and upstream.can_write_eof():
            upstream.write_eof()
        else:
            self.close()

    # --- client side ----------------------------------------------------------------------

    def _client_data(self, data: bytes) -> None:
        _HOT.bytes_client_to_upstream += len(data)
        self._calls += 1
        if self._calls & _SAMPLE_MASK == 0:
            started = time.perf_counter()
            self._client_data_relayed(data)
            _PROCESSING_IN.observe(time.perf_counter() - started)
        else:
            self._client_data_relayed(data)

    def _client_data_relayed(self, data: bytes) -> None:
        forward, effects = self._from_client(data)
        if forward:
            upstream = self.upstream.transport
            if upstream is not None and not upstream.is_closing():
                upstream.write(forward)
        if effects:
            self._apply(effects)
        if self.native is not None:
            self.maybe_native()

    def _client_lost(self, exc: Exception | None) -> None:
        if self.relay.state is not State.CLOSED:
            self.log.debug("client_disconnected", in_transaction=self.relay.tracker.status != b"I")
        self.close()

    def _client_eof(self) -> bool:
        self._apply(self.relay.client_eof())
        return True  # keep the socket open for the replies still to come

    def _client_full(self) -> None:
        if self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def _client_drained(self) -> None:
        if self.upstream.transport is not None and not self.upstream.transport.is_closing():
            self.upstream.transport.resume_reading()
        if self.native is not None:
            self.maybe_native()

    async def _connect(self) -> None:
        try:
            transport, _ = await connect_upstream(self.server.config.upstream, self.upstream)
        except UpstreamUnavailable as exc:
            self._apply(self.relay.upstream_failed(exc))
            return
        if self.relay.state is State.CLOSED:
            transport.close()
            return
        self.upstream.transport = transport
        transport.set_write_buffer_limits(high=self.server.config.limits.write_buffer_high_bytes)
        tls = transport.get_extra_info("ssl_object") is not None
        forward, effects = self.relay.upstream_connected(tls=tls)
        transport.write(forward)
        self._apply(effects)

    # --- upstream side --------------------------------------------------------------------

    def _upstream_data(self, data: bytes) -> None:
        _HOT.bytes_upstream_to_client += len(data)
        self._calls += 1
        if self._calls & _SAMPLE_MASK == 0:
            started = time.perf_counter()
            self._upstream_data_relayed(data)
            _PROCESSING_OUT.observe(time.perf_counter() - started)
        else:
            self._upstream_data_relayed(data)

    def _upstream_data_relayed(self, data: bytes) -> None:
        forward, effects = self._from_server(data)
        if forward:
            client = self.client.transport
            if client is not None and not client.is_closing():
                client.write(forward)
        if effects:
            self._apply(effects)
        if self.native is not None:
            self.maybe_native()

    def _upstream_lost(self, exc: Exception | None) -> None:
        self._apply(self.relay.upstream_lost())

    def _upstream_full(self) -> None:
        if self.client.transport is not None:
            self.client.transport.pause_reading()

    def _upstream_drained(self) -> None:
        if self.client.transport is not None and not self.client.transport.is_closing():
            self.client.transport.resume_reading()
        if self.native is not None:
            self.maybe_native()


__all__ = ["Session"]
