"""Backfill: from empty to complete while writes continue through the proxy, resumable after
kill -9, stopping at the high-water key; then a reconcile pass is clean."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from support import wait_until
from test_compare_live import Writer
from test_compare_support import (
    config_data,
    dualwrite_cmd,
    prepare,
    reconcile,
    run_dualwrite,
    write_config,
)

from compare.backfill import backfill_mapping

_TABLES = """
CREATE TABLE items (id serial PRIMARY KEY, tenant int NOT NULL, qty int, label text);
CREATE SCHEMA v2;
CREATE TABLE v2.items (id int PRIMARY KEY, tenant int NOT NULL, qty int, label text);
INSERT INTO items (tenant, qty, label)
SELECT g % 4, g, CASE WHEN g % 10 = 0 THEN 'skip' ELSE 'item ' || g END
FROM generate_series(1, {rows}) AS g;
"""


def _mapping(**extra: object) -> dict[str, object]:
    return {
        "name": "items",
        "source": "items",
        "target": "v2.items",
        "key": ["id"],
        "filter": "label <> 'skip'",
        "columns": {"id": "id", "tenant": "tenant", "qty": "qty * 2", "label": "upper(label)"},
        **extra,
    }


def _state(db) -> tuple[str, int, str | None, str | None]:
    return db.sql(
        "SELECT status, rows_done, checkpoint::text, high_water::text FROM dualwrite.backfill_state"
    )[0]


def test_killed_backfill_resumes_and_completes_under_concurrent_writes(db, sidecar, tmp_path):
    db.sql(_TABLES.format(rows=3000))
    data = config_data(
        db.dsn,
        [_mapping()],
        backfill={"chunk_rows": 50},
        logging={"level": "info", "format": "json"},
    )
    config, mappings = asyncio.run(prepare(data))
    path = write_config(tmp_path / "dw.yaml", data)
    handle = sidecar({"mappings": data["mappings"], "applier": {"poll_interval_seconds": 0.05}})
    with Writer(handle.dsn(), 7, max_id=3200) as writer:
        wait_until(lambda: writer.statements > 20, what="the load to start")
        last_before = db.scalar("SELECT max(id) FROM items")
        slow = subprocess.Popen(
            dualwrite_cmd("backfill", "--config", str(path), "--rate", "300"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: _rows_done(db) >= 600, 60, "the backfill to get going")
        finally:
            os.kill(slow.pid, signal.SIGKILL)
            slow.communicate(timeout=30)
        last_at_kill = db.scalar("SELECT max(id) FROM items")
        status, done, checkpoint, high_water = _state(db)
        assert status == "running"  # nobody could record anything: it was killed
        assert 600 <= done < 2700
        assert checkpoint is not None
        # the high water is the last key when it started, not chased while inserts go on
        assert last_before <= int(high_water.strip("[]")) < last_at_kill
        resumed = run_dualwrite("backfill", "--config", str(path))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "done (resumed)" in resumed.stdout
        during = writer.statements
    assert writer.statements > during
    status, done, checkpoint, _ = _state(db)
    assert status == "done"
    # every included source key up to the high water was copied once, across both runs
    # (keys deleted through the proxy before the backfill reached them are not counted)
    assert done <= int(high_water.strip("[]"))
    handle.call(handle.sidecar.applier.drain)
    result = asyncio.run(reconcile(config, mappings["items"]))
    assert result.tally.clean
    assert result.tally.compared == db.scalar("SELECT count(*) FROM items WHERE label <> 'skip'")
    again = run_dualwrite("backfill", "--config", str(path))
    assert again.returncode == 0
    assert "already complete" in again.stdout
    runs = db.sql("SELECT status FROM dualwrite.reconcile_runs WHERE kind = 'backfill' ORDER BY id")
    assert runs == [("interrupted",), ("done",)]  # the killed run was closed by the next


async def test_backfill_from_empty_restart_and_cross_database(db, pg):
    db.sql(_TABLES.format(rows=700))
    other = pg.create_database()
    try:
        other.sql(
            "CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, "
            "tenant int NOT NULL, qty int, label text)"
        )
        mapping = _mapping(name="far", target_dsn=pg.dsn(other.name, password=""))
        data = config_data(db.dsn, [_mapping(), mapping], backfill={"chunk_rows": 64})
        config, mappings = await prepare(data)
        for name in ("items", "far"):
            result = await backfill_mapping(config, mappings[name])
            assert (result.status, result.rows, result.estimate) == ("done", 630, 630)
            assert (await reconcile(config, mappings[name])).tally.clean
        assert other.scalar("SELECT count(*) FROM v2.items") == 630
        finished = await backfill_mapping(config, mappings["items"])
        assert finished.status == "already_done"
        assert finished.rows == 0
        db.sql("DELETE FROM v2.items WHERE id < 100")
        restarted = await backfill_mapping(config, mappings["items"], restart=True)
        assert (restarted.status, restarted.rows, restarted.upserted) == ("done", 630, 90)
        assert (
            db.scalar("SELECT rows_done FROM dualwrite.backfill_state WHERE mapping = 'items'")
            == 630
        )
    finally:
        other.drop()


def _rows_done(db) -> int:
    return db.scalar("SELECT rows_done FROM dualwrite.backfill_state") or 0
