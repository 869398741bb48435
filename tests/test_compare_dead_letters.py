"""Dead-lettered keys are stuck, not in flight: a pass that meets one is not clean (exit 1), and
they are counted as their own class in the summary, the run's record and the report."""

from __future__ import annotations

import json

import psycopg
import pytest
from support import wait_until
from test_compare_support import config_data, prepare, reconcile, run_dualwrite, write_config

_SOURCE = "CREATE TABLE items (id int PRIMARY KEY, qty int NOT NULL);"
#: the target refuses what the source accepts: such a key can only be dead-lettered
_TARGET = "CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, qty int CHECK (qty < 100));"
_MAPPING = {
    "name": "items",
    "source": "items",
    "target": "v2.items",
    "key": ["id"],
    "columns": {"id": "id", "qty": "qty"},
    "mode": "outbox",
}


@pytest.fixture(params=["same_database", "cross_database"])
def target(request, db, pg):
    """Where the target lives: ({} or {"target_dsn": ...}, a way to run SQL there)."""
    db.sql(_SOURCE)
    if request.param == "same_database":
        db.sql(_TARGET)
        yield {}, db
        return
    other = pg.create_database()
    try:
        other.sql(_TARGET)
        yield {"target_dsn": pg.dsn(other.name, password="")}, other
    finally:
        other.drop()


async def test_dead_lettered_keys_make_the_pass_not_clean(target, db, sidecar, tmp_path):
    extra, target_db = target
    data = config_data(db.dsn, [{**_MAPPING, **extra}])
    config, mappings = await prepare(data)
    handle = sidecar(
        {
            "mappings": data["mappings"],
            "applier": {"poll_interval_seconds": 0.05, "retry_base_seconds": 60},
        }
    )
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items (id, qty) VALUES (1, 5), (2, 500), (3, 7)")
    wait_until(
        lambda: db.scalar("SELECT count(*) FROM dualwrite.dead_letters") == 1
        and db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0,
        what="key [2] to be dead-lettered",
    )
    assert target_db.sql("SELECT id, qty FROM v2.items ORDER BY id") == [(1, 5), (3, 7)]

    result = await reconcile(config, mappings["items"])
    assert result.tally.dead_lettered == 1
    assert result.tally.pending == 0
    assert result.tally.counts == {"missing": 0, "extra": 0, "changed": 0}
    assert not result.tally.clean
    assert result.remaining == 1
    recorded = db.sql(
        "SELECT dead_lettered, pending, clean FROM dualwrite.reconcile_runs WHERE id = %s",
        result.run_id,
    )
    assert recorded == [(1, 0, False)]

    path = write_config(tmp_path / "c.yaml", data)
    done = run_dualwrite("reconcile", "--config", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "dead_lettered" in done.stdout
    assert "1 divergent keys are in dualwrite.dead_letters" in done.stdout

    report = run_dualwrite("report", "--config", str(path), "--format", "json")
    passes = json.loads(report.stdout)["mappings"][0]["passes"]
    assert passes[0]["dead_lettered"] == 1
    assert passes[0]["clean"] is False
