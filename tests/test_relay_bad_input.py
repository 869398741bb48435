"""Bad input, lost peers and cancels: raw sockets against the proxy, no driver in between.

Whatever a client does, the proxy answers like PostgreSQL would (an ErrorResponse with the
right SQLSTATE, then a closed connection) and never leaves an upstream session behind:
``pg_stat_activity`` is checked for the backend of each client (found by application_name).
"""

from __future__ import annotations

import os
import socket
import struct
import threading

import psycopg
import pytest
from support import free_port, wait_until
from support.transparency import (
    CANCEL_REQUEST,
    GSSENC_REQUEST,
    SSL_REQUEST,
    Message,
    RawClient,
    VanishingUpstream,
    backend_pids,
    command_tags,
    data_rows,
    errors,
    frame,
    is_sleeping,
    metric,
    query,
    scrape,
    special_request,
    start_relay,
    startup_packet,
    unique_name,
    wait_backend_gone,
    wait_sleeping,
)

MAX_MESSAGE = 4096


@pytest.fixture(scope="module")
def db(pg, relay_native):
    """One database for the module (each test uses tables of its own)."""
    database = pg.create_database()
    try:
        yield database
    finally:
        database.drop()


@pytest.fixture(scope="module")
def proxy(pg, db, relay_native):
    handle = start_relay(pg, db.name, {"limits": {"max_message_bytes": MAX_MESSAGE}})
    try:
        yield handle
    finally:
        handle.stop(grace=0)


@pytest.fixture
def sidecar(pg, db):
    """Factory for a sidecar with a config of the test's own (stopped at teardown)."""
    started = []

    def start(overrides=None):
        handle = start_relay(pg, db.name, overrides)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop(grace=0)


@pytest.fixture
def table(db):
    """A table of the test's own."""
    name = unique_name("target")
    db.sql(f"CREATE TABLE {name} (n int, line text)")
    return name


def sessions(handle, application_name: str | None = None) -> int:
    """Sessions open in the proxy (only those of ``application_name`` when given)."""

    def count() -> int:
        return sum(
            1
            for session in handle.sidecar.proxy.sessions
            if application_name is None
            or session.startup_params.get("application_name") == application_name
        )

    return handle.call(count)


@pytest.fixture
def raw_clients():
    """Raw clients opened by the test, closed at its end whatever happened."""
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.close()


@pytest.fixture
def connected(db, pg, raw_clients):
    """Factory: a raw client logged in through a proxy, its backend in pg_stat_activity."""

    def connect(handle, name: str) -> RawClient:
        client = RawClient(handle.host, handle.port)
        raw_clients.append(client)
        ready = client.startup(pg.user, db.name, application_name=name)
        assert ready[-1].typ == b"Z"
        assert len(backend_pids(pg, name)) == 1
        return client

    return connect


def assert_fatal_then_closed(client: RawClient, sqlstate: str) -> list:
    """The proxy sent exactly one FATAL ErrorResponse with ``sqlstate``, then closed."""
    received = client.until_closed()
    assert [(m.typ, m.severity, m.sqlstate) for m in received] == [(b"E", "FATAL", sqlstate)], (
        received
    )
    return received


# --- malformed frames ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [
        b"Q\x00\x00",  # inside the header
        b"Q\x00\x00\x00\x40SELECT",  # inside the body
        frame(b"P", b"\x00SELECT 1\x00\x00\x00") + b"B\x00\x00\x00\x30",  # after a whole frame
    ],
    ids=["header", "body", "after-a-frame"],
)
def test_a_truncated_frame_then_close_ends_the_upstream_session(proxy, db, pg, tail, connected):
    name = unique_name("truncated")
    client = connected(proxy, name)
    client.send(tail)
    client.close()
    wait_backend_gone(pg, name)
    wait_until(lambda: sessions(proxy, name) == 0, 10, "the session to close")


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (-1, "invalid message length -1"),
        (-(2**31), f"invalid message length {-(2**31)}"),
        (0, "invalid message length 0"),
        (3, "invalid message length 3"),
        (MAX_MESSAGE + 1, f"message of {MAX_MESSAGE + 1} bytes exceeds the limit"),
        (2**31 - 1, f"message of {2**31 - 1} bytes exceeds the limit"),
    ],
)
def test_a_bad_length_field_is_a_protocol_violation(proxy, db, pg, length, message, connected):
    name = unique_name("badlength")
    client = connected(proxy, name)
    client.send(b"Q" + struct.pack("!i", length) + b"SELECT 1\x00")
    (error,) = assert_fatal_then_closed(client, "08P01")
    assert error.message.startswith(message)
    wait_backend_gone(pg, name)


