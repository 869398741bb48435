"""The sidecar under test: in-process on its own event-loop thread, or as a real subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import errno
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from core.config import Config, parse_config
from dualwrite.service import Sidecar

from .procs import free_port, port_open, wait_until


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in: dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


#: ``relay.native`` of every sidecar started here whose config does not say (the conftest's
#: ``relay_native`` fixture sets it per test module; ``DUALWRITE_TEST_RELAY_NATIVE`` elsewhere)
RELAY_NATIVE = {"mode": os.environ.get("DUALWRITE_TEST_RELAY_NATIVE", "auto")}


def with_relay_native(config_data: Mapping[str, Any]) -> dict[str, Any]:
    """``config_data`` with the test run's ``relay.native`` unless it sets its own."""
    return deep_merge({"relay": {"native": RELAY_NATIVE["mode"]}}, config_data)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (what ``dualwrite run`` uses), else asyncio's default loop."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SidecarEndpoints:
    """What both kinds of sidecar handle offer: ports, client DSNs, admin HTTP."""

    host = "127.0.0.1"

    def __init__(self, *, dbname: str, user: str, password: str | None) -> None:
        self.port = 0
        self.admin_port = 0
        self._dbname = dbname
        self._user = user
        self._password = password

    def dsn(
        self, dbname: str | None = None, *, user: str | None = None, password: str | None = None
    ) -> str:
        """A URL that connects through the proxy (to the test's database unless told)."""
        who = user or self._user
        secret = (
            password if password is not None else (self._password if who == self._user else None)
        )
        auth = quote(who, safe="") + (":" + quote(secret, safe="") if secret else "")
        name = quote(dbname or self._dbname, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{name}"

    def admin_url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.admin_port}{path}"

    def http(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, str]:
        """Request an admin endpoint: (status, body text); HTTP errors are returned, not raised."""
        request = urllib.request.Request(
            self.admin_url(path), method=method, headers=dict(headers or {})
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def http_json(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, body = self.http(path, **kwargs)
        return status, json.loads(body) if body else None


class InProcessSidecar(SidecarEndpoints):
    """A :class:`Sidecar` running on its own event loop in a background thread.

    Sync clients (psql, psycopg) and async clients on the test's own loop can all talk to it.
    Touch ``self.sidecar`` only through :meth:`call` / :meth:`acall`: it belongs to that loop.
    """

    def __init__(self, config: Config, *, dbname: str, user: str, password: str | None) -> None:
        super().__init__(dbname=dbname, user=user, password=password)
        self.config = config
        self.sidecar: Sidecar | None = None
        self.loop = new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        #: contexts of exceptions nobody handled on the sidecar's loop (tests may assert on them)
        self.loop_errors: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run_loop, name="sidecar-loop", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self.sidecar is not None

    def start(self, timeout: float = 30.0) -> InProcessSidecar:
        async def start() -> None:
            sidecar = Sidecar(self.config)
            try:
                await sidecar.start()
            except BaseException:
                await sidecar.stop(0)
                raise
            self.sidecar = sidecar

        self.call(start, timeout=timeout)
        assert self.sidecar is not None
        self.port = self.sidecar.proxy.port
        self.admin_port = self.sidecar.admin.port
        return self

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the sidecar's loop (awaiting it if it is async); its result."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("call() from the sidecar's own loop would deadlock; await instead")
        return asyncio.run_coroutine_threadsafe(self._invoke(fn, args), self.loop).result(timeout)

    async def acall(self, fn: Callable[..., Any], *args: Any) -> Any:
        """:meth:`call` for async tests: awaits without blocking the test's own loop."""
        future = asyncio.run_coroutine_threadsafe(self._invoke(fn, args), self.loop)
        return await asyncio.wrap_future(future)

    def stop(self, grace: float | None = 0.0, timeout: float = 60.0) -> None:
        """Stop the sidecar (``grace`` seconds for open transactions, None: the config's) and
        its loop."""
        try:
            if self.sidecar is not None:
                sidecar, self.sidecar = self.sidecar, None
                self.call(sidecar.stop, grace, timeout=timeout)
        finally:
            if self._thread.is_alive():
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(timeout)

    @staticmethod
    async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.loop_errors.append(context)
        loop.default_exception_handler(context)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()


def start_in_process(
    config_data: Mapping[str, Any],
    *,
    dbname: str,
    user: str,
    password: str | None,
    attempts: int = 5,
) -> InProcessSidecar:
    """Start a sidecar from a config dict; a listen port taken meanwhile is retried when the
    port was picked here (``listen.port`` absent or 0; PostgreSQL-style ``0`` is not a valid
    ``listen.port`` in the config, so a free one is chosen)."""
    pick_port = not config_data.get("listen", {}).get("port")
    config_data = with_relay_native(config_data)
    for attempt in range(attempts):
        data = dict(config_data)
        if pick_port:
            data = deep_merge(data, {"listen": {"port": free_port()}})
        handle = InProcessSidecar(parse_config(data), dbname=dbname, user=user, password=password)
        try:
            return handle.start()
        except OSError as exc:
            handle.stop()
            if not (pick_port and exc.errno == errno.EADDRINUSE and attempt + 1 < attempts):
                raise
        except BaseException:
            handle.stop()
            raise
    raise AssertionError("unreachable")


class SidecarProcess(SidecarEndpoints):
    """``python -m dualwrite run --config FILE`` as a child process, output captured to files."""

    def __init__(
        self,
        config_data: Mapping[str, Any],
        workdir: Path,
        *,
        dbname: str,
        user: str,
        password: str | None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(dbname=dbname, user=user, password=password)
        self.workdir = workdir
        self.config_data = dict(config_data)
        self.config_path = workdir / "dualwrite.yaml"
        self.stdout_path = workdir / "sidecar.stdout"
        self.stderr_path = workdir / "sidecar.stderr"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = int(self.config_data["listen"]["port"])
        self.admin_port = int(self.config_data["admin"]["port"])
        self.config_path.write_text(yaml.safe_dump(self.config_data, sort_keys=False))
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dualwrite", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=workdir,
            )
        try:
            wait_until(self._ready_or_exited, timeout, "the sidecar to answer /healthz")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"dualwrite run exited with {self.proc.returncode} before it was ready:\n"
                f"{self.output()}"
            )
        return self

    def _ready_or_exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            return True
        if not port_open(self.host, self.port):
            return False
        try:
            return self.http("/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM: a graceful drain."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all."""
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = 30.0) -> int:
        """Wait for exit and return the exit code (negative: killed by that signal)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stdout_text(self) -> str:
        return self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout_text()}--- stderr ---\n{self.stderr_text()}"

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines the process wrote (stderr, then stdout); other lines skipped."""
        records = []
        for line in (self.stderr_text() + self.stdout_text()).splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_process(
    config_data: Mapping[str, Any],
    workdir: Path,
    *,
    dbname: str,
    user: str,
    password: str | None,
    env: Mapping[str, str] | None = None,
    attempts: int = 3,
) -> SidecarProcess:
    """Start ``dualwrite run`` with free ports filled in where the config gives none; retried
    if one of those ports was taken before the child bound it."""
    pick_listen = not config_data.get("listen", {}).get("port")
    pick_admin = not config_data.get("admin", {}).get("port")
    config_data = with_relay_native(config_data)
    for attempt in range(attempts):
        data = dict(config_data)
        if pick_listen:
            data = deep_merge(data, {"listen": {"port": free_port()}})
        if pick_admin:
            data = deep_merge(data, {"admin": {"port": free_port()}})
        handle = SidecarProcess(
            data, workdir / f"run{attempt}", dbname=dbname, user=user, password=password, env=env
        )
        try:
            return handle.start()
        except RuntimeError:
            in_use = "address already in use" in handle.stderr_text().lower()
            if not ((pick_listen or pick_admin) and in_use and attempt + 1 < attempts):
                raise
    raise AssertionError("unreachable")
