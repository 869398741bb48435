"""The native relay loop (proxy/wire/_relayloop.c, proxy/native.py): its frame handling against
socket pairs, its pre-filter and statement kinds against the Python reference, and a real
sidecar relayed by it (hand-backs, a client killed mid-result, metrics)."""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from support import wait_until
from support.pos import drain, migration, prepare

from proxy import native
from proxy.classify import statement_kind
from proxy.rewrite import _needles, _single_read

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="the C extension is not built")

if native.AVAILABLE:
    from proxy.wire._relayloop import Loop, candidate
    from proxy.wire._relayloop import statement_kind as c_statement_kind


def frame(typ: bytes, body: bytes) -> bytes:
    return typ + struct.pack("!i", len(body) + 4) + body


def query(sql: bytes) -> bytes:
    return frame(b"Q", sql + b"\x00")


def parse(name: bytes, sql: bytes) -> bytes:
    return frame(b"P", name + b"\x00" + sql + b"\x00" + b"\x00\x00")


READY_IDLE = frame(b"Z", b"I")
READY_TX = frame(b"Z", b"T")


class Pair:
    """A loop between two socket pairs: ``client`` and ``server`` are the far ends."""

    def __init__(self, needles: tuple[bytes, ...] = (), *, rewriting: bool = False) -> None:
        self.client, client_near = socket.socketpair()
        self.server, server_near = socket.socketpair()
        for sock in (client_near, server_near):
            sock.setblocking(False)
        self.loop = Loop(
            client_near.fileno(), server_near.fileno(), needles, rewriting, 1 << 20, 1 << 20
        )
        # the loop holds duplicates: the originals can go
        client_near.close()
        server_near.close()
        self.result: Any = None
        self._thread: threading.Thread | None = None

    def start(self, cycles: int = 0, client_in: bytes = b"", server_in: bytes = b"") -> None:
        def run() -> None:
            self.result = self.loop.run(cycles, b"", b"", ord("I"), False, client_in, server_in)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def finish(self, timeout: float = 10) -> Any:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the loop did not return"
        return self.result

    def stop(self) -> Any:
        self.loop.stop()
        return self.finish()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        self.loop.close()
        self.client.close()
        self.server.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    created = Pair()
    yield created
    created.close()


