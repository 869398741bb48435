"""The admin HTTP API of a running sidecar: read endpoints, guarded actions, the audit trail."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import psycopg
import pytest
import yaml
from support import free_port, wait_until

from core import metrics
from core.config import AdminConfig, parse_config
from dualwrite.service import setup

TOKEN_ENV = "DW_TEST_ADMIN_TOKEN"
TOKEN = "t0ken-for-tests"
MAPPING = "items"


def mapping_config(name: str = MAPPING) -> dict[str, Any]:
    return {
        "name": name,
        "source": "public.items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "name": "name"},
    }


def prepare(db: Any) -> None:
    """Source and target tables, and `dualwrite setup` (control schema) for one mapping."""
    db.sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, name text)"
    )
    config = parse_config({"service_dsn": db.dsn, "mappings": [mapping_config()]})
    asyncio.run(setup(config))


@pytest.fixture
def running(db, sidecar, monkeypatch):
    """A sidecar mirroring ``items`` with actions enabled (the token is in the environment)."""
    prepare(db)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    return sidecar({"mappings": [mapping_config()], "admin": {"token_env": TOKEN_ENV}})


def post(
    handle: Any, path: str, *, token: str | None = TOKEN, body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    all_headers = dict(headers or {})
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers["Content-Type"] = "application/json"
    request = urllib.request.Request(
        handle.admin_url(path), data=data, method="POST", headers=all_headers
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def audit_rows(db: Any) -> list[tuple[str, dict[str, Any], str]]:
    return [
        (action, params, outcome)
        for action, params, outcome in db.sql(
            "SELECT action, params, outcome FROM dualwrite.admin_actions ORDER BY id"
        )
    ]


def is_paused(db: Any) -> bool:
    return bool(db.scalar("SELECT paused FROM dualwrite.mapping_state WHERE mapping = %s", MAPPING))


# --- read endpoints ----------------------------------------------------------------------------


def test_read_endpoints_answer_without_a_token(running):
    assert running.http_json("/healthz") == (200, {"status": "ok"})
    status, ready = running.http_json("/readyz")
    assert status == 200
    assert ready["ready"] is True
    assert {name: check["ok"] for name, check in ready["checks"].items()} == {
        "upstream": True, "mappings": True, "applier": True,
    }
    code, text = running.http("/metrics")
    assert code == 200
    assert "dualwrite_build_info{" in text
    code, body = running.http_json("/status")
    assert code == 200
    assert set(body["mappings"]) == {MAPPING}


def test_status_reports_mode_pause_outbox_dead_letters_reconcile_and_counts(running, db):
    def since_start() -> dict[str, float]:
        return dict(running.http_json("/status")[1]["mappings"][MAPPING]["since_start"])

    before = since_start()
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a'), (2, 'b')")
    after = since_start()
    assert after["rows_mirrored"] - before.get("rows_mirrored", 0) == 2
    assert after["statements_rewritten"] - before.get("statements_rewritten", 0) == 1

    wait_until(lambda: db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0,
               what="the applier to drain the outbox")
    assert post(running, f"/actions/mappings/{MAPPING}/pause")[0] == 200
    db.sql(
        "INSERT INTO dualwrite.outbox (mapping, key, enqueued_at)"
        " VALUES (%s, '[9]', now() - interval '30 seconds')",
        MAPPING,
    )
    db.sql(
        "INSERT INTO dualwrite.dead_letters (mapping, key, error) VALUES (%s, '[8]', 'x')", MAPPING
    )
    run_id = db.scalar(
        "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, finished_at, rows_compared,"
        " changed, clean) VALUES (%s, 'reconcile', 'done', now(), 2, 1, false) RETURNING id",
        MAPPING,
    )
    status = running.http_json("/status")[1]["mappings"][MAPPING]
    assert status["mode"] == "outbox"
    assert status["paused"] is True
    assert status["outbox_depth"] == 1
    assert status["outbox_oldest_age_seconds"] >= 30
    assert status["dead_letters"] == 1
    assert status["last_reconcile"]["id"] == run_id
    assert status["last_reconcile"]["changed"] == 1
    assert status["last_clean_pass_at"] is None
    assert status["reconcile_running"] is False


def test_readyz_is_503_when_upstream_is_down(sidecar):
    handle = sidecar({"upstream": {"port": free_port(), "connect_timeout_seconds": 1}})
    status, body = handle.http_json("/readyz")
    assert status == 503
    assert body["ready"] is False
    assert body["checks"]["upstream"]["ok"] is False
    assert handle.http_json("/healthz")[0] == 200  # alive, just not ready


def test_admin_listens_on_loopback_by_default(running):
    assert AdminConfig().host == "127.0.0.1"
    sockets = running.call(lambda: running.sidecar.admin._site._server.sockets)
    assert {s.getsockname()[0] for s in sockets} == {"127.0.0.1"}


# --- actions and the audit trail -------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "headers"),
    [
        (None, None),
        ("wrong-token", None),
        (None, {"Authorization": f"Basic {TOKEN}"}),
        (None, {"Authorization": TOKEN}),
        (TOKEN + "x", None),
    ],
    ids=["no-header", "wrong-token", "basic-scheme", "no-scheme", "token-prefix"],
)
def test_actions_without_the_token_are_refused_and_recorded(running, db, token, headers):
    status, body = post(running, f"/actions/mappings/{MAPPING}/pause", token=token, headers=headers)
    assert status == 401
    assert "token" in body["error"]
    assert not is_paused(db)
    ((action, params, outcome),) = audit_rows(db)
    assert (action, outcome) == ("pause", "unauthorized")
    assert params["name"] == MAPPING
    assert params["path"] == f"/actions/mappings/{MAPPING}/pause"
    assert params["remote"] == "127.0.0.1"


def test_actions_are_refused_when_no_token_is_configured(running, db, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV)
    assert post(running, f"/actions/mappings/{MAPPING}/pause")[0] == 401
    assert not is_paused(db)
    assert [(a, o) for a, _, o in audit_rows(db)] == [("pause", "unauthorized")]


def test_pause_and_resume_with_the_token_are_recorded(running, db):
    status, body = post(running, f"/actions/mappings/{MAPPING}/pause", body={"by": "alice"})
    assert (status, body) == (200, {"mapping": MAPPING, "paused": True})
    assert is_paused(db)
    assert db.scalar("SELECT updated_by FROM dualwrite.mapping_state") == "alice"
    assert running.http_json("/status")[1]["mappings"][MAPPING]["paused"] is True
    assert post(running, f"/actions/mappings/{MAPPING}/resume")[0] == 200
    assert not is_paused(db)
    rows = audit_rows(db)
    assert [(a, o) for a, _, o in rows] == [("pause", "ok"), ("resume", "ok")]
    assert rows[0][1]["body"] == {"by": "alice"}
    times = db.sql("SELECT at FROM dualwrite.admin_actions ORDER BY id")
    assert times[0][0] <= times[1][0]
    everything = json.dumps([list(r) for r in db.sql("SELECT * FROM dualwrite.admin_actions")],
                            default=str)
    assert TOKEN not in everything


def test_refused_and_failed_actions_are_recorded_with_their_outcome(running, db):
    assert post(running, "/actions/mappings/nope/pause")[0] == 404
    assert post(running, "/actions/mappings/items/explode")[0] == 404
    assert post(running, f"/actions/mappings/{MAPPING}/pause", body=b"{not json")[0] == 400
    assert post(running, f"/actions/mappings/{MAPPING}/pause", body=[1, 2])[0] == 400
    assert post(running, f"/actions/mappings/{MAPPING}/pause", body={"token": "leak"})[0] == 200
    rows = audit_rows(db)
    assert [(a, o) for a, _, o in rows] == [
        ("pause", "not_found"),
        ("unknown", "not_found"),
        ("pause", "bad_request"),
        ("pause", "bad_request"),
        ("pause", "ok"),
    ]
    assert rows[1][1]["path"] == "/actions/mappings/items/explode"
    assert rows[4][1]["body"] == {"token": "[redacted]"}


def test_an_action_still_answers_when_the_audit_table_is_gone(running, db):
    before = metrics.ADMIN_AUDIT_FAILURES._value.get()
    db.sql("ALTER TABLE dualwrite.admin_actions RENAME TO admin_actions_away")
    try:
        assert post(running, f"/actions/mappings/{MAPPING}/pause")[0] == 200
        assert is_paused(db)
        assert metrics.ADMIN_AUDIT_FAILURES._value.get() == before + 1
    finally:
        db.sql("ALTER TABLE dualwrite.admin_actions_away RENAME TO admin_actions")


def test_action_attempts_are_counted_by_bounded_labels(running):
    post(running, "/actions/" + "x" * 300)
    post(running, f"/actions/mappings/{MAPPING}/pause", token=None)
    text = running.http("/metrics")[1]
    assert 'dualwrite_admin_actions_total{action="unknown",outcome="not_found"}' in text
    assert 'dualwrite_admin_actions_total{action="pause",outcome="unauthorized"}' in text
    assert "x" * 300 not in text


# --- reconcile ---------------------------------------------------------------------------------


def test_reconcile_action_starts_one_pass_at_a_time(running, db):
    """The action's plumbing, with a stand-in pass that runs until the test releases it."""
    started: list[tuple[str, str]] = []
    gate: list[asyncio.Event] = []

    async def install() -> None:
        gate.append(asyncio.Event())

        async def held_pass(mapping: Any, by: str) -> None:
            started.append((mapping.name, by))
            await gate[0].wait()

        running.sidecar.reconcile_runner = held_pass

    running.call(install)
    path = f"/actions/mappings/{MAPPING}/reconcile"
    assert post(running, path, body={"by": "bob"}) == (
        202, {"mapping": MAPPING, "started": True, "by": "bob"}
    )
    wait_until(lambda: started, what="the pass to start")
    assert started == [(MAPPING, "bob")]
    assert running.http_json("/status")[1]["mappings"][MAPPING]["reconcile_running"] is True
    status, _body = post(running, path)
    assert status == 409
    running.call(gate[0].set)
    wait_until(
        lambda: not running.http_json("/status")[1]["mappings"][MAPPING]["reconcile_running"],
        what="the pass to finish",
    )
    assert post(running, path)[0] == 202
    assert [(a, o) for a, _, o in audit_rows(db)] == [
        ("reconcile", "accepted"), ("reconcile", "conflict"), ("reconcile", "accepted"),
    ]


