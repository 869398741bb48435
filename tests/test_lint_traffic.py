"""Traffic evidence end to end: statements run through the real proxy are recorded (names only),
then `dualwrite lint --live` refuses a DROP COLUMN one of them used and finds none for a column
no statement used; `dualwrite report` shows the same as contract readiness. Also what limits
the evidence: a full queue, the fingerprint cap, a recording shorter than the window."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import psycopg
from support import Database, run_psql
from support.lint import record_traffic, rules_of, run_cli, write_config
from support.pos import migration, prepare

from core.config import TrafficConfig
from core.traffic import analyse, read_evidence
from dualwrite.cli import main
from proxy.traffic import TrafficRecorder

SECRET = "secret-literal-4242"


def contract_step(column: str) -> str:
    """A contract script by the template, dropping one column of users."""
    return f"""-- description: drop users.{column}
-- strategy: contract
-- rollback: ALTER TABLE users ADD COLUMN IF NOT EXISTS {column} text; (values from the backup)
SET lock_timeout = '2s';
SET statement_timeout = '60s';
DO $$ BEGIN ASSERT to_regclass('public.users') IS NOT NULL; END $$;
ALTER TABLE users DROP COLUMN IF EXISTS {column};
"""


def test_statements_through_the_proxy_decide_a_drop_column(
    db: Database, sidecar, tmp_path: Path, capsys
) -> None:
    config = migration("split-users")
    prepare(db, config)
    handle = sidecar({**config, "traffic": {"flush_interval_seconds": 60}})
    assert handle.sidecar is not None
    recorder = handle.sidecar.traffic
    assert recorder is not None
    time.sleep(1.0)  # the recording must have begun before the window lint looks at
    # simple protocol (psql), extended protocol with a named prepared statement (psycopg)
    done = run_psql(
        handle.dsn(),
        f"SELECT first_name FROM users WHERE email = '{SECRET}'",
        "-v",
        "ON_ERROR_STOP=1",
    )
    assert done.returncode == 0, done.stderr
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        app.execute("SELECT phone FROM users WHERE id = %s", (1,), prepare=True)
        app.execute("UPDATE users SET last_name = last_name WHERE id = %s", (1,))
        handle.call(recorder._flush_with, handle.sidecar.pool)
        # still open: its prepared statement counts as seen at every flush
    rows = db.sql("SELECT kind, refs::text, calls FROM dualwrite.traffic_statements")
    assert rows, "nothing was recorded"
    assert not any(SECRET in str(row) for row in rows), "a literal value was stored"
    recorded = " ".join(row[1] for row in rows)
    for column in ("first_name", "phone", "last_name", "email"):
        assert column in recorded

    window = f"{time.time() - recorder.started_at - 0.3:.1f}s"
    after_cutover = write_config(tmp_path / "lint.yaml", {"service_dsn": db.dsn})
    used = tmp_path / "drop_used.sql"
    used.write_text(contract_step("phone"))
    code, out, _ = run_cli(str(used), "--config", str(after_cutover), "--live", "--since", window)
    assert code == 1, out
    assert "[traffic-still-references] drops users.phone, used by 1 statement shape" in out
    assert "fingerprint " in out
    assert "last seen" in out

    unused = tmp_path / "drop_unused.sql"
    unused.write_text(contract_step("updated_at"))
    code, out, _ = run_cli(
        str(unused),
        "--config",
        str(after_cutover),
        "--live",
        "--since",
        window,
        "--format",
        "json",
    )
    assert code == 0, out
    findings = json.loads(out)["findings"]
    assert [f["rule"] for f in findings] == ["traffic-unreferenced"], findings
    assert "traffic-still-references" not in {f["rule"] for f in findings}
    assert "ban-drop-column" not in {f["rule"] for f in findings}  # answered by the evidence
    (note,) = [f for f in findings if f["rule"] == "traffic-unreferenced"]
    assert "users.updated_at" in note["message"]

    # the cutover report shows what still references the old table, and since when
    report_config = write_config(tmp_path / "report.yaml", {"service_dsn": db.dsn, **config})
    capsys.readouterr()
    main(["report", "--config", str(report_config), "--format", "json"])
    data = json.loads(capsys.readouterr().out)
    readiness = {r["mapping"]: r for r in data["contract_readiness"]}
    customers = readiness["customers"]
    assert customers["relation"] == "public.users"
    assert customers["statements"] >= 3
    assert {"first_name", "phone", "last_name"} <= set(customers["columns"])
    assert customers["ready"] is False


def test_a_full_queue_drops_counts_and_makes_the_evidence_incomplete(db: Database) -> None:
    record_traffic(db, [])  # the control schema

    async def run() -> None:
        recorder = TrafficRecorder(TrafficConfig(queue_size=10), "queue-test")
        recorder.started_at -= 86400
        for n in range(25):
            recorder.note(f"SELECT c{n} FROM t".encode(), "utf-8")
        recorder.note(b"SELECT c0 FROM t", "utf-8")  # a repeat: the dict lookup only
        assert recorder.log.dropped == 15
        conn = await asyncpg.connect(db.dsn)
        try:
            await recorder.flush(conn)
            since = await conn.fetchval("SELECT now() - interval '1 hour'")
            evidence = await read_evidence(conn, since)
        finally:
            await conn.close()
        assert evidence.dropped == 15
        assert any("not analysed" in gap for gap in evidence.gaps)
        assert len(evidence.statements) == 10
        calls = {s.references[0].columns: s.calls for s in evidence.statements}
        assert calls[frozenset({"c0"})] == 2

    asyncio.run(run())


def test_the_fingerprint_cap_evicts_the_oldest_and_says_so(db: Database) -> None:
    record_traffic(db, [])

    async def run() -> None:
        recorder = TrafficRecorder(TrafficConfig(max_fingerprints=100), "cap-test")
        recorder.started_at -= 86400
        conn = await asyncpg.connect(db.dsn)
        try:
            for n in range(150):
                recorder.note(f"SELECT c{n} FROM t".encode(), "utf-8")
                recorder.analyse_pending()
                recorder.collect()
                recorder.log.seen[next(iter(recorder.log.seen))].last_seen -= 150 - n
                await recorder.flush(conn)
            kept = await conn.fetchval("SELECT count(*) FROM dualwrite.traffic_statements")
            since = await conn.fetchval("SELECT now() - interval '1 hour'")
            evidence = await read_evidence(conn, since)
        finally:
            await conn.close()
        assert kept == 100
        assert evidence.evicted_through is not None
        assert any("evicted" in gap for gap in evidence.gaps)
        # the newest were kept
        assert {"c149"} <= {c for s in evidence.statements for r in s.references for c in r.columns}

    asyncio.run(run())


def test_a_recording_shorter_than_the_window_keeps_the_warning(db: Database, tmp_path: Path):
    prepare(db, migration("split-users"))
    record_traffic(db, ["SELECT email FROM users"], recording_for=3600)
    config = write_config(tmp_path / "c.yaml", {"service_dsn": db.dsn})
    script = tmp_path / "drop.sql"
    script.write_text(contract_step("phone"))
    code, out, _ = run_cli(str(script), "--config", str(config), "--live", "--since", "7d")
    assert code == 0
    assert "[ban-drop-column]" in out
    assert "traffic evidence incomplete: traffic has been recorded only since" in out
    assert "[traffic-unreferenced]" not in out


def test_references_are_attributed_conservatively() -> None:
    (shape,) = analyse(
        "WITH recent AS (SELECT id FROM public.users u WHERE u.created_at > now()) "
        "SELECT t.*, r.id, row_to_json(p) FROM recent r JOIN tenants t USING (id) "
        "JOIN products p ON p.tenant_id = t.id WHERE name = 'x'"
    )
    refs = {(r.schema, r.relation): r.columns for r in shape.references}
    assert set(refs) == {("public", "users"), (None, "tenants"), (None, "products")}
    assert {"created_at", "id"} <= refs[("public", "users")]
    assert "*" in refs[(None, "tenants")]  # t.*
    assert "*" in refs[(None, "products")]  # row_to_json(p): the whole row
    # an unqualified column may belong to any relation of the statement
    assert all("name" in cols for cols in refs.values())
    (insert,) = analyse(
        "INSERT INTO users (id, email) VALUES (1, 'a') "
        "ON CONFLICT (id) DO UPDATE SET phone = EXCLUDED.phone"
    )
    assert insert.references[0].columns == frozenset({"id", "email", "phone"})
    (star,) = analyse("INSERT INTO users VALUES (1)")
    assert star.references[0].columns == frozenset({"*"})
    assert analyse("SELECT FROM WHERE") == []
    assert rules_of([]) == set()
