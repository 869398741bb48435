"""TLS from the sidecar to PostgreSQL (`upstream.tls`): encrypted, verified when asked, and
refused with a clear error when the server cannot do it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from dualwrite.embedded import EmbeddedPostgres, find_server_bin_dir

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A CA-less self-signed certificate for 127.0.0.1 (its own CA)."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    certs = tmp_path_factory.mktemp("certs")
    os.chmod(certs, 0o755)
    cert, key = _self_signed(certs)
    # not under pytest's 0700 base directory: the server may run as an unprivileged account
    server_dir = Path(tempfile.mkdtemp(prefix="dualwrite-tls-"))
    # the server (an unprivileged account when run as root) must own a 0600 key
    shutil.copy(cert, server_dir / "server.crt")
    shutil.copy(key, server_dir / "server.key")
    os.chmod(server_dir / "server.key", 0o600)
    os.chmod(server_dir / "server.crt", 0o644)
    os.chmod(server_dir, 0o755)
    pg = EmbeddedPostgres(
        bin_dir=_ssl_capable_bin_dir(),
        settings={
            "ssl": "on",
            "ssl_cert_file": str(server_dir / "server.crt"),
            "ssl_key_file": str(server_dir / "server.key"),
        },
        hba_lines=[
            "hostssl all tls_only 127.0.0.1/32 trust",
            "host all tls_only 127.0.0.1/32 reject",
            "hostssl all tls_scram 127.0.0.1/32 scram-sha-256",
        ],
        password_encryption="scram-sha-256",
    )
    if os.geteuid() == 0:
        for account in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(account)
            except KeyError:
                continue
            os.chown(server_dir / "server.key", entry.pw_uid, entry.pw_gid)
            break
    try:
        with pg:
            with psycopg.connect(pg.dsn(), autocommit=True) as conn:
                conn.execute("CREATE ROLE tls_only LOGIN")
                conn.execute("CREATE ROLE tls_scram LOGIN PASSWORD 'tls-scram-secret'")
            yield pg, cert
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)


def _ssl_capable_bin_dir() -> Path:
    """Server binaries built with OpenSSL: the embedded wheel's are not; a distribution's are."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    candidates.append(find_server_bin_dir())
    for candidate in candidates:
        postgres = candidate / "postgres"
        if postgres.exists() and b"SSL_CTX" in postgres.read_bytes():
            return candidate
    pytest.skip("no PostgreSQL server binaries built with SSL on this machine")


def _proxied_ssl(handle, user: str = "postgres") -> bool:
    with psycopg.connect(handle.dsn("postgres", user=user), autocommit=True) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        return bool(row[0])


@pytest.mark.parametrize("mode", ["require", "verify-full"])
def test_upstream_tls_encrypts_the_relayed_session(tls_server, sidecar, mode):
    pg, cert = tls_server
    tls = {"mode": mode}
    if mode == "verify-full":
        tls["ca_file"] = str(cert)
    handle = sidecar({"upstream": {"host": pg.host, "port": pg.port, "tls": tls},
                      "service_dsn": pg.dsn()})
    # the server only lets tls_only in over TLS: the relayed session must be encrypted
    assert _proxied_ssl(handle, user="tls_only")
    assert _proxied_ssl(handle)


def test_scram_through_a_tls_upstream(tls_server, sidecar):
    """The server offers SCRAM-SHA-256-PLUS over TLS; the client, in plain text to the proxy,
    must still authenticate (without channel binding) with the server's own exchange."""
    pg, _ = tls_server
    handle = sidecar({"upstream": {"host": pg.host, "port": pg.port, "tls": {"mode": "require"}},
                      "service_dsn": pg.dsn()})
    dsn = handle.dsn("postgres", user="tls_scram", password="tls-scram-secret")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("tls_scram",)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(handle.dsn("postgres", user="tls_scram", password="wrong"))
    assert "password authentication failed" in str(caught.value)


def test_upstream_tls_disabled_is_plain_text(tls_server, sidecar):
    pg, _ = tls_server
    handle = sidecar({"upstream": {"host": pg.host, "port": pg.port}, "service_dsn": pg.dsn()})
    assert not _proxied_ssl(handle)
    with pytest.raises(psycopg.OperationalError) as caught:
        _proxied_ssl(handle, user="tls_only")
    assert "pg_hba.conf" in str(caught.value)


def test_verify_full_against_the_wrong_ca_is_refused_clearly(tls_server, sidecar, tmp_path):
    pg, _ = tls_server
    other_cert, _ = _self_signed(tmp_path)
    handle = sidecar({"upstream": {"host": pg.host, "port": pg.port,
                                   "tls": {"mode": "verify-full", "ca_file": str(other_cert)}},
                      "service_dsn": pg.dsn()})
    with pytest.raises(psycopg.OperationalError) as caught:
        _proxied_ssl(handle)
    assert "could not connect to upstream server" in str(caught.value)
    assert "certificate verify failed" in str(caught.value).lower()


def test_upstream_without_tls_support_is_refused_when_required(pg, sidecar):
    if pg.embedded is None:
        ssl_on = psycopg.connect(pg.admin_dsn, autocommit=True).execute("SHOW ssl").fetchone()[0]
        if ssl_on == "on":
            pytest.skip("the shared test server has TLS on")
    handle = sidecar({"upstream": {"host": pg.host, "port": pg.port, "tls": {"mode": "require"}}})
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(handle.dsn(), autocommit=True)
    assert "upstream server does not support TLS" in str(caught.value)
