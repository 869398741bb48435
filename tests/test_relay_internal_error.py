"""A bug inside the proxy ends the session with an ErrorResponse, never a silent drop."""

from __future__ import annotations

import psycopg
import pytest

from proxy.frontend import Frontend


def test_an_internal_error_is_reported_to_the_client(sidecar, monkeypatch):
    # (the Python path, which sees this Query; the native loop's own failure is tested in
    # test_relay_native.py)
    handle = sidecar({"relay": {"native": "off"}})

    def broken(self, typ, body):
        raise RuntimeError("boom")

    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        monkeypatch.setattr(Frontend, "message", broken)
        monkeypatch.setattr(Frontend, "plain_query", lambda self, body: False)
        with pytest.raises(psycopg.Error) as caught:
            conn.execute("SELECT 2")
        assert conn.closed or conn.broken
    assert caught.value.sqlstate == "XX000"
    assert "internal error" in str(caught.value)
