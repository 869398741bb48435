"""The listening socket: accepts clients, enforces the connection limit, drains on shutdown."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Final

from core import metrics
from core.config import Config
from core.errors import STARTING_SHUTDOWN, TOO_MANY_CLIENTS, ClientError
from core.logs import get_logger
from proxy import native
from proxy.cancel import CancelRegistry
from proxy.host import MirrorContext
from proxy.relay import State
from proxy.session import Session

_log = get_logger("proxy")

#: states of a session that holds (or is about to hold) an upstream connection
_STARTED: Final = frozenset({State.CONNECT, State.AUTH, State.READY, State.DRAINING})


class ProxyServer:
    """Accepts client connections and relays each to its own upstream connection.

    It is the SessionHost (proxy/host.py) of every session it accepts.
    """

    def __init__(self, config: Config, mirror: MirrorContext | None = None) -> None:
        native.check(config)
        self.config = config
        self.mirror = mirror
        self.cancels = CancelRegistry(config.upstream)
        self.sessions: set[Session] = set()
        self.shutting_down = False
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)

    @property
    def port(self) -> int:
        """The port actually bound (useful when the config says 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        self._server = await loop.create_server(
            self._accept, listen.host, listen.port, reuse_address=True, backlog=1024
        )
        _log.info("listening", host=listen.host, port=self.port)

    def _accept(self) -> asyncio.Protocol:
        session = Session(self, next(self._ids))
        return session.client

    def session_started(self, session: Session) -> None:
        metrics.CLIENT_CONNECTIONS_TOTAL.inc()
        self.sessions.add(session)
        metrics.CLIENT_CONNECTIONS.set(len(self.sessions))
        session.start()

    def at_capacity(self) -> bool:
        """True when admitting one more started session would pass max_client_connections."""
        started = sum(1 for s in self.sessions if s.state in _STARTED)
        return started >= self.config.limits.max_client_connections

    def admission(self) -> ClientError | None:
        """Why a client that has sent its StartupMessage is refused now, or None."""
        if self.shutting_down:
            return STARTING_SHUTDOWN
        if self.at_capacity():
            # Answer the way PostgreSQL does once its own slots are gone.
            return TOO_MANY_CLIENTS
        return None

    def session_closed(self, session: Session) -> None:
        self.sessions.discard(session)
        metrics.CLIENT_CONNECTIONS.set(len(self.sessions))

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting; let open transactions finish within the grace period; then close."""
        self.shutting_down = True
        if self._server is not None:
            self._server.close()
        busy = [s for s in self.sessions if s.state is not State.CLOSED]
        _log.info("draining", sessions=len(busy), grace_seconds=grace_seconds)
        for session in list(busy):
            session.request_shutdown()
        waiting = [s.closed for s in busy if not s.closed.done()]
        if waiting:
            _, still_open = await asyncio.wait(waiting, timeout=grace_seconds)
            if still_open:
                _log.warning("grace_period_over", closing=len(still_open))
        self.close_all()
        await self.cancels.wait_idle()
        if self._server is not None:
            await self._server.wait_closed()

    def close_all(self) -> None:
        for session in list(self.sessions):
            session.force_close()

    def status(self) -> dict[str, Any]:
        return {
            "client_connections": len(self.sessions),
            "shutting_down": self.shutting_down,
        }


__all__ = ["MirrorContext", "ProxyServer"]
