"""The sidecar's side of the shadow worker process: start it, feed its metrics in, restart it.

:class:`ShadowProcess` starts proxy/shadow/worker.py with the ``spawn`` context (a fresh
interpreter: no copy of the relay's sockets, threads or event loop), gives the tap a bounded
queue of ``shadow.queue`` captures, and watches two file descriptors on the relay's event loop:
the worker's pipe (metric deltas, answers) and its process sentinel. Nothing here ever waits
on the worker on the relay's path.

Metrics stay in the sidecar's registry (core/metrics.py): the worker ships outcome counts and
latency ratios and this adds them (prometheus multiprocess mode would change how every metric
of the sidecar is stored and served, for one small stream of numbers). A worker that dies
(killed, out of memory, a bug) is logged, counted in ``dualwrite_shadow_worker_restarts_total``
and started again after a backoff; the tap gets a new queue, because a reader killed inside
``get()`` may hold the old queue's lock forever. What the dead worker had queued or judged but
not yet flushed is lost (at most ``shadow.queue`` captures and ``flush_interval_seconds`` of
results); the application's statements never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any, Final

from core import metrics
from core.logs import get_logger
from proxy.shadow import worker
from proxy.shadow.tap import ShadowTap

#: seconds before a dead worker is started again; doubled while it keeps dying young
RESTART_SECONDS: Final = 1.0
RESTART_MAX_SECONDS: Final = 30.0
#: a worker that lived this long resets the backoff
STABLE_SECONDS: Final = 30.0
#: seconds a stopping worker gets to flush before it is terminated
STOP_SECONDS: Final = 10.0

_log = get_logger("shadow")
_OUTCOMES = metrics.HOT.shadow_statements


class ShadowProcess:
    """One shadow worker process, kept running while the sidecar runs."""

    def __init__(self, settings: worker.WorkerSettings, tap: ShadowTap) -> None:
        self.settings = settings
        self.tap = tap
        self.context = multiprocessing.get_context("spawn")
        self.process: SpawnProcess | None = None
        self.channel: Connection | None = None
        self.restarts = 0
        self._started_at = 0.0
        self._backoff = RESTART_SECONDS
        self._restart: asyncio.TimerHandle | None = None
        self._stopping = False
        self._token = 0
        self._flushes: dict[int, asyncio.Future[None]] = {}
        self._stopped: asyncio.Future[None] | None = None
        self._reaper: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        process = self.process
        return process.pid if process is not None and process.is_alive() else None

    async def start(self) -> None:
        metrics.SHADOW_QUEUE_DEPTH.set_function(self.tap.depth)
        self._spawn()

    def _new_queue(self) -> Queue[Any]:
        captures: Queue[Any] = self.context.Queue(self.settings.shadow.queue)
        # the worker may die with captures still in the pipe: the feeder thread must not
        # print a traceback for the broken pipe then
        setattr(captures, "_ignore_epipe", True)  # noqa: B010 - no public setter
        return captures

    def _spawn(self) -> None:
        self._restart = None
        if self._stopping:
            return
        captures = self._new_queue()
        ours, theirs = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=worker.main,
            args=(self.settings, captures, theirs),
            name="dualwrite-shadow",
            daemon=True,
        )
        process.start()
        theirs.close()
        self.process, self.channel = process, ours
        self._started_at = time.monotonic()
        old, self.tap.queue = self.tap.queue, captures
        _close_queue(old)
        loop = asyncio.get_running_loop()
        loop.add_reader(ours.fileno(), self._read)
        loop.add_reader(process.sentinel, self._died)
        _log.info("shadow_worker_spawned", pid=process.pid)

    # --- the worker's messages --------------------------------------------------------------

    def _read(self) -> None:
        self._message()

    def _message(self) -> bool:
        """Take one message from the worker; False at end of file (the worker is gone)."""
        channel = self.channel
        assert channel is not None
        try:
            message = channel.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(channel.fileno())
            return False
        kind = message[0]
        if kind == "metrics":
            for outcome, count in message[1].items():
                _OUTCOMES[outcome] += count
            observe = metrics.SHADOW_LATENCY_RATIO.observe
            for ratio in message[2]:
                observe(ratio)
        elif kind == "flushed":
            waiter = self._flushes.pop(message[1], None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == "stopped" and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)
        return True

    def _died(self) -> None:
        process, channel = self.process, self.channel
        assert process is not None
        assert channel is not None
        # (the sentinel can be readable a moment before the process can be reaped: from now
        # on it is gone for pid and flush, whatever is_alive() still says)
        self.process = None
        loop = asyncio.get_running_loop()
        loop.remove_reader(process.sentinel)
        with contextlib.suppress(OSError, ValueError):
            # what it sent before it died is still worth reading
            while channel.poll() and self._message():
                pass
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(channel.fileno())
        channel.close()
        for waiter in self._flushes.values():
            if not waiter.done():
                waiter.set_result(None)
        self._flushes.clear()
        if self._stopping:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(None)
            return
        lived = time.monotonic() - self._started_at
        if lived >= STABLE_SECONDS:
            self._backoff = RESTART_SECONDS
        delay = self._backoff
        self._backoff = min(self._backoff * 2, RESTART_MAX_SECONDS)
        self.restarts += 1
        metrics.SHADOW_WORKER_RESTARTS.inc()
        self._restart = loop.call_later(delay, self._spawn)
        self._reaper = loop.create_task(self._reap(process, lived, delay))

    async def _reap(self, process: SpawnProcess, lived: float, delay: float) -> None:
        """Wait for the dead worker's exit status off the loop, then log it."""
        await asyncio.get_running_loop().run_in_executor(None, process.join, 5.0)
        _log.error(
            "shadow_worker_died",
            pid=process.pid,
            exitcode=process.exitcode,
            lived_seconds=round(lived, 1),
            restart_in_seconds=delay,
        )

    # --- asked by the sidecar ---------------------------------------------------------------

    async def flush(self, wait_seconds: float = 30.0) -> None:
        """Ask the worker to write its results now; returns when it has (or is gone)."""
        channel = self.channel
        if channel is None or self.pid is None:
            return
        self._token += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes[self._token] = waiter
        try:
            channel.send(("flush", self._token))
        except (OSError, ValueError):
            self._flushes.pop(self._token, None)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter, wait_seconds)

    async def stop(self) -> None:
        """Stop the worker (it flushes first); terminate it if it takes too long."""
        self._stopping = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        process, channel = self.process, self.channel
        if process is not None and channel is not None and process.is_alive():
            self._stopped = asyncio.get_running_loop().create_future()
            with contextlib.suppress(OSError, ValueError):
                channel.send(("stop",))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._stopped), STOP_SECONDS)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, process.join, 2.0)
            if process.is_alive():
                _log.warning("shadow_worker_terminated", pid=process.pid)
                process.kill()
                await loop.run_in_executor(None, process.join, 5.0)
            with contextlib.suppress(OSError, ValueError):
                loop.remove_reader(process.sentinel)
        if channel is not None:
            with contextlib.suppress(OSError, ValueError):
                asyncio.get_running_loop().remove_reader(channel.fileno())
            channel.close()
        old, self.tap.queue = self.tap.queue, None
        _close_queue(old)
        metrics.SHADOW_QUEUE_DEPTH.set_function(lambda: 0)
        if self._reaper is not None:
            await asyncio.gather(self._reaper, return_exceptions=True)


def _close_queue(captures: Queue[Any] | None) -> None:
    if captures is not None:
        captures.cancel_join_thread()
        captures.close()


__all__ = ["ShadowProcess"]