def test_a_copy_data_frame_above_the_limit_is_refused_and_nothing_is_copied(
    proxy, db, pg, table, connected
):
    name = unique_name("bigcopy")
    client = connected(proxy, name)
    client.send(query(f"COPY {table} FROM STDIN"))
    assert client.read_message().typ == b"G"
    client.send(frame(b"d", b"fits\n") + b"d" + struct.pack("!i", MAX_MESSAGE * 4) + b"x" * 100)
    assert_fatal_then_closed(client, "08P01")
    wait_backend_gone(pg, name)
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        bytes.fromhex("160301006a010000660303") + os.urandom(32),  # a TLS ClientHello
        struct.pack("!i", 4) + b"\x00" * 8,  # a length too short for any packet
        struct.pack("!i", 10001) + b"\x00\x03\x00\x00",  # longer than PostgreSQL accepts
    ],
    ids=["http", "tls-hello", "short-length", "too-long"],
)
def test_garbage_before_the_startup_packet_is_refused(proxy, garbage):
    before = sessions(proxy)
    with RawClient(proxy.host, proxy.port) as client:
        client.send(garbage)
        (error,) = assert_fatal_then_closed(client, "08P01")
        assert "startup packet" in error.message
    wait_until(lambda: sessions(proxy) <= before, 10, "the session to close")


def test_ssl_and_gssenc_requests_are_declined_then_startup_works(proxy, db, pg):
    with RawClient(proxy.host, proxy.port) as client:
        client.send(special_request(SSL_REQUEST))
        assert client.read_byte() == b"N"
        client.send(special_request(GSSENC_REQUEST))
        assert client.read_byte() == b"N"
        client.send(special_request(SSL_REQUEST))
        assert client.read_byte() == b"N"
        ready = client.startup(pg.user, db.name, application_name=unique_name("ssl"))
        assert ready[0].typ == b"R"
        assert ready[-1].typ == b"Z"
        assert data_rows(client.simple("SELECT 40 + 2")) == [[b"42"]]