def recv_exactly(sock: socket.socket, n: int, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def result_fields(result: Any) -> dict[str, Any]:
    names = [
        "reason",
        "to_server",
        "client_in",
        "client_stream",
        "to_client",
        "server_in",
        "server_stream",
        "cycles",
        "open",
        "since_ready",
        "status",
        "unsynced",
        "unexpected",
        "unnamed_parse",
        "notes",
    ]
    fields = dict(zip(names, result, strict=True))
    fields["reason"] = native.REASONS[fields["reason"]]
    return fields


def test_frames_sent_one_byte_at_a_time_are_relayed_whole_and_tracked(pair):
    stream = (
        query(b"SELECT 1")
        + parse(b"", b"SELECT $1")
        + frame(b"B", b"\x00\x00\x00\x00\x00\x00\x00\x00")
        + frame(b"E", b"\x00\x00\x00\x00\x00")
        + frame(b"S", b"")
    )
    pair.start()
    for byte in stream:
        pair.client.send(bytes((byte,)))
    assert recv_exactly(pair.server, len(stream)) == stream
    replies = frame(b"T", b"\x00\x00") + frame(b"D", b"\x00\x00") + READY_IDLE
    for byte in replies + frame(b"1", b"") + frame(b"2", b"") + READY_TX:
        pair.server.send(bytes((byte,)))
    assert recv_exactly(pair.client, len(replies) + 10 + 6) == (
        replies + frame(b"1", b"") + frame(b"2", b"") + READY_TX
    )
    fields = result_fields(pair.stop())
    assert fields["reason"] == "stopped"
    assert fields["cycles"] == 0
    assert fields["status"] == ord("T")
    assert fields["open"] == b""
    assert fields["since_ready"] == b""
    assert fields["unnamed_parse"] == 1
    assert fields["to_server"] == fields["client_in"] == fields["to_client"] == b""
    assert pair.loop.counters() == (len(stream), len(replies) + 16, 2, 0, 0)


def test_randomly_fragmented_streams_come_out_identical(pair):
    rng = random.Random(15)
    frames = []
    for _ in range(150):
        if rng.random() < 0.5:
            frames.append(query(b"SELECT " + str(rng.randrange(10**6)).encode()))
        else:  # an extended batch (random bodies: the loop forwards them unread)
            for _ in range(rng.randrange(1, 5)):
                kind = rng.choice("BDEC").encode()
                frames.append(frame(kind, os.urandom(rng.randrange(0, 100_000))))
            frames.append(frame(b"S", b""))
    stream = b"".join(frames)
    pair.start()
    received = bytearray()

    def reader() -> None:
        received.extend(recv_exactly(pair.server, len(stream), timeout=30))

    thread = threading.Thread(target=reader)
    thread.start()
    pos = 0
    while pos < len(stream):
        step = rng.choice((1, 2, 3, 5, 7, 64, 1000, 70000))
        pair.client.sendall(stream[pos : pos + step])
        pos += step
    thread.join(30)
    assert bytes(received) == stream
    fields = result_fields(pair.stop())
    assert fields["reason"] == "stopped"
    cycles = sum(1 for f in frames if f[:1] in b"QS")
    assert fields["cycles"] == cycles
    assert fields["client_in"] == b""
    assert fields["client_stream"] == 0


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_a_prefilter_hit_mid_buffer_hands_back_exactly_the_rest(chunk):
    pair = Pair((b"orders",), rewriting=True)
    try:
        before = query(b"SELECT 1") + query(b"select * from orders")  # one plain read
        hit = query(b"UPDATE Orders SET x = 1")
        after = query(b"SELECT 2") + frame(b"S", b"")
        pair.start()
        stream = before + hit + after
        for pos in range(0, len(stream), chunk):
            pair.client.send(stream[pos : pos + chunk])
        fields = result_fields(pair.finish())
        assert fields["reason"] == "client_frame"
        forwarded = recv_exactly(pair.server, len(before), timeout=5)
        relayed = forwarded + fields["to_server"]
        assert relayed == before
        # what was read after the hit is handed back from the hit's first byte on
        assert (relayed + fields["client_in"]) == stream[: len(relayed + fields["client_in"])]
        assert fields["client_in"].startswith(hit[: max(1, min(len(hit), chunk))])
        assert fields["cycles"] == 2
        assert pair.loop.counters()[2:] == (2, 0, 0)
    finally:
        pair.close()


def test_traffic_notes_come_back_in_order_and_stop_the_loop_when_full():
    client, client_near = socket.socketpair()
    server, server_near = socket.socketpair()
    loop = Loop(client_near.fileno(), server_near.fileno(), (), False, 1 << 20, 1 << 20, True)
    client_near.close()
    server_near.close()
    try:
        done: list[Any] = []
        thread = threading.Thread(
            target=lambda: done.append(loop.run(0, b"", b"", ord("I"), False, b"", b""))
        )
        thread.start()
        stream = query(b"SELECT 1") + parse(b"s1", b"SELECT $1") + frame(b"S", b"")
        client.sendall(stream)
        recv_exactly(server, len(stream))
        assert loop.notes_pending() == 2
        loop.stop()
        thread.join(10)
        fields = result_fields(done[0])
        assert fields["notes"] == [(ord("Q"), b"", b"SELECT 1"), (ord("P"), b"s1", b"SELECT $1")]
        assert loop.notes_pending() == 0
        # 64 KiB of texts: the loop hands them over by itself
        done.clear()
        thread = threading.Thread(
            target=lambda: done.append(loop.run(0, b"", b"", ord("I"), False, b"", b""))
        )
        thread.start()
        text = b"SELECT '" + b"x" * 1000 + b"'"
        for _ in range(70):
            client.sendall(query(text))
        thread.join(10)
        assert not thread.is_alive()
        fields = result_fields(done[0])
        assert fields["reason"] == "notes"
        assert 60 <= len(fields["notes"]) <= 70
        assert all(note == (ord("Q"), b"", text) for note in fields["notes"])
    finally:
        loop.close()
        client.close()
        server.close()


def test_frames_python_must_see_stop_the_loop_before_them(pair):
    for typ in (b"X", b"F", b"d", b"c", b"f"):
        pair.start()
        pair.client.send(query(b"SELECT 1") + frame(typ, b"") + query(b"SELECT 2"))
        fields = result_fields(pair.finish())
        assert fields["reason"] == "client_frame", typ
        assert recv_exactly(pair.server, 14, timeout=5) + fields["to_server"] == query(b"SELECT 1")
        assert fields["client_in"] == frame(typ, b"") + query(b"SELECT 2")
    for typ in (b"E", b"S", b"G", b"W"):
        pair.start(cycles=1)
        pair.server.send(frame(b"C", b"SELECT 1\x00") + frame(typ, b"x\x00") + READY_IDLE)
        fields = result_fields(pair.finish())
        assert fields["reason"] == "server_frame", typ
        assert fields["since_ready"] == b"C"
        assert fields["server_in"] == frame(typ, b"x\x00") + READY_IDLE
        recv_exactly(pair.client, 14 - len(fields["to_client"]), timeout=5)


def test_a_query_inside_an_unsynced_batch_goes_to_python(pair):
    pair.start()
    pair.client.send(parse(b"s", b"SELECT 1") + query(b"SELECT 2"))
    fields = result_fields(pair.finish())
    assert fields["reason"] == "client_frame"
    assert fields["open"] == b"P"
    assert fields["client_in"] == query(b"SELECT 2")


def test_a_streamed_frame_is_handed_back_with_what_is_still_to_come(pair):
    body = os.urandom(300_000)
    pair.start(cycles=1)
    big = frame(b"D", body)
    pair.server.sendall(big[:100_000])
    assert len(recv_exactly(pair.client, 100_000)) == 100_000
    fields = result_fields(pair.stop())
    assert fields["reason"] == "stopped"
    sent = 100_000 - len(fields["to_client"])
    assert sent + len(fields["to_client"]) == 100_000
    assert fields["server_stream"] == len(big) - 100_000


def test_eof_from_the_client_returns(pair):
    pair.start()
    pair.client.shutdown(socket.SHUT_WR)
    assert result_fields(pair.finish())["reason"] == "client_eof"


def test_eof_from_the_server_returns(pair):
    pair.start()
    pair.server.close()
    assert result_fields(pair.finish())["reason"] in ("server_eof", "server_error")


def test_a_stop_before_run_counts(pair):
    pair.loop.stop()
    pair.start()
    assert result_fields(pair.finish())["reason"] == "stopped"


def test_a_client_not_reading_stops_the_server_being_read(pair):
    """Backpressure: the loop reads the server only while it can write to the client."""
    pair.start(cycles=1)
    pair.server.setblocking(False)
    accepted = 0
    row = frame(b"D", b"x" * 8000)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            accepted += pair.server.send(row)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                accepted += pair.server.send(row)
            except BlockingIOError:
                break
    # socket buffers both ways plus the loop's 64 KiB: a few MB at most, not unbounded
    assert 0 < accepted < 32 << 20
    pair.client.setblocking(True)
    drained = recv_exactly(pair.client, 1 << 16)
    assert drained.startswith(row[:100])


# --- the pre-filter and the statement kinds against the Python reference -------------------------

TEXTS = [
    b"SELECT 1",
    b"  (select 1)",
    b"select1",
    b"select$1",
    b"/* c */ INSERT INTO t VALUES (1)",
    b"-- x\nupdate t set a = 1",
    b"WITH x AS (DELETE FROM orders RETURNING *) SELECT * FROM x",
    b"with x as (select 1) select * from x",
    b"values (1)",
    b"TABLE orders",
    b"show all",
    b"fetch 1",
    b"merge into t using s on true when matched then delete",
    b"COPY orders FROM STDIN",
    b"truncate orders",
    b"delete from orders",
    b"begin",
    b"",
    b"   ",
    b"select * from orders; delete from orders",
    b"select * from orders;  \n",
    b'SELECT * FROM "Orders"',
    b'select * from U&"\\0061"',
    b'insert into U&"d\\0061ta" values (1)',
    b"select\xe9 1",
    b"\xe9select",
    b"_select",
    b"DISCARD ALL",
    b"deallocate all",
    b"/* unterminated",
    b"-- only a comment",
    b"select 1 -- orders",
]


@pytest.mark.parametrize("sql", TEXTS)
def test_statement_kinds_match_classify(sql):
    assert c_statement_kind(sql) == statement_kind(sql)


@pytest.mark.parametrize("sql", TEXTS)
def test_the_prefilter_matches_rewriter_candidate(sql):
    needles = tuple({n for name in ("orders", "Data") for n in _needles(name)})

    def reference(text: bytes) -> bool:
        if _single_read(text):
            return False
        lowered = text.lower()
        return b"u&" in lowered or any(needle in lowered for needle in needles)

    assert candidate(sql, needles) == reference(sql)


# --- a real sidecar -----------------------------------------------------------------------------


def _sessions(handle: Any) -> list[Any]:
    return list(handle.sidecar.proxy.sessions)


def test_a_session_is_relayed_natively_and_handed_back(sidecar, relay_native):
    handle = sidecar()
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        for i in range(50):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.execute("SET application_name = 'native'")  # a ParameterStatus comes back
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == ("native",)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE t (a int)")
            with conn.cursor().copy("COPY t FROM STDIN") as copy:
                copy.write_row((1,))
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
        (session,) = _sessions(handle)
        if relay_native == "off":
            assert session.native is None
            return
        loop = session.native
        assert loop is not None
        assert loop.entered > 1
        assert loop.reasons.get("server_frame", 0) >= 2  # the error, the ParameterStatus
        assert loop.reasons.get("client_frame", 0) >= 1  # COPY data
        assert session.describe()["transaction_status"] == "I"
        conn.execute("BEGIN")
        wait_until(lambda: session.describe()["transaction_status"] == "T", what="status T")


def test_a_failure_of_the_native_loop_is_an_internal_error_for_the_client(sidecar, monkeypatch):
    handle = sidecar({"relay": {"native": "on"}})
    real = native.Loop

    class Broken:
        """The real loop, whose second run raises (as a bug in the extension would)."""

        def __init__(self, *args: Any) -> None:
            self.inner = real(*args)
            self.runs = 0

        def run(self, *args: Any) -> Any:
            self.runs += 1
            if self.runs == 2:
                raise RuntimeError("boom")
            return self.inner.run(*args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(native, "Loop", Broken)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")  # the first run hands back at the error
        # the second run fails at once: the session ends with a FATAL XX000 the client reads
        # with its next statement (or, if the close came first, as a closed connection)
        wait_until(lambda: not _sessions(handle), what="the session to end")
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 2")
        assert conn.closed or conn.broken
    assert caught.value.sqlstate in ("XX000", None)
    if caught.value.sqlstate is None:
        assert "closed" in str(caught.value) or "terminat" in str(caught.value)


def test_a_client_killed_mid_result_ends_its_session_and_backend(sidecar, pg, relay_native):
    handle = sidecar()
    env = {**os.environ, "PGAPPNAME": "native_kill"}
    child = subprocess.Popen(
        [
            "psql",
            "-X",
            "-d",
            handle.dsn(),
            "-c",
            "SELECT repeat('x', 1000) FROM generate_series(1, 5000000)",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_until(
            lambda: pg.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'native_kill' "
                "AND state = 'active'"
            ),
            timeout=20,
            what="the query to run",
        )
        time.sleep(0.3)  # mid-result
        child.kill()  # kill -9: no Terminate, the socket just closes
    finally:
        child.wait(10)
    wait_until(
        lambda: not pg.sql("SELECT 1 FROM pg_stat_activity WHERE application_name = 'native_kill'"),
        timeout=30,
        what="the killed client's backend to end",
    )
    wait_until(lambda: not _sessions(handle), timeout=20, what="the session to close")
    with psycopg.connect(handle.dsn(), autocommit=True) as again:
        assert again.execute("SELECT 42").fetchone() == (42,)


def test_statement_metrics_count_the_same_on_both_paths(sidecar, relay_native):
    from core import metrics  # noqa: PLC0415

    handle = sidecar()
    hot = metrics.HOT
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1")  # settle: the session is READY and maybe native
        list(metrics.HOT.collect())
        before = dict(hot.statements)
        sent_before = hot.bytes_client_to_upstream
        for _ in range(10):
            conn.execute("SELECT 1", prepare=False)
        conn.execute("CREATE TEMP TABLE m (a int)")
        conn.execute("INSERT INTO m VALUES (1)")
        list(metrics.HOT.collect())  # a scrape publishes what the loop counted
        after = dict(hot.statements)
        assert after["read"] - before["read"] == 10
        assert after["write"] - before["write"] == 1
        assert after["other"] - before["other"] == 1
        assert hot.bytes_client_to_upstream - sent_before >= 12 * 14


def test_a_mirrored_session_is_relayed_natively_between_its_mapped_writes(db, sidecar):
    """With mappings (and traffic recording, on by default) the loop still relays the
    statements that concern no mapping; mapped writes go to Python and are mirrored."""
    config = migration("split-users")
    prepare(db, config)
    handle = sidecar({**config, "relay": {"native": "on"}})
    recorder = handle.sidecar.traffic
    assert recorder is not None
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        for _ in range(5):
            conn.execute("SELECT 7 AS native_plain", prepare=False)
        conn.execute(
            "INSERT INTO users (id, tenant_id, email, first_name, last_name, role) "
            "VALUES (9001, 1, 'n@example.com', 'Nat', 'Ive', 'customer')"
        )
        conn.execute("SELECT 8 AS native_after", prepare=False)
        (session,) = _sessions(handle)
        loop = session.native
        assert loop is not None
        assert loop.entered >= 2
        assert loop.reasons.get("client_frame", 0) >= 1  # the INSERT into a mapped table
        # the texts the loop relayed reach the traffic recorder at the next hand-back
        handle.call(loop.after, lambda: None)

        def noted() -> bool:
            seen = b" ".join(recorder._seen)
            return b"native_plain" in seen and b"native_after" in seen

        wait_until(noted, what="the loop's texts in the traffic recorder")
    drain(handle)
    assert db.sql("SELECT full_name FROM v2.customers WHERE id = 9001") == [("Nat Ive",)]


# --- careless configuration ---------------------------------------------------------------------


def test_a_bad_relay_native_value_is_refused_with_its_path():
    from core.config import parse_config  # noqa: PLC0415
    from core.errors import ConfigError  # noqa: PLC0415

    with pytest.raises(ConfigError) as bad:
        parse_config({"relay": {"native": "yes"}})
    assert "relay.native" in str(bad.value)
    with pytest.raises(ConfigError) as unknown:
        parse_config({"relay": {"nativ": "on"}})
    assert "relay.nativ" in str(unknown.value)


def test_unquoted_yaml_on_and_off_mean_on_and_off(tmp_path):
    from core.config import load_config  # noqa: PLC0415

    for text, expected in (("on", "on"), ("off", "off"), ("auto", "auto"), ("'off'", "off")):
        path = tmp_path / "dualwrite.yaml"
        path.write_text(f"relay:\n  native: {text}\n")
        assert load_config(path).relay.native == expected


def test_native_on_without_the_extension_refuses_to_start(monkeypatch):
    from core.config import parse_config  # noqa: PLC0415
    from core.errors import ConfigError  # noqa: PLC0415

    monkeypatch.setattr(native, "AVAILABLE", False)
    with pytest.raises(ConfigError) as refused:
        native.check(parse_config({"relay": {"native": "on"}}))
    assert "relay.native" in str(refused.value)
    native.check(parse_config({"relay": {"native": "auto"}}))  # auto falls back quietly