# --- the report reads /status ------------------------------------------------------------------


def test_the_report_reads_a_running_sidecars_status(running, db, tmp_path):
    db.sql(
        "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, started_at, finished_at,"
        " clean) VALUES (%s, 'reconcile', 'done', now() - interval '2 minutes', now(), true)",
        MAPPING,
    )
    db.sql("INSERT INTO dualwrite.backfill_state (mapping, status) VALUES (%s, 'done')", MAPPING)
    config = tmp_path / "report.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "service_dsn": db.dsn,
                "report": {"criteria": {"clean_window_hours": 0}},
                "mappings": [mapping_config()],
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "dualwrite", "report", "--config", str(config), "--format",
         "json", "--status-url", f"http://127.0.0.1:{running.admin_port}"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["status_url"] == f"http://127.0.0.1:{running.admin_port}/status"
    assert [(c["name"], c["passed"]) for c in report["overall_criteria"]] == [
        ("sidecar_status", True)
    ]
    live = report["mappings"][0]["live"]
    assert live["mode"] == "outbox"
    assert live["paused"] is False


def test_reconcile_action_runs_a_real_pass_and_records_it(running, db):
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT g, 'n' || g FROM generate_series(1, 50) g")
    wait_until(lambda: db.scalar("SELECT count(*) FROM v2.items") == 50,
               what="the applier to mirror the rows")
    db.sql("INSERT INTO v2.items VALUES (999, 'stray')")  # written behind the mirror's back

    status, body = post(running, f"/actions/mappings/{MAPPING}/reconcile", body={"by": "carol"})
    assert (status, body["by"]) == (202, "carol")
    run = wait_until(
        lambda: db.sql(
            "SELECT status, rows_compared, missing, extra, changed, clean, requested_by, sidecar"
            " FROM dualwrite.reconcile_runs WHERE status <> 'running'"
        ),
        what="the pass to finish",
    )
    assert run == [("done", 51, 0, 1, 0, False, "carol", running.sidecar.recorder.sidecar)]
    last = running.http_json("/status")[1]["mappings"][MAPPING]["last_reconcile"]
    assert (last["status"], last["extra"]) == ("done", 1)
