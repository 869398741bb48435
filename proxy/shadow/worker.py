"""The shadow's worker process: replays and judges captured reads away from the relay's process.

The sidecar (proxy/shadow/supervisor.py) starts it with the ``spawn`` context and hands it the
bounded capture queue the relay's tap fills and one duplex pipe. The worker owns the shadow's
connections (at most ``max_sessions``) and its own connection for writing results to the
control schema; it runs at a lower CPU priority (:data:`NICENESS`), so on a busy machine the
relay and PostgreSQL come first. Over the pipe it sends, at most every
:data:`SHIP_SECONDS`, the outcome counts and latency ratios judged since the last message (the
sidecar adds them to its own metrics: metrics live in the sidecar's registry, not here), and
answers ``flush`` and ``stop``. When the pipe reaches end of file (the sidecar is gone) it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue as queue_module
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from typing import Any, Final

import asyncpg

from core.config import ShadowConfig
from core.logs import configure_logging, get_logger
from core.rowsecurity import connect_unfiltered
from core.sqltext import quote_ident
from proxy.shadow.plan import Planner
from proxy.shadow.replay import ShadowReplayer
from proxy.shadow.tap import Capture

#: added to the worker's nice value: replays yield the CPU to the relay and the database
NICENESS: Final = 10
#: seconds between two metric messages to the sidecar (when something was judged)
SHIP_SECONDS: Final = 0.2
#: seconds a blocked queue read waits before looking whether the worker is stopping
GET_TIMEOUT: Final = 0.5

_log = get_logger("shadow")


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker process needs (pickled to it by ``spawn``)."""

    shadow: ShadowConfig
    search_path: list[str]
    #: the database the original (and, in views mode, the rewrite) runs in
    primary_dsn: str
    #: where results are written (the control schema); None: nowhere (not flushed)
    service_dsn: str | None
    log_level: str = "info"
    log_format: str = "json"
    #: the mappings' tenant columns: replays are attributed to tenants by them (empty: not)
    tenant_columns: frozenset[str] = frozenset()


def main(settings: WorkerSettings, captures: Queue[Any], channel: Connection) -> None:
    """The worker process's entry point."""
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    # the sidecar decides when the worker stops (a terminal's Ctrl-C reaches both)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(_Worker(settings, captures, channel).run())


async def connect_shadow(dsn: str, search_path: list[str]) -> asyncpg.Connection:
    """One shadow-read connection: no statement cache (every replay text differs) and the
    search_path unqualified names resolve through in the configuration."""
    return await asyncpg.connect(
        dsn,
        statement_cache_size=0,
        server_settings={
            "application_name": "dualwrite-shadow",
            "search_path": ", ".join(quote_ident(schema) for schema in search_path),
        },
    )


class _Worker:
    def __init__(self, settings: WorkerSettings, captures: Queue[Any], channel: Connection):
        self.settings = settings
        self.captures = captures
        self.channel = channel
        self.stopping = asyncio.Event()
        self.counts: dict[str, int] = {}
        self.ratios: list[float] = []
        self._shipped = 0.0
        self._getter = ThreadPoolExecutor(
            max_workers=settings.shadow.max_sessions, thread_name_prefix="shadow-get"
        )
        self._commands: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        settings = self.settings
        shadow = settings.shadow
        other = shadow.dsn
        service = settings.service_dsn

        async def primary() -> asyncpg.Connection:
            return await connect_shadow(settings.primary_dsn, settings.search_path)

        async def other_server() -> asyncpg.Connection:
            assert other is not None
            return await connect_shadow(other, settings.search_path)

        async def service_connection() -> asyncpg.Connection:
            assert service is not None
            return await connect_unfiltered(service)

        replayer = ShadowReplayer(
            shadow,
            self._next_capture,
            Planner(
                shadow.views,
                settings.search_path,
                other_server=other is not None,
                tenant_columns=settings.tenant_columns,
            ),
            primary,
            other_server if other is not None else None,
            connect_service=service_connection if service is not None else None,
            on_verdict=self._verdict,
        )
        loop = asyncio.get_running_loop()
        loop.add_reader(self.channel.fileno(), self._command, replayer)
        await replayer.start()
        self._send(("ready", os.getpid()))
        _log.info("shadow_worker_started", pid=os.getpid(), sessions=shadow.max_sessions)
        shipper = loop.create_task(self._ship_loop())
        try:
            await self.stopping.wait()
        finally:
            loop.remove_reader(self.channel.fileno())
            shipper.cancel()
            await replayer.stop()
            await asyncio.gather(shipper, *self._commands, return_exceptions=True)
            self._ship()
            self._send(("stopped",))
            self._getter.shutdown(wait=False, cancel_futures=True)

    # --- captures ---------------------------------------------------------------------------

    async def _next_capture(self) -> Capture:
        loop = asyncio.get_running_loop()
        while True:
            capture = await loop.run_in_executor(self._getter, self._get)
            if capture is not None:
                return capture

    def _get(self) -> Capture | None:
        try:
            capture: Capture = self.captures.get(timeout=GET_TIMEOUT)
        except (queue_module.Empty, OSError, EOFError, ValueError):
            return None
        return capture

    # --- the pipe to the sidecar ------------------------------------------------------------

    def _verdict(self, outcome: str, ratio: float | None) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        if ratio is not None:
            self.ratios.append(ratio)

    async def _ship_loop(self) -> None:
        while True:
            await asyncio.sleep(SHIP_SECONDS)
            self._ship()

    def _ship(self) -> None:
        if not self.counts and not self.ratios:
            return
        counts, ratios = self.counts, self.ratios
        self.counts, self.ratios = {}, []
        self._send(("metrics", counts, ratios))

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            self.channel.send(message)
        except (OSError, ValueError):
            self.stopping.set()  # the sidecar is gone

    def _command(self, replayer: ShadowReplayer) -> None:
        try:
            message = self.channel.recv()
        except (EOFError, OSError):
            _log.warning("shadow_worker_orphaned", pid=os.getpid())
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.stopping.set()
            return
        if message[0] == "flush":
            self._commands.append(
                asyncio.get_running_loop().create_task(self._flush(replayer, message[1]))
            )
        elif message[0] == "stop":
            self.stopping.set()

    async def _flush(self, replayer: ShadowReplayer, token: int) -> None:
        started = time.monotonic()
        await replayer.flush()
        self._ship()
        self._send(("flushed", token, time.monotonic() - started))


__all__ = ["WorkerSettings", "connect_shadow", "main"]
