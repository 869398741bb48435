"""Authentication is relayed unchanged: trust, md5 and scram-sha-256, for psql, asyncpg, psycopg.

A PostgreSQL cluster of the module's own asks two roles for passwords (one md5, one
SCRAM); the right password logs in through the proxy, a wrong one gets the server's own
error (28P01), word for word what the same client prints when it connects directly.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import psycopg
import pytest
from support import run_psql, wait_until
from support.transparency import RawClient, start_relay, startup_packet

from dualwrite.embedded import EmbeddedPostgres

PASSWORDS = {
    "md5_user": "md5-Secret-4711",
    "scram_user": "Scram-Secret-Zebra-0815",
}
#: (role, what its hba line asks for); postgres logs in by trust
USERS = [("postgres", "trust"), ("md5_user", "md5"), ("scram_user", "scram-sha-256")]


@pytest.fixture(scope="module")
def cluster():
    hba = [
        "host all md5_user 127.0.0.1/32 md5",
        "host all scram_user 127.0.0.1/32 scram-sha-256",
    ]
    with EmbeddedPostgres(hba_lines=hba) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE md5_user LOGIN PASSWORD '{PASSWORDS['md5_user']}'")
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE scram_user LOGIN PASSWORD '{PASSWORDS['scram_user']}'")
            stored = dict(
                conn.execute(
                    "SELECT rolname, left(rolpassword, 5) FROM pg_authid "
                    "WHERE rolname IN ('md5_user', 'scram_user')"
                ).fetchall()
            )
        assert stored == {"md5_user": "md5" + stored["md5_user"][3:], "scram_user": "SCRAM"}
        yield server


@pytest.fixture(scope="module")
def proxy(pg, cluster, relay_native):
    handle = start_relay(
        pg,
        "postgres",
        {"upstream": {"host": cluster.host, "port": cluster.port}, "service_dsn": cluster.dsn()},
    )
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def url(port: int, user: str, password: str | None) -> str:
    auth = user + (f":{password}" if password else "")
    return f"postgresql://{auth}@127.0.0.1:{port}/postgres"


def psql_login(port: int, user: str, password: str | None) -> tuple[int, str, str]:
    result = run_psql(
        f"postgresql://{user}@127.0.0.1:{port}/postgres",
        "SELECT current_user",
        "-w",  # never prompt
        env={"PGPASSWORD": password} if password else {"PGPASSWORD": ""},
    )
    return result.returncode, result.stdout, result.stderr.replace(str(port), "<port>")


def psycopg_login(port: int, user: str, password: str | None) -> tuple[str, str]:
    try:
        with psycopg.connect(url(port, user, password), connect_timeout=10) as conn:
            return ("ok", conn.execute("SELECT current_user").fetchone()[0])
    except psycopg.OperationalError as exc:
        return ("error", str(exc).replace(str(port), "<port>"))


def asyncpg_login(port: int, user: str, password: str | None) -> tuple[str, ...]:
    async def login() -> tuple[str, ...]:
        try:
            conn = await asyncpg.connect(url(port, user, password), timeout=10)
        except asyncpg.PostgresError as exc:
            return ("error", type(exc).__name__, exc.sqlstate, str(exc))
        try:
            return ("ok", await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close()

    return asyncio.run(login())


@pytest.mark.parametrize(("user", "method"), USERS)
def test_the_right_password_logs_in_through_the_proxy(proxy, cluster, user, method):
    password = PASSWORDS.get(user)
    code, out, err = psql_login(proxy.port, user, password)
    assert (code, out.strip(), err) == (0, user, "")
    assert psycopg_login(proxy.port, user, password) == ("ok", user)
    assert asyncpg_login(proxy.port, user, password) == ("ok", user)


@pytest.mark.parametrize(("user", "method"), USERS[1:])
@pytest.mark.parametrize("password", ["wrong-password", None], ids=["wrong", "missing"])
def test_a_wrong_password_fails_with_the_servers_own_error(proxy, cluster, user, method, password):
    direct = (
        psql_login(cluster.port, user, password),
        psycopg_login(cluster.port, user, password),
        asyncpg_login(cluster.port, user, password),
    )
    # the server really asks for a password: the direct logins fail
    assert direct[0][0] == 2
    assert direct[1][0] == "error"
    if password is not None:
        assert f'password authentication failed for user "{user}"' in direct[0][2]
        assert direct[2][:3] == ("error", "InvalidPasswordError", "28P01")
    proxied = (
        psql_login(proxy.port, user, password),
        psycopg_login(proxy.port, user, password),
        asyncpg_login(proxy.port, user, password),
    )
    assert proxied == direct


@pytest.mark.parametrize(
    ("user", "request_code"), [("md5_user", 5), ("scram_user", 10), ("postgres", 0)]
)
def test_the_authentication_request_is_the_servers(proxy, cluster, user, request_code):
    requests = []
    for port in (cluster.port, proxy.port):
        with RawClient("127.0.0.1", port) as client:
            client.send(startup_packet({"user": user, "database": "postgres"}))
            message = client.read_message()
            assert message is not None
            assert message.typ == b"R"
            code = int.from_bytes(message.body[:4], "big")
            # md5's salt changes per connection; the mechanism list of SASL does not
            requests.append((code, message.body[4:] if code != 5 else len(message.body)))
    assert requests[0][0] == request_code
    assert requests[1] == requests[0]
    if request_code == 10:
        assert requests[0][1] == b"SCRAM-SHA-256\x00\x00"


def test_a_client_that_never_answers_the_password_request_times_out(pg, cluster):
    handle = start_relay(
        pg,
        "postgres",
        {
            "upstream": {"host": cluster.host, "port": cluster.port},
            "limits": {"startup_timeout_seconds": 0.5},
        },
    )
    try:
        with RawClient(handle.host, handle.port) as client:
            client.send(startup_packet({"user": "scram_user", "database": "postgres"}))
            received = client.until_closed()
    finally:
        handle.stop(grace=0)
    assert [m.typ for m in received] == [b"R", b"E"]
    assert (received[1].severity, received[1].sqlstate) == ("FATAL", "08P01")
    assert "timeout" in received[1].message
    # the backend that was waiting for the password is gone too
    with psycopg.connect(cluster.dsn(), autocommit=True) as admin:
        wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                ).fetchone()
                == (0,)
            ),
            15,
            "the half-authenticated backend to exit",
        )


def test_passwords_and_statements_never_reach_the_log(sidecar_process, cluster):
    handle = sidecar_process(
        {
            "upstream": {"host": cluster.host, "port": cluster.port},
            "logging": {"level": "info", "format": "json"},
        }
    )
    marker = "statement_text_marker_31337"
    for user in ("scram_user", "md5_user"):
        password = PASSWORDS[user]
        with psycopg.connect(url(handle.port, user, password), autocommit=True) as conn:
            assert conn.execute(f"SELECT '{marker}'").fetchone() == (marker,)
        assert psycopg_login(handle.port, user, password + "-typo")[0] == "error"
    handle.terminate()
    assert handle.wait(30) == 0
    output = handle.output()
    records = handle.log_records()
    ready = [r for r in records if r.get("event") == "session_ready"]
    assert {r.get("user") for r in ready} == {"scram_user", "md5_user"}
    assert all(isinstance(r.get("conn_id"), int) for r in ready)
    assert all(
        "conn_id" in r
        for r in records
        if r.get("component") == "proxy" and r.get("event") not in ("listening", "draining")
    )
    for secret in PASSWORDS.values():
        assert secret not in output
        assert secret not in json.dumps(records)
    assert marker not in output
