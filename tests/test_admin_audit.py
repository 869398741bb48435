"""The admin audit trail keeps no secrets and cannot be flooded (issue 11, item 14).

- every body key named like a secret is masked, at any depth (``db_password``, ``apiKey``, a
  nested ``refresh_token``, an ``Authorization`` inside a list...);
- a body too large (413) is audited like any other refusal;
- unauthenticated attempts are aggregated per ``admin.unauthorized_audit_window_seconds``: 2,000
  of them write two rows (the first, then one summary with the count), not 2,000.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import aiohttp
import pytest
from test_admin_api import MAPPING, TOKEN, TOKEN_ENV, audit_rows, is_paused, mapping_config, post
from test_admin_api import prepare as prepare_items

from core import metrics
from core.logs import configure_logging, get_logger, is_secret_key

SECRETS = {
    "db_password": "pw-1111",
    "apiKey": "key-2222",
    "nested": {
        "refresh_token": "tok-3333",
        "list": [{"Authorization": "Bearer auth-4444", "client_secret": "sec-5555"}],
        "X-Api-Key": "key-6666",
    },
    "service_dsn": "postgresql://u:dsnpw-7777@h/db",
    "credentials": {"user": "u", "passwd": "pw-8888"},
}


@pytest.fixture
def audited(db, sidecar, monkeypatch):
    prepare_items(db)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return sidecar({"mappings": [mapping_config()], "admin": {"token_env": TOKEN_ENV}})


def test_secret_keys_are_redacted_at_any_depth_in_the_audit_trail(audited, db):
    body = {"by": "alice", **SECRETS}
    assert post(audited, f"/actions/mappings/{MAPPING}/pause", body=body)[0] == 200
    ((action, params, outcome),) = audit_rows(db)
    assert (action, outcome) == ("pause", "ok")
    assert params["body"] == {
        "by": "alice",
        "db_password": "[redacted]",
        "apiKey": "[redacted]",
        "nested": {
            "refresh_token": "[redacted]",
            "list": [{"Authorization": "[redacted]", "client_secret": "[redacted]"}],
            "X-Api-Key": "[redacted]",
        },
        "service_dsn": "[redacted]",
        "credentials": "[redacted]",
    }
    stored = json.dumps(db.sql("SELECT * FROM dualwrite.admin_actions"), default=str)
    for marker in ("1111", "2222", "3333", "4444", "5555", "6666", "7777", "8888"):
        assert marker not in stored


def test_log_lines_mask_the_same_keys_at_any_depth():
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    try:
        get_logger("test").info("something", params={"body": SECRETS}, apiKey="key-9999")
    finally:
        configure_logging("warning", "console")
    line = out.getvalue()
    for marker in ("1111", "2222", "3333", "4444", "5555", "6666", "7777", "8888", "9999"):
        assert marker not in line
    assert json.loads(line)["params"]["body"]["nested"]["refresh_token"] == "[redacted]"
    assert not any(is_secret_key(k) for k in ("by", "mapping", "name", "author", "path"))


def test_a_body_too_large_is_refused_and_audited(audited, db):
    big = {"by": "x" * (2 << 20)}
    status, answer = post(audited, f"/actions/mappings/{MAPPING}/pause", body=big)
    assert status == 413
    assert answer == {"error": "body too large"}
    assert not is_paused(db)
    assert [(a, o) for a, _, o in audit_rows(db)] == [("pause", "too_large")]


def test_unauthenticated_floods_write_a_bounded_number_of_audit_rows(audited, db):
    url = audited.admin_url(f"/actions/mappings/{MAPPING}/pause")

    async def flood(n: int) -> list[int]:
        async with aiohttp.ClientSession() as session:
            limit = asyncio.Semaphore(20)

            async def one(i: int) -> int:
                async with (
                    limit,
                    session.post(
                        url, json={"i": i}, headers={"Authorization": f"Bearer wrong-{i}"}
                    ) as response,
                ):
                    return response.status

            return list(await asyncio.gather(*(one(i) for i in range(n))))

    counted = metrics.ADMIN_ACTIONS.labels("pause", "unauthorized")
    before = counted._value.get()
    statuses = asyncio.run(flood(2000))
    assert statuses == [401] * 2000
    assert not is_paused(db)
    # the first attempt of the window is audited at once, the rest wait for the window's end
    assert [(a, o) for a, _, o in audit_rows(db)] == [("pause", "unauthorized")]
    audited.call(audited.sidecar.admin.flush_unauthorized)
    rows = audit_rows(db)
    assert [(a, o) for a, _, o in rows] == [
        ("pause", "unauthorized"),
        ("unauthorized", "unauthorized"),
    ]
    summary: dict[str, Any] = rows[1][1]
    assert summary["attempts"] == 1999
    assert summary["remotes"] == ["127.0.0.1"]
    assert summary["paths"] == [f"/actions/mappings/{MAPPING}/pause"]
    assert counted._value.get() - before == 2000  # every attempt is still counted