def test_libpq_sslmode_require_fails_like_a_server_without_ssl(proxy):
    with pytest.raises(psycopg.OperationalError, match="server does not support SSL"):
        psycopg.connect(proxy.dsn() + "?sslmode=require", connect_timeout=10)
    with psycopg.connect(proxy.dsn() + "?sslmode=prefer&gssencmode=prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize("version", [(2, 0), (4, 0), (1234, 5681)])  # 1234.5681: no such request
def test_an_unsupported_protocol_version_is_refused(proxy, db, pg, version):
    major, minor = version
    with RawClient(proxy.host, proxy.port) as client:
        client.send(startup_packet({"user": pg.user, "database": db.name}, major << 16 | minor))
        (error,) = assert_fatal_then_closed(client, "0A000")
        assert f"unsupported frontend protocol {major}.{minor}" in error.message


def test_a_newer_minor_version_is_negotiated_by_the_server_unchanged(proxy, db, pg):
    params = {"user": pg.user, "database": db.name, "_pq_.unknown_option": "x"}
    outcomes = []
    for port in (pg.port, proxy.port):
        with RawClient("127.0.0.1", port) as client:
            client.send(startup_packet(params, 3 << 16 | 2))
            messages = client.until_ready()
            outcomes.append([(m.typ, m.body) for m in messages if m.typ in (b"v", b"R", b"E")])
            assert data_rows(client.simple("SELECT 1")) == [[b"1"]]
    assert outcomes[0][0][0] == b"v"  # NegotiateProtocolVersion: 3.0 and the unknown option
    assert outcomes[1] == outcomes[0]


def test_a_bad_frame_sent_along_with_the_startup_packet_is_refused(proxy, db, pg):
    """Bytes that arrive while the upstream connection is being opened are checked too."""
    name = unique_name("pipelined_bad")
    with RawClient(proxy.host, proxy.port) as client:
        client.send(
            startup_packet({"user": pg.user, "database": db.name, "application_name": name})
            + query("SELECT 1")
            + b"Q"
            + struct.pack("!i", -1)
        )
        received = client.until_closed()
    assert received[-1].typ == b"E"
    assert (received[-1].severity, received[-1].sqlstate) == ("FATAL", "08P01")
    assert received[-1].message == "invalid message length -1"
    wait_backend_gone(pg, name)


def test_a_client_that_half_closes_still_gets_every_reply(proxy, db, pg):
    """shutdown(SHUT_WR) after the last request: PostgreSQL answers it all, then closes."""
    outcomes = []
    for port in (pg.port, proxy.port):
        with RawClient("127.0.0.1", port) as client:
            client.send(
                startup_packet({"user": pg.user, "database": db.name})
                + query("SELECT 42; SELECT 'second'")
                + query("SELECT 1/0")
            )
            client.sock.shutdown(socket.SHUT_WR)
            received = client.until_closed()
        outcomes.append([(m.typ, m.body) for m in received if m.typ != b"K"])
    assert data_rows([Message(t, b) for t, b in outcomes[0]]) == [[b"42"], [b"second"]]
    assert outcomes[1] == outcomes[0]


# --- timeouts and limits -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent", [b"", startup_packet({"user": "x"})[:7]], ids=["silent", "partial"]
)
def test_the_startup_timeout_closes_a_silent_client(sidecar, sent):
    handle = sidecar({"limits": {"startup_timeout_seconds": 0.3}})
    before = scrape(handle)
    with RawClient(handle.host, handle.port) as client:
        client.send(sent)
        (error,) = assert_fatal_then_closed(client, "08P01")
        assert "timeout" in error.message
    rejected = "dualwrite_client_connections_rejected_total"
    after = scrape(handle)
    assert metric(after, rejected, reason="startup_timeout") == (
        metric(before, rejected, reason="startup_timeout") + 1
    )


def test_max_client_connections_is_answered_like_postgresql(sidecar, db, pg):
    handle = sidecar({"limits": {"max_client_connections": 2}})
    first = psycopg.connect(handle.dsn(), autocommit=True)
    second = psycopg.connect(handle.dsn(), autocommit=True)
    try:
        with RawClient(handle.host, handle.port) as client:
            client.send(startup_packet({"user": pg.user, "database": db.name}))
            (error,) = assert_fatal_then_closed(client, "53300")
            assert error.message == "sorry, too many clients already"
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            psycopg.connect(handle.dsn(), connect_timeout=10)
        # the connections in use are unaffected
        assert first.execute("SELECT 1").fetchone() == (1,)
    finally:
        second.close()
    # a slot freed is a slot usable again
    wait_until(lambda: sessions(handle) == 1, 10, "the closed session to go")
    with psycopg.connect(handle.dsn()) as third:
        assert third.execute("SELECT 3").fetchone() == (3,)
    first.close()


# --- clients that go away -----------------------------------------------------------------------


