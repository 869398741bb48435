"""The test harness itself: per-test databases, embedded clusters, the sidecar fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import psycopg
import pytest
from support import deep_merge, port_open, run_pgbench, run_psql

from dualwrite.embedded import EmbeddedPostgres

MARKER_TABLE = "harness_marker"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


# --- db --------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", [1, 2])
def test_db_is_fresh_and_empty_whichever_runs_first(db, run):
    # both runs create the same table: the second would find it if databases were shared
    assert db.scalar("SELECT current_database()") == db.name
    assert db.name.startswith("dwtest_")
    user_tables = db.scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
        " AND n.nspname NOT LIKE 'pg_toast%' AND c.relkind = 'r'"
    )
    assert user_tables == 0
    db.sql(f"CREATE TABLE {MARKER_TABLE} (run int)")
    db.sql(f"INSERT INTO {MARKER_TABLE} VALUES (%s)", run)
    assert db.sql(f"SELECT run FROM {MARKER_TABLE}") == [(run,)]


def test_db_sql_returns_the_last_statements_rows_and_binds_args(db):
    rows = db.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (2), (1); TABLE t ORDER BY x")
    assert rows == [(1,), (2,)]
    assert db.sql("SELECT x FROM t WHERE x > %s", 1) == [(2,)]
    assert db.scalar("SELECT '100%'") == "100%"
    assert db.scalar("SELECT x FROM t WHERE false") is None


def test_database_drop_removes_it_even_with_a_connection_open(pg):
    database = pg.create_database()
    other = database.connect()
    try:
        assert database.scalar("SELECT 40 + 2") == 42
        database.drop()
        assert pg.sql("SELECT 1 FROM pg_database WHERE datname = %s", database.name) == []
    finally:
        other.close()


# --- EmbeddedPostgres --------------------------------------------------------------------------


def test_embedded_cluster_runs_unprivileged_and_leaves_nothing_behind():
    with EmbeddedPostgres(settings={"work_mem": "7MB"}) as cluster:
        postmaster = cluster.pid
        data_dir = cluster.data_dir
        assert postmaster is not None
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            children = [
                pid
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
                    " UNION ALL SELECT pg_backend_pid()"
                )
            ]
        assert len(children) == 2
        if os.geteuid() == 0:
            # initdb and postgres refuse root: the cluster must run as someone else
            assert _uid_of(postmaster) != 0
        assert _process_exists(postmaster)
    assert not _process_exists(postmaster)
    assert not any(_process_exists(pid) for pid in children)
    assert not data_dir.exists()
    assert not cluster.running


@pytest.mark.parametrize("method", ["md5", "scram-sha-256"])
def test_embedded_cluster_hba_lines_come_before_trust(method):
    role = "secretive"
    with EmbeddedPostgres(
        hba_lines=[f"host all {role} 127.0.0.1/32 {method}"], password_encryption=method
    ) as cluster:
        with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right-one'")
            stored = admin.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (role,)
            ).fetchone()
        assert stored is not None
        assert stored[0].lower().startswith(method.split("-")[0])
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(cluster.dsn(user=role, password="wrong-one"))
        with psycopg.connect(cluster.dsn(user=role, password="right-one")) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)


# --- sidecar (in-process) ----------------------------------------------------------------------


def test_sidecar_relays_for_psycopg_and_counts_the_session(sidecar, db, pg):
    handle = sidecar()
    assert handle.port not in (0, pg.port)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == (db.name,)
        assert handle.call(lambda: len(handle.sidecar.proxy.sessions)) == 1
    status, body = handle.http_json("/status")
    assert status == 200
    assert "proxy" in body


def test_sidecar_relays_for_psql(sidecar):
    handle = sidecar()
    result = run_psql(handle.dsn(), "SELECT 1 AS one")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1"


def test_psql_script_keeps_going_after_an_error(sidecar, tmp_path):
    handle = sidecar()
    script = tmp_path / "script.sql"
    script.write_text("SELECT 'before';\nSELECT no_such_column;\nSELECT 'after';\n")
    result = run_psql(handle.dsn(), script)
    assert result.stdout.split() == ["before", "after"]
    assert "no_such_column" in result.stderr


def test_sidecar_stop_closes_the_port(sidecar):
    handle = sidecar()
    assert port_open(handle.host, handle.port)
    handle.stop(grace=0)
    assert not port_open(handle.host, handle.port)
    assert not handle.running


def test_sidecar_overrides_are_deep_merged(sidecar):
    handle = sidecar({"shutdown": {"grace_seconds": 1.5}, "limits": {"max_client_connections": 7}})
    assert handle.config.shutdown.grace_seconds == 1.5
    assert handle.config.limits.max_client_connections == 7
    assert handle.config.admin.host == "127.0.0.1"  # the default's other keys survive


async def test_sidecar_serves_async_clients_and_acall(sidecar):
    handle = sidecar()
    conn = await asyncpg.connect(handle.dsn())
    try:
        assert await conn.fetchval("SELECT 2 + 2") == 4
        assert await handle.acall(lambda: len(handle.sidecar.proxy.sessions)) == 1
    finally:
        await conn.close()


def test_pgbench_runs_through_the_sidecar(sidecar, db):
    init = run_pgbench(db.dsn, "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stderr
    handle = sidecar()
    result = run_pgbench(handle.dsn(), "-n", "-S", "-c", "2", "-t", "25")
    assert result.returncode == 0, result.stderr
    assert "number of transactions actually processed: 50/50" in result.stdout


# --- sidecar_process ----------------------------------------------------------------------------


def test_sidecar_process_serves_and_exits_cleanly_on_sigterm(sidecar_process, db):
    handle = sidecar_process()
    assert handle.http("/healthz")[0] == 200
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db.name,)
    handle.terminate()
    assert handle.wait(timeout=30) == 0
    assert not port_open(handle.host, handle.port)
    assert handle.config_path.exists()


def test_sidecar_process_kill_is_abrupt(sidecar_process):
    handle = sidecar_process()
    handle.kill()
    assert handle.wait(timeout=30) == -9


# --- helpers -----------------------------------------------------------------------------------


def test_deep_merge_merges_dicts_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1]}, "b": 2}
    merged = deep_merge(base, {"a": {"y": [2]}, "c": 3})
    assert merged == {"a": {"x": 1, "y": [2]}, "b": 2, "c": 3}
    assert base == {"a": {"x": 1, "y": [1]}, "b": 2}
