"""CancelRequest routing: which live session owns a backend key, and forwarding the cancel to it.

Backend keys pass through to clients unchanged (so ``pg_backend_pid()`` and the key a client
holds agree), which means a CancelRequest can be forwarded as-is. It is forwarded only when the
key belongs to a session that is live in this proxy: a guessed or stale key is dropped, as
PostgreSQL itself would silently ignore it.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol

from core import metrics
from core.config import UpstreamConfig
from core.errors import UpstreamUnavailable
from core.logs import get_logger
from proxy.upstream import connect_upstream
from proxy.wire.messages import CancelKey, build_cancel_request


class CancelOwner(Protocol):
    """A session as cancel routing sees it (proxy.session.Session)."""

    @property
    def conn_id(self) -> int: ...

_log = get_logger("proxy.cancel")


class _Sink(asyncio.Protocol):
    """The cancel connection gets no reply; we only wait for the server to close it."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


class CancelRegistry:
    """Backend keys of live sessions, and the forwarding of cancels to the upstream server."""

    def __init__(self, upstream: UpstreamConfig) -> None:
        self._upstream = upstream
        self._sessions: weakref.WeakValueDictionary[CancelKey, CancelOwner] = (
            weakref.WeakValueDictionary()
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def register(self, key: CancelKey, session: CancelOwner) -> None:
        self._sessions[key] = session

    def forget(self, key: CancelKey) -> None:
        self._sessions.pop(key, None)

    def forward(self, key: CancelKey) -> asyncio.Task[None] | None:
        """Send the cancel upstream in the background if the key is one of ours; the task
        ends once the server has closed the cancel connection (None: the key is unknown)."""
        session = self._sessions.get(key)
        if session is None:
            metrics.CANCEL_REQUESTS.labels("unknown_key").inc()
            _log.info("cancel_ignored", reason="unknown backend key")
            return None
        task = asyncio.get_running_loop().create_task(self._send(key, session.conn_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _send(self, key: CancelKey, conn_id: int) -> None:
        try:
            transport, sink = await connect_upstream(self._upstream, _Sink())
        except UpstreamUnavailable as exc:
            metrics.CANCEL_REQUESTS.labels("failed").inc()
            _log.warning("cancel_failed", conn_id=conn_id, reason=str(exc))
            return
        transport.write(build_cancel_request(key))
        try:
            async with asyncio.timeout(self._upstream.connect_timeout_seconds):
                await sink.done
        except TimeoutError:
            transport.close()
        metrics.CANCEL_REQUESTS.labels("forwarded").inc()
        _log.info("cancel_forwarded", conn_id=conn_id)

    async def wait_idle(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
