"""The relay's metrics move with the traffic, and its log lines name the connection, not the SQL.

``dualwrite run`` runs as a real process so its /metrics start from zero and its JSON log is
the one an operator would read.
"""

from __future__ import annotations

from support import wait_until
from support.transparency import (
    RawClient,
    data_rows,
    frame,
    metric,
    scrape,
    startup_packet,
    unique_name,
)

OPEN = "dualwrite_client_connections_open"
ACCEPTED = "dualwrite_client_connections_accepted_total"
REJECTED = "dualwrite_client_connections_rejected_total"
PROTOCOL = "dualwrite_protocol_errors_total"
STATEMENTS = "dualwrite_statements_total"
BYTES = "dualwrite_proxy_bytes_total"
CONNECT_ERRORS = "dualwrite_upstream_connect_errors_total"


def extended(sql: str) -> bytes:
    """Parse/Bind/Execute/Sync of one statement without parameters."""
    return (
        frame(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00")
        + frame(b"B", b"\x00\x00" + b"\x00\x00" * 3)
        + frame(b"E", b"\x00\x00\x00\x00\x00")
        + frame(b"S")
    )


def test_relay_metrics_follow_connections_statements_and_bytes(sidecar_process, db, pg):
    handle = sidecar_process(
        {"limits": {"max_client_connections": 2, "max_message_bytes": 1 << 20}}
    )
    start = scrape(handle)  # the harness's readiness probe may have been accepted already
    wait_until(lambda: metric(scrape(handle), OPEN) == 0, 10, "the probe to be gone")

    first = RawClient(handle.host, handle.port)
    first.startup(pg.user, db.name, application_name=unique_name("metrics"))
    second = RawClient(handle.host, handle.port)
    second.startup(pg.user, db.name, application_name=unique_name("metrics"))
    assert metric(scrape(handle), OPEN) == 2

    for sql in ("SELECT 1", "SELECT 2", "WITH x AS (SELECT 1) SELECT * FROM x"):
        first.simple(sql)  # 3 reads
    first.simple("CREATE TABLE m (v text)")  # other
    first.simple("INSERT INTO m VALUES ('a')")  # write
    first.simple("UPDATE m SET v = 'b'")  # write
    first.simple("SET work_mem = '5MB'")  # other
    second.send(extended("DELETE FROM m"))  # a write through the extended protocol
    assert second.until_ready()[-1].typ == b"Z"
    big = "q" * 200_000
    assert data_rows(first.simple(f"SELECT length('{big}')")) == [[b"200000"]]  # read
    assert len(data_rows(first.simple("SELECT repeat('x', 1048576)"))[0][0]) == 1 << 20  # read

    # refused: a third client (limit 2), garbage, a message above the size limit
    with RawClient(handle.host, handle.port) as third:
        third.send(startup_packet({"user": pg.user, "database": db.name}))
        assert [m.sqlstate for m in third.until_closed()] == ["53300"]
    with RawClient(handle.host, handle.port) as garbage:
        garbage.send(b"GET /metrics HTTP/1.1\r\n\r\n")
        assert [m.sqlstate for m in garbage.until_closed()] == ["08P01"]
    second.send(b"Q" + (2 << 20).to_bytes(4, "big"))
    assert [m.sqlstate for m in second.until_closed()] == ["08P01"]

    now = scrape(handle)
    assert metric(now, ACCEPTED) - metric(start, ACCEPTED) == 4
    assert metric(now, REJECTED, reason="max_connections") == 1
    assert metric(now, PROTOCOL, kind="malformed") == 1
    assert metric(now, PROTOCOL, kind="too_large") == 1
    assert metric(now, STATEMENTS, kind="read") == 5
    assert metric(now, STATEMENTS, kind="write") == 3
    assert metric(now, STATEMENTS, kind="other") == 2
    assert metric(now, BYTES, direction="client_to_upstream") > 200_000
    assert metric(now, BYTES, direction="upstream_to_client") > 1 << 20
    assert metric(now, CONNECT_ERRORS) == 0
    assert metric(now, OPEN) == 1  # the first client is still connected

    first.close()
    wait_until(lambda: metric(scrape(handle), OPEN) == 0, 10, "the gauge to drop to 0")


def test_upstream_connect_errors_are_counted(sidecar):
    from support import free_port  # noqa: PLC0415

    handle = sidecar({"upstream": {"port": free_port()}})
    before = scrape(handle)
    for _ in range(2):
        with RawClient(handle.host, handle.port) as client:
            client.send(startup_packet({"user": "u", "database": "d"}))
            assert [m.sqlstate for m in client.until_closed()] == ["08006"]
    after = scrape(handle)
    assert metric(after, CONNECT_ERRORS) == metric(before, CONNECT_ERRORS) + 2
    assert metric(after, REJECTED, reason="upstream_unavailable") == (
        metric(before, REJECTED, reason="upstream_unavailable") + 2
    )


def test_log_lines_carry_conn_id_and_no_statement_text(sidecar_process, db, pg):
    handle = sidecar_process(
        {"logging": {"level": "info", "format": "json"}, "limits": {"startup_timeout_seconds": 0.5}}
    )
    marker = "secret_statement_marker_8086"
    names = [unique_name("logged") for _ in range(2)]
    for name in names:
        with RawClient(handle.host, handle.port) as client:
            client.startup(pg.user, db.name, application_name=name)
            assert data_rows(client.simple(f"SELECT '{marker}'")) == [[marker.encode()]]
            client.simple(f"SELECT no_such_column_{marker}")  # an error, also not logged
    with RawClient(handle.host, handle.port) as bad:
        bad.send(b"\x00\x00\x00\x02")  # a protocol violation before startup
        bad.until_closed()
    with RawClient(handle.host, handle.port) as silent:
        silent.until_closed()  # the startup timeout
    handle.terminate()
    assert handle.wait(30) == 0

    records = handle.log_records()
    ready = [r for r in records if r.get("event") == "session_ready"]
    assert sorted(r["application"] for r in ready) == sorted(names)
    assert len({r["conn_id"] for r in ready}) == 2
    problems = [r for r in records if r.get("event") in ("protocol_violation", "startup_timeout")]
    assert len(problems) == 2
    assert all(isinstance(r.get("conn_id"), int) for r in ready + problems)
    assert all(r.get("level") in ("info", "warning") for r in records)
    assert marker not in handle.output()
