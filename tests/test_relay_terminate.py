"""Terminate behind a running statement (issue 11, item 19): PostgreSQL answers every message
it read before a Terminate, then closes; through the proxy the client gets the same replies.

Each raw-socket case runs directly against PostgreSQL and through the proxy, and the two must
receive the same messages. The psycopg case is psycopg's own ``test_socket_closed``: a thread
closes a connection whose statement is still running.
"""

from __future__ import annotations

import threading

import psycopg
import pytest
from psycopg import generators, waiting
from psycopg.pq import ConnStatus
from support.transparency import (
    RawClient,
    backend_pids,
    frame,
    query,
    unique_name,
    wait_backend_gone,
    wait_sleeping,
)

TERMINATE = frame(b"X")
SYNC = frame(b"S")


def parse(sql: str) -> bytes:
    return frame(b"P", b"\0" + sql.encode() + b"\0\0\0")


BIND = frame(b"B", b"\0\0\0\0\0\0\0\0")
EXECUTE = frame(b"E", b"\0\0\0\0\0")


@pytest.fixture
def proxy(sidecar):
    return sidecar()


def endpoints(pg, proxy) -> dict[str, tuple[str, int]]:
    return {"direct": (pg.host, pg.port), "proxy": (proxy.host, proxy.port)}


def summary(messages) -> list[tuple[bytes, str]]:
    """Type and, for CommandComplete and errors, what they say."""
    out = []
    for message in messages:
        if message.typ == b"C":
            out.append((message.typ, message.body.rstrip(b"\0").decode()))
        elif message.typ == b"E":
            out.append((message.typ, message.sqlstate))
        else:
            out.append((message.typ, ""))
    return out


def session(pg, db, where: tuple[str, int], name: str) -> RawClient:
    client = RawClient(*where)
    assert client.startup(pg.user, db.name, application_name=name)[-1].typ == b"Z"
    return client


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_query_then_terminate_in_one_write_gets_its_reply(pg, db, proxy, route):
    db.sql("CREATE TABLE t (n int)")
    name = unique_name("terminate_q")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        client.send(query("INSERT INTO t VALUES (1) RETURNING n") + TERMINATE)
        received = client.until_closed()
    assert summary(received) == [
        (b"T", ""),
        (b"D", ""),
        (b"C", "INSERT 0 1"),
        (b"Z", ""),
    ]
    assert db.sql("SELECT n FROM t") == [(1,)]
    wait_backend_gone(pg, name)


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_extended_batch_then_terminate_in_one_write_gets_its_replies(pg, db, proxy, route):
    db.sql("CREATE TABLE t (n int)")
    name = unique_name("terminate_x")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        client.send(parse("INSERT INTO t VALUES (2)") + BIND + EXECUTE + SYNC + TERMINATE)
        received = client.until_closed()
    assert summary(received) == [(b"1", ""), (b"2", ""), (b"C", "INSERT 0 1"), (b"Z", "")]
    assert db.sql("SELECT n FROM t") == [(2,)]
    wait_backend_gone(pg, name)


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_terminate_inside_a_transaction_answers_then_rolls_back(pg, db, proxy, route):
    db.sql("CREATE TABLE t (n int)")
    name = unique_name("terminate_tx")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        assert [m.typ for m in client.simple("BEGIN")] == [b"C", b"Z"]
        client.send(query("INSERT INTO t VALUES (3)") + TERMINATE)
        received = client.until_closed()
    assert summary(received) == [(b"C", "INSERT 0 1"), (b"Z", "")]
    wait_backend_gone(pg, name)
    assert db.sql("SELECT n FROM t") == []  # never committed


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_nothing_after_terminate_is_run(pg, db, proxy, route):
    db.sql("CREATE TABLE t (n int)")
    name = unique_name("terminate_after")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        client.send(
            query("INSERT INTO t VALUES (4)") + TERMINATE + query("INSERT INTO t VALUES (5)")
        )
        received = client.until_closed()
    assert summary(received) == [(b"C", "INSERT 0 1"), (b"Z", "")]
    wait_backend_gone(pg, name)
    assert db.sql("SELECT n FROM t") == [(4,)]


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_terminate_while_idle_closes_at_once(pg, db, proxy, route):
    name = unique_name("terminate_idle")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        client.send(TERMINATE)
        assert client.until_closed() == []
    wait_backend_gone(pg, name)


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_terminate_behind_a_running_statement_waits_for_it(pg, db, proxy, route):
    # The Terminate is read while the statement runs (a separate write, as libpq's PQfinish
    # from another thread sends it): the statement's reply still comes first.
    name = unique_name("terminate_running")
    with session(pg, db, endpoints(pg, proxy)[route], name) as client:
        client.send(query("SELECT pg_sleep(0.5), 'done'"))
        (pid,) = backend_pids(pg, name)
        wait_sleeping(pg, pid)
        client.send(TERMINATE)
        received = client.until_closed()
    assert summary(received) == [(b"T", ""), (b"D", ""), (b"C", "SELECT 1"), (b"Z", "")]
    wait_backend_gone(pg, name)


@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_psycopg_socket_closed_by_another_thread(pg, db, sidecar_process, route):
    # psycopg's tests/test_waiting.py::test_socket_closed: a thread finishes the connection
    # while its statement runs; the waiting thread must see its own socket closed, not a
    # connection the server (or the proxy) closed under it. The sidecar runs as a process of
    # its own: in this process it would open sockets that reuse the finished connection's fd.
    dsn = pg.dsn(db.name) if route == "direct" else sidecar_process().dsn()
    name = unique_name("psycopg_finish")
    pgconn = psycopg.pq.PGconn.connect(f"{dsn}?application_name={name}".encode())
    assert pgconn.status == ConnStatus.OK
    (pid,) = backend_pids(pg, name)

    def closer() -> None:
        wait_sleeping(pg, pid)
        pgconn.finish()

    thread = threading.Thread(target=closer)
    thread.start()
    try:
        pgconn.send_query(b"SELECT pg_sleep(2)")
        with pytest.raises(psycopg.OperationalError, match="connection socket closed") as caught:
            waiting.wait(generators.execute(pgconn), pgconn.socket, 0.1)
    finally:
        thread.join(30)
    assert pgconn.status == ConnStatus.BAD
    assert isinstance(caught.value.__cause__, OSError)
    wait_backend_gone(pg, name)
