"""Repair makes the next pass clean and is recorded; a dry run changes nothing; the CLI's
``reconcile`` exit codes and summary."""

from __future__ import annotations

import asyncpg
import pytest
from test_compare_support import (
    config_data,
    prepare,
    reconcile,
    run_dualwrite,
    write_config,
)

from compare.commands import reconcile_command

_SOURCE = """
CREATE TABLE users (id int PRIMARY KEY, tenant text, role text, name text, card text);
INSERT INTO users SELECT g, 't' || (g % 2), CASE WHEN g % 20 = 0 THEN 'staff' ELSE 'customer' END,
       'user ' || g, 'card-' || g FROM generate_series(1, 60) AS g;
"""
_TARGET = """
CREATE SCHEMA v2;
CREATE TABLE v2.customers (id int PRIMARY KEY, tenant text, name text, card text
                           CHECK (card <> 'card-rejected'));
INSERT INTO v2.customers SELECT id, tenant, name, card FROM users WHERE role = 'customer';
DELETE FROM v2.customers WHERE id IN (3, 33);
INSERT INTO v2.customers VALUES (20, 't0', 'staff 20', 'x'), (500, 't0', 'ghost', 'y');
UPDATE v2.customers SET name = 'renamed' WHERE id = 7;
UPDATE v2.customers SET card = NULL WHERE id = 8;
"""
DIVERGENT = {"[3]", "[33]", "[20]", "[500]", "[7]", "[8]"}
_EXPECTED_EQUALS_TARGET = """
SELECT count(*) FROM (
    (SELECT id, tenant, name, card FROM users WHERE role = 'customer'
     EXCEPT ALL SELECT id, tenant, name, card FROM {target})
    UNION ALL
    (SELECT id, tenant, name, card FROM {target}
     EXCEPT ALL SELECT id, tenant, name, card FROM users WHERE role = 'customer')
) AS diff
"""


def _mapping(**extra: object) -> dict[str, object]:
    return {
        "name": "customers",
        "source": "users",
        "target": "v2.customers",
        "key": ["id"],
        "filter": "role = 'customer'",
        "columns": {"id": "id", "tenant": "tenant", "name": "name", "card": "card"},
        "tenant_column": "tenant",
        **extra,
    }


@pytest.fixture(params=["same_database", "cross_database"])
def seeded(request, db, pg):
    """(source db, target db handle, mapping extras)."""
    db.sql(_SOURCE)
    if request.param == "same_database":
        db.sql(_TARGET)
        yield db, db, {}
        return
    other = pg.create_database()
    try:
        other.sql(_SOURCE + _TARGET)
        yield db, other, {"target_dsn": pg.dsn(other.name, password="")}
    finally:
        other.drop()


async def _scalar(dsn: str, sql: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def _target_fingerprint(target_db) -> str:
    return target_db.scalar(
        "SELECT md5(string_agg(c::text, ',' ORDER BY id)) FROM v2.customers AS c"
    )


async def test_repair_makes_the_next_pass_clean_and_is_recorded(seeded):
    db, target_db, extra = seeded
    config, mappings = await prepare(config_data(db.dsn, [_mapping(**extra)]))
    lines: list[str] = []
    code = await reconcile_command(config, repair=True, by="alice", say=lines.append)
    assert code == 0, lines
    # one record per repaired batch (batches follow the chunks): who, which keys, before/after
    repairs = db.sql(
        "SELECT requested_by, dry_run, k::text, divergent_before, divergent_after, upserted, "
        "deleted FROM dualwrite.repairs, jsonb_array_elements(keys) AS k"
    )
    assert {r[2].replace(" ", "") for r in repairs} == DIVERGENT
    assert {(r[0], r[1]) for r in repairs} == {("alice", False)}
    assert db.sql(
        "SELECT sum(divergent_before), sum(divergent_after), sum(upserted), sum(deleted), "
        "count(DISTINCT run_id) FROM dualwrite.repairs"
    ) == [(6, 0, 4, 2, 1)]
    run = db.sql(
        "SELECT missing, extra, changed, repaired, clean, requested_by FROM "
        "dualwrite.reconcile_runs WHERE kind = 'reconcile'"
    )
    assert run == [(2, 2, 2, 6, False, "alice")]
    if target_db is db:
        assert db.scalar(_EXPECTED_EQUALS_TARGET.format(target="v2.customers")) == 0
    again = await reconcile(config, mappings["customers"])
    assert again.tally.clean
    assert again.tally.compared == 57


async def test_dry_run_changes_nothing_and_records_the_plan(seeded):
    db, target_db, extra = seeded
    config, _ = await prepare(config_data(db.dsn, [_mapping(**extra)]))
    before = _target_fingerprint(target_db)
    lines: list[str] = []
    code = await reconcile_command(config, dry_run=True, by="bob", say=lines.append)
    assert code == 1
    assert _target_fingerprint(target_db) == before
    text = "\n".join(lines)
    assert "would insert v2.customers row: customers [3]: missing" in text
    assert "would delete v2.customers row: customers [500]: extra" in text
    assert "would update v2.customers row: customers [7]: changed (name)" in text
    assert db.sql(
        "SELECT bool_and(dry_run), sum(divergent_before), count(divergent_after), "
        "min(requested_by) FROM dualwrite.repairs"
    ) == [(True, 6, 0, "bob")]
    assert db.sql("SELECT dry_run, repaired FROM dualwrite.reconcile_runs") == [(True, 0)]


async def test_a_row_the_target_rejects_remains_and_the_rest_is_repaired(db):
    db.sql(_SOURCE + _TARGET + "UPDATE users SET card = 'card-rejected' WHERE id = 3;")
    config, mappings = await prepare(config_data(db.dsn, [_mapping()]))
    lines: list[str] = []
    code = await reconcile_command(config, repair=True, say=lines.append)
    assert code == 1
    assert db.sql("SELECT sum(divergent_before), sum(divergent_after) FROM dualwrite.repairs") == [
        (6, 1)
    ]
    again = await reconcile(config, mappings["customers"])
    assert again.tally.counts == {"missing": 1, "extra": 0, "changed": 0}


def test_cli_reconcile_exit_codes_and_summary(db, tmp_path):
    db.sql(_SOURCE + _TARGET)
    path = write_config(tmp_path / "dw.yaml", config_data(db.dsn, [_mapping()]))
    assert run_dualwrite("setup", "--config", str(path)).returncode == 0
    found = run_dualwrite("reconcile", "--config", str(path))
    assert found.returncode == 1, found.stderr
    header = found.stdout.splitlines()[0].split()
    assert header[:3] == ["mapping", "method", "status"]
    assert "divergent" in found.stdout
    tenant = run_dualwrite("reconcile", "--config", str(path), "--tenant", "t1")
    assert tenant.returncode == 1
    repaired = run_dualwrite("reconcile", "--config", str(path), "--repair", "--by", "carol")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    clean = run_dualwrite("reconcile", "--config", str(path), "--mapping", "customers")
    assert clean.returncode == 0
    assert " clean " in clean.stdout
    unknown = run_dualwrite("reconcile", "--config", str(path), "--mapping", "nope")
    assert unknown.returncode == 2
    assert "no mapping named 'nope'" in unknown.stderr
    assert db.scalar("SELECT requested_by FROM dualwrite.repairs") == "carol"
    assert db.scalar("SELECT count(*) FROM dualwrite.reconcile_runs WHERE tenant = 't1'") == 1