def _abort(client: RawClient) -> None:
    """Close with a TCP reset instead of a FIN (a crashed client)."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


@pytest.mark.parametrize("how", ["close", "reset", "mid-frame"])
def test_a_client_dropping_mid_copy_commits_nothing(proxy, db, pg, how, table, connected):
    name = unique_name("midcopy")
    client = connected(proxy, name)
    client.send(query(f"COPY {table} FROM STDIN"))
    assert client.read_message().typ == b"G"  # CopyInResponse
    client.send(b"".join(frame(b"d", f"{n}\trow {n}\n".encode()) for n in range(1000)))
    if how == "mid-frame":
        client.send(frame(b"d", b"1001\tlast row\n")[:9])
    if how == "reset":
        _abort(client)
    else:
        client.close()
    wait_backend_gone(pg, name)
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0


@pytest.mark.parametrize("how", ["close", "reset", "terminate"])
def test_a_client_disconnecting_mid_transaction_is_rolled_back(
    proxy, db, pg, how, table, connected
):
    name = unique_name("midtx")
    client = connected(proxy, name)
    assert command_tags(client.simple(f"BEGIN; INSERT INTO {table} VALUES (1)")) == [
        "BEGIN",
        "INSERT 0 1",
    ]
    if how == "terminate":
        client.send(frame(b"X"))
        client.close()
    elif how == "reset":
        _abort(client)
    else:
        client.close()
    wait_backend_gone(pg, name)
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0


def test_psycopg_closing_inside_a_transaction_rolls_back(proxy, db, pg, table):
    name = unique_name("psycopg_tx")
    conn = psycopg.connect(proxy.dsn(), application_name=name)
    conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert conn.info.transaction_status.name == "INTRANS"
    conn.close()
    wait_backend_gone(pg, name)
    assert db.scalar(f"SELECT count(*) FROM {table}") == 0


# --- the upstream goes away --------------------------------------------------------------------


def test_a_terminated_backend_mid_query_gives_the_client_the_servers_fatal(
    proxy, db, pg, connected
):
    name = unique_name("terminated")
    client = connected(proxy, name)
    (pid,) = backend_pids(pg, name)
    client.send(query("SELECT pg_sleep(60)"))
    wait_sleeping(pg, pid)
    assert pg.sql("SELECT pg_terminate_backend(%s)", pid) == [(True,)]
    received = client.until_closed()
    # exactly what PostgreSQL sends: its own FATAL, then the end of the stream
    assert [(m.severity, m.sqlstate) for m in errors(received)] == [("FATAL", "57P01")]
    assert received[-1].typ == b"E"
    wait_until(lambda: sessions(proxy, name) == 0, 10, "the session to close")


def test_a_terminated_backend_of_an_idle_client_is_reported_to_it(proxy, db, pg, connected):
    name = unique_name("terminated_idle")
    client = connected(proxy, name)
    (pid,) = backend_pids(pg, name)
    pg.sql("SELECT pg_terminate_backend(%s)", pid)
    received = client.until_closed()
    assert [(m.typ, m.sqlstate) for m in received] == [(b"E", "57P01")]


def test_psycopg_mid_query_gets_an_error_not_a_hang(proxy, db, pg):
    name = unique_name("psycopg_terminated")
    conn = psycopg.connect(proxy.dsn(), application_name=name, autocommit=True)
    (pid,) = backend_pids(pg, name)
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("SELECT pg_sleep(60)")
        except psycopg.Error as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    wait_sleeping(pg, pid)
    pg.sql("SELECT pg_terminate_backend(%s)", pid)
    worker.join(30)
    assert not worker.is_alive()
    (exc,) = outcome
    assert isinstance(exc, psycopg.errors.AdminShutdown | psycopg.OperationalError)
    assert conn.closed or conn.broken
    conn.close()


def test_an_upstream_that_vanishes_gives_08006(sidecar):
    fake = VanishingUpstream()
    try:
        handle = sidecar({"upstream": {"port": fake.port}})
        with RawClient(handle.host, handle.port) as client:
            ready = client.startup("anyone", "anydb")
            assert ready[-1].typ == b"Z"
            client.send(query("SELECT 1"))
            assert fake.dropped.wait(15)
            (error,) = assert_fatal_then_closed(client, "08006")
            assert "upstream server closed the connection unexpectedly" in error.message
    finally:
        fake.close()


def test_an_upstream_that_is_down_gives_08006(sidecar, db, pg):
    port = free_port()
    handle = sidecar({"upstream": {"port": port}})
    with RawClient(handle.host, handle.port) as client:
        client.send(startup_packet({"user": pg.user, "database": db.name}))
        (error,) = assert_fatal_then_closed(client, "08006")
        assert error.message == (
            f"could not connect to upstream server 127.0.0.1:{port}: Connection refused"
        )
    with pytest.raises(psycopg.OperationalError, match="could not connect to upstream server"):
        psycopg.connect(handle.dsn(), connect_timeout=10)


# --- CancelRequest -----------------------------------------------------------------------------


def cancel(handle, pid: int, secret: bytes) -> None:
    """Send a CancelRequest through the proxy; it answers nothing and closes."""
    with RawClient(handle.host, handle.port) as canceller:
        canceller.send(special_request(CANCEL_REQUEST, struct.pack("!i", pid) + secret))
        assert canceller.until_closed() == []


def test_a_cancel_request_with_the_clients_own_key_cancels_its_query(proxy, db, pg, connected):
    name = unique_name("cancelled")
    client = connected(proxy, name)
    assert client.key is not None
    pid, secret = client.key
    assert backend_pids(pg, name) == [pid]  # the key is the backend's own (relayed unchanged)
    client.send(query("SELECT pg_sleep(60)"))
    wait_sleeping(pg, pid)
    before = metric(scrape(proxy), "dualwrite_cancel_requests_total", outcome="forwarded")
    cancel(proxy, pid, secret)
    # the proxy closes the cancel connection only once the cancel was forwarded, as
    # PostgreSQL closes it only after signalling the backend
    forwarded = metric(scrape(proxy), "dualwrite_cancel_requests_total", outcome="forwarded")
    assert forwarded == before + 1
    replies = client.until_ready()
    assert [(m.sqlstate, m.message) for m in errors(replies)] == [
        ("57014", "canceling statement due to user request")
    ]
    assert data_rows(client.simple("SELECT 'alive'")) == [[b"alive"]]


def test_psycopg_cancel_goes_through_the_proxy(proxy, db, pg):
    name = unique_name("psycopg_cancel")
    with psycopg.connect(proxy.dsn(), application_name=name, autocommit=True) as conn:
        (pid,) = backend_pids(pg, name)
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                conn.execute("SELECT pg_sleep(60)")
            except psycopg.Error as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        wait_sleeping(pg, pid)
        conn.cancel_safe(timeout=10)
        worker.join(30)
        assert [type(exc) for exc in outcome] == [psycopg.errors.QueryCanceled]
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_cancel_requests_with_wrong_or_foreign_keys_cancel_nothing(proxy, db, pg, connected):
    name = unique_name("not_cancelled")
    client = connected(proxy, name)
    assert client.key is not None
    pid, secret = client.key
    # a session connected directly to PostgreSQL: its key is real, but not one of the proxy's
    direct = RawClient(pg.host, pg.port)
    direct.startup(pg.user, db.name, application_name=name + "_direct")
    assert direct.key is not None
    direct_pid, direct_secret = direct.key
    try:
        client.send(query("SELECT pg_sleep(60)"))
        direct.send(query("SELECT pg_sleep(60)"))
        wait_sleeping(pg, pid)
        wait_sleeping(pg, direct_pid)
        before = scrape(proxy)
        wrong_secret = bytes(b ^ 0xFF for b in secret)
        cancel(proxy, pid, wrong_secret)
        cancel(proxy, 1, os.urandom(4))
        cancel(proxy, direct_pid, direct_secret)
        dropped = metric(scrape(proxy), "dualwrite_cancel_requests_total", outcome="unknown_key")
        assert (
            dropped == metric(before, "dualwrite_cancel_requests_total", outcome="unknown_key") + 3
        )
        # both queries still run: nothing was cancelled
        assert is_sleeping(pg, pid)
        assert is_sleeping(pg, direct_pid)
        # the right key still works, and it is the only cancel the client ever saw
        cancel(proxy, pid, secret)
        assert [m.sqlstate for m in errors(client.until_ready())] == ["57014"]
    finally:
        pg.sql("SELECT pg_cancel_backend(%s)", direct_pid)
        direct.close()
        client.close()
