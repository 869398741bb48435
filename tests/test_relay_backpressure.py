"""Backpressure: a slow peer stops the proxy reading from the other side, so memory stays flat.

The proxy's resident memory (``dualwrite run`` as a real process, read from /proc) must stay
far below the volume relayed: 1 GB of result rows to a client that is not reading, and
hundreds of MB of COPY data towards a server that is not reading.
"""

from __future__ import annotations

import select
import socket

from support import wait_until
from support.transparency import (
    RawClient,
    backend_pids,
    frame,
    query,
    rss_bytes,
    unique_name,
)

MB = 1 << 20
#: generous, but far below what buffering the traffic would take
RSS_LIMIT = 200 * MB
ROWS = 1024  # 1 MB each: 1 GB in all


def wait_event(pg, pid: int) -> str | None:
    rows = pg.sql("SELECT wait_event FROM pg_stat_activity WHERE pid = %s", pid)
    return rows[0][0] if rows else None


def test_a_client_not_reading_a_1_gb_result_stalls_the_server_not_the_proxys_memory(
    sidecar_process, db, pg
):
    handle = sidecar_process()
    name = unique_name("slow_reader")
    client = RawClient(handle.host, handle.port, timeout=60)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.startup(pg.user, db.name, application_name=name)
    (pid,) = backend_pids(pg, name)
    client.send(query(f"SELECT repeat('x', {MB}) FROM generate_series(1, {ROWS})"))

    # The client reads nothing: once the proxy's buffer towards it is full the proxy stops
    # reading the server, whose own socket then fills: the backend waits in ClientWrite.
    wait_until(lambda: wait_event(pg, pid) == "ClientWrite", 60, "the backend to block")
    stalled_rss = rss_bytes(handle.pid)
    assert stalled_rss < RSS_LIMIT

    # Now read it all, slowly enough to keep the pipe full, checking memory on the way.
    peak = stalled_rss
    received = 0
    chunk = bytearray(256 * 1024)
    tail = b""
    while True:
        n = client.sock.recv_into(chunk)
        assert n, "the proxy closed the connection mid-result"
        received += n
        tail = (tail + bytes(chunk[:n]))[-64:]
        if received % (16 * MB) < n:
            peak = max(peak, rss_bytes(handle.pid))
        if tail.endswith(frame(b"Z", b"I")):
            break
    assert peak < RSS_LIMIT
    row = 1 + 4 + 2 + 4 + MB  # DataRow: type, length, column count, value length, value
    assert received > ROWS * row
    assert b"C\x00\x00\x00\x10SELECT 1024\x00" in tail
    client.close()


def _send_until_stalled(sock: socket.socket, data: memoryview, budget: int) -> int:
    """Send ``data`` repeatedly without blocking until ``budget`` bytes are sent or the socket
    stays unwritable for 3 s (the pipe is full); return how much was sent."""
    sent = 0
    pos = 0
    while sent < budget:
        _, writable, _ = select.select([], [sock], [], 3.0)
        if not writable:
            return sent
        n = sock.send(data[pos:])
        sent += n
        pos = (pos + n) % len(data)
    return sent


def test_a_server_not_reading_a_large_copy_stalls_the_client_not_the_proxys_memory(
    sidecar_process, db, pg
):
    db.sql("CREATE TABLE sink (line text)")
    handle = sidecar_process()
    name = unique_name("slow_server")
    client = RawClient(handle.host, handle.port, timeout=60)
    client.startup(pg.user, db.name, application_name=name)
    (pid,) = backend_pids(pg, name)

    locker = db.connect(autocommit=False)
    locker.execute("LOCK TABLE sink IN ACCESS EXCLUSIVE MODE")
    try:
        # COPY waits for the lock before it reads anything: CopyData sent meanwhile piles up
        client.send(query("COPY sink FROM STDIN"))
        wait_until(lambda: wait_event(pg, pid) == "relation", 15, "COPY to wait for the lock")
        line = b"y" * (64 * 1024 - 1) + b"\n"
        one_frame = frame(b"d", line)
        assert len(one_frame) == 64 * 1024 + 5
        data = memoryview(one_frame * 16)
        client.sock.setblocking(False)
        sent = _send_until_stalled(client.sock, data, budget=1024 * MB)
        assert sent < RSS_LIMIT  # without backpressure the proxy would have taken it all
        assert rss_bytes(handle.pid) < RSS_LIMIT
    finally:
        locker.rollback()
        locker.close()

    # The lock is gone: COPY reads everything; finish on a frame boundary and commit.
    rest = (-sent) % len(one_frame)
    client.sock.setblocking(True)
    client.sock.settimeout(60)
    client.send(bytes(data[sent % len(data) : sent % len(data) + rest]) if rest else b"")
    client.send(frame(b"c"))
    replies = client.until_ready()
    frames = (sent + rest) // len(one_frame)
    tags = [m.body.rstrip(b"\0").decode() for m in replies if m.typ == b"C"]
    assert tags == [f"COPY {frames}"]
    assert db.scalar("SELECT count(*) FROM sink") == frames
    assert rss_bytes(handle.pid) < RSS_LIMIT
    client.close()
