"""Test harness helpers: the PostgreSQL server, per-test databases, the sidecar, psql/pgbench.

The fixtures in tests/conftest.py build on these; tests import the helpers from here
(``from support import run_psql, wait_until``).
"""

from .postgres import Database, PgServer
from .procs import (
    PSQL_FLAGS,
    client_bin_dir,
    free_port,
    needs_tools,
    port_open,
    run_pgbench,
    run_psql,
    wait_for_port,
    wait_until,
)
from .sidecar import (
    RELAY_NATIVE,
    InProcessSidecar,
    SidecarProcess,
    deep_merge,
    new_event_loop,
    start_in_process,
    start_process,
)

__all__ = [
    "PSQL_FLAGS",
    "RELAY_NATIVE",
    "Database",
    "InProcessSidecar",
    "PgServer",
    "SidecarProcess",
    "client_bin_dir",
    "deep_merge",
    "free_port",
    "needs_tools",
    "new_event_loop",
    "port_open",
    "run_pgbench",
    "run_psql",
    "start_in_process",
    "start_process",
    "wait_for_port",
    "wait_until",
]
