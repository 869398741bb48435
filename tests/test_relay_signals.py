"""SIGTERM and SIGINT drain the proxy: no new clients, open transactions may finish within
``shutdown.grace_seconds``, idle clients are told 57P01, then ``dualwrite run`` exits 0.

Each test runs the real process (``sidecar_process``) and signals it.
"""

from __future__ import annotations

import signal
import socket

import pytest
from support import port_open, wait_until
from support.transparency import (
    RawClient,
    backend_pids,
    command_tags,
    data_rows,
    query,
    unique_name,
    wait_backend_gone,
)

ADMIN_SHUTDOWN = ("FATAL", "57P01")


def client(handle, db, pg, name: str) -> RawClient:
    raw = RawClient(handle.host, handle.port)
    assert raw.startup(pg.user, db.name, application_name=name)[-1].typ == b"Z"
    return raw


def told_shutdown(raw: RawClient) -> None:
    """The proxy's last word is PostgreSQL's 'terminating connection' FATAL, then EOF."""
    received = raw.until_closed()
    assert [(m.typ, m.severity, m.sqlstate) for m in received] == [(b"E", *ADMIN_SHUTDOWN)]
    assert received[0].message == "terminating connection due to administrator command"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_open_transactions_then_exits_0(sidecar_process, db, pg, signum):
    db.sql("CREATE TABLE t (n int)")
    handle = sidecar_process({"shutdown": {"grace_seconds": 60}})
    name = unique_name("drain")
    idle = client(handle, db, pg, name + "_idle")
    busy = client(handle, db, pg, name + "_tx")
    not_started = RawClient(handle.host, handle.port)  # TCP accepted, no startup packet yet
    assert command_tags(busy.simple("BEGIN; INSERT INTO t VALUES (1)")) == ["BEGIN", "INSERT 0 1"]

    handle.send_signal(signum)
    told_shutdown(idle)
    told_shutdown(not_started)
    # the listening socket is closed before anyone is told: new clients are refused
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((handle.host, handle.port), timeout=5).close()
    assert handle.returncode is None  # still draining: a transaction is open

    # the open transaction carries on and commits; then its connection is closed too
    assert command_tags(busy.simple("INSERT INTO t VALUES (2)")) == ["INSERT 0 1"]
    assert command_tags(busy.simple("COMMIT")) == ["COMMIT"]
    told_shutdown(busy)
    assert handle.wait(30) == 0
    assert db.sql("SELECT n FROM t ORDER BY n") == [(1,), (2,)]
    wait_backend_gone(pg, name + "_tx")
    records = handle.log_records()
    assert any(r.get("event") == "shutdown_requested" for r in records)
    assert any(r.get("event") == "stopped" for r in records)


def test_a_query_running_at_the_signal_completes_first(sidecar_process, db, pg):
    db.sql("CREATE TABLE t (n int); INSERT INTO t VALUES (7)")
    handle = sidecar_process({"shutdown": {"grace_seconds": 60}})
    name = unique_name("running")
    raw = client(handle, db, pg, name)
    locker = db.connect(autocommit=False)
    try:
        locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        raw.send(query("SELECT n FROM t"))  # blocks on the lock
        (pid,) = backend_pids(pg, name)
        wait_until(
            lambda: pg.sql(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'", pid
            ),
            15,
            "the query to wait for the lock",
        )
        handle.terminate()
        wait_until(lambda: not port_open(handle.host, handle.port), 15, "the listener to close")
        assert handle.returncode is None
    finally:
        locker.rollback()
        locker.close()
    replies = raw.until_ready()
    assert data_rows(replies) == [[b"7"]]
    told_shutdown(raw)
    assert handle.wait(30) == 0


def test_a_transaction_open_when_the_grace_period_ends_is_rolled_back(sidecar_process, db, pg):
    db.sql("CREATE TABLE t (n int)")
    handle = sidecar_process({"shutdown": {"grace_seconds": 1}})
    name = unique_name("overdue")
    raw = client(handle, db, pg, name)
    assert command_tags(raw.simple("BEGIN; INSERT INTO t VALUES (1)")) == ["BEGIN", "INSERT 0 1"]
    handle.terminate()
    told_shutdown(raw)
    assert handle.wait(30) == 0
    wait_backend_gone(pg, name)
    assert db.scalar("SELECT count(*) FROM t") == 0
    assert any(r.get("event") == "grace_period_over" for r in handle.log_records())


def test_a_second_signal_exits_at_once(sidecar_process, db, pg):
    db.sql("CREATE TABLE t (n int)")
    handle = sidecar_process({"shutdown": {"grace_seconds": 300}})
    name = unique_name("impatient")
    raw = client(handle, db, pg, name)
    assert command_tags(raw.simple("BEGIN; INSERT INTO t VALUES (1)")) == ["BEGIN", "INSERT 0 1"]
    handle.terminate()
    wait_until(
        lambda: any(r.get("event") == "draining" for r in handle.log_records()),
        15,
        "the drain to start",
    )
    assert handle.returncode is None
    handle.send_signal(signal.SIGINT)
    assert handle.wait(30) == 0  # long before the 300 s grace period
    raw.closed_by_peer()
    wait_backend_gone(pg, name)
    assert db.scalar("SELECT count(*) FROM t") == 0
