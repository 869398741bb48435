"""Service wiring for ``dualwrite run``: starts the parts in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from dualwrite.config import Config
from dualwrite.logs import get_logger
from proxy.admin import AdminHooks, AdminServer
from proxy.server import ProxyServer

_log = get_logger("service")


async def upstream_reachable(config: Config) -> tuple[bool, str]:
    """Readiness: a TCP connection to the upstream server opens."""
    upstream = config.upstream
    try:
        async with asyncio.timeout(upstream.connect_timeout_seconds):
            _, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except (OSError, TimeoutError) as exc:
        return False, f"{upstream.host}:{upstream.port}: {exc}"
    writer.close()
    return True, f"{upstream.host}:{upstream.port}"


class Sidecar:
    """Everything ``dualwrite run`` runs, startable in-process (the tests do this)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proxy = ProxyServer(config)
        hooks = AdminHooks(
            checks={"upstream": lambda: upstream_reachable(config)},
            status=self.status,
        )
        self.admin = AdminServer(config.admin, hooks)
        self.stopping = asyncio.Event()
        self._stopped = False

    async def start(self) -> None:
        await self.admin.start()
        await self.proxy.start()

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain the proxy within the grace period, then stop the admin server."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown.grace_seconds if grace_seconds is None else grace_seconds
        await self.proxy.shutdown(grace)
        await self.admin.stop()

    async def status(self) -> dict[str, Any]:
        return {"proxy": self.proxy.status()}


async def run_until_signalled(config: Config) -> int:
    """Run the sidecar until SIGTERM/SIGINT; a second signal exits at once."""
    sidecar = Sidecar(config)
    await sidecar.start()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            _log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            sidecar.proxy.close_all()
            sys.stderr.flush()
            os._exit(0)
        _log.info(
            "shutdown_requested",
            signal=signal.Signals(signum).name,
            grace_seconds=config.shutdown.grace_seconds,
        )
        sidecar.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await sidecar.stopping.wait()
    await sidecar.stop()
    _log.info("stopped")
    return 0


def install_event_loop_policy() -> None:
    """Use uvloop where it is installed: the relay is measurably faster on it."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
