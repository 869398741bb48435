"""/metrics of a running sidecar: every name the dashboard and the alert rules use exists, and
client input (application_name, user, database) never becomes a label."""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until

from core.config import parse_config
from dualwrite.service import setup

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
MAPPING = "items"
METRIC_NAME = re.compile(r"\bdualwrite_[a-z0-9_]+\b")
#: the names a family of each type is exposed under (prometheus-client, *_created disabled)
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "gauge": ("",),
    "unknown": ("",),
}


def mapping_config() -> dict[str, Any]:
    return {
        "name": MAPPING,
        "source": "public.items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "name": "name"},
    }


def prepare(db: Any, app_role: str | None = None) -> None:
    db.sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, name text)"
    )
    data: dict[str, Any] = {"service_dsn": db.dsn, "mappings": [mapping_config()]}
    if app_role:
        data["app_role"] = app_role
    asyncio.run(setup(parse_config(data)))


def exposed_names(text: str) -> set[str]:
    """Every sample name a /metrics body can contain, declared or seen."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


# --- names -----------------------------------------------------------------------------------


def test_every_metric_the_dashboard_and_rules_use_is_exported(db, sidecar):
    prepare(db)
    db.sql(
        "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, finished_at, clean)"
        " VALUES (%s, 'reconcile', 'done', now(), true)",
        MAPPING,
    )
    db.sql(
        "INSERT INTO dualwrite.backfill_state (mapping, status, rows_done) VALUES (%s, 'done', 3)",
        MAPPING,
    )
    handle = sidecar({"mappings": [mapping_config()]})
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items VALUES (1, 'a')")
    text = handle.http("/metrics")[1]
    exported = exposed_names(text)
    used = {name for expr in dashboard_exprs() + rule_exprs() for name in METRIC_NAME.findall(expr)}
    assert len(used) >= 15  # the test reads the files it means to
    assert used - exported == set()
    # the gauges read from the control schema carry this mapping's values
    assert f'dualwrite_backfill_complete{{mapping="{MAPPING}"}} 1.0' in text
    assert f'dualwrite_last_pass_divergent_rows{{class="missing",mapping="{MAPPING}"}} 0.0' in text


def test_a_renamed_metric_would_be_caught():
    exported = exposed_names(
        "# HELP dualwrite_a_total x\n# TYPE dualwrite_a_total counter\n"
        "# HELP dualwrite_b_seconds x\n# TYPE dualwrite_b_seconds histogram\n"
    )
    expected = {"dualwrite_a_total", "dualwrite_b_seconds_bucket", "dualwrite_b_seconds_count"}
    assert expected <= exported
    assert "dualwrite_renamed_total" not in exported
    assert "dualwrite_b_seconds_total" not in exported


# --- cardinality -------------------------------------------------------------------------------

USERS = 400
CONNECTIONS = 2400
WARMUP = 300
PARALLEL = 12


def random_name(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + " -_.:/{}\"'=,é漢"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))


async def connect_once(
    port: int, dbname: str, user: str, app: str, write_id: int | None
) -> None:
    try:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=user, database=dbname,
            server_settings={"application_name": app}, timeout=30, ssl=False,
        )
    except (asyncpg.PostgresError, OSError):
        return  # unknown database or role: the server refuses, the proxy relays it
    try:
        await conn.fetchval("SELECT 1")
        if write_id is not None:
            await conn.execute(
                "INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = $2",
                write_id, app,
            )
    finally:
        await conn.close()


async def connection_storm(
    port: int, dbname: str, users: list[str], count: int, seed: int
) -> list[str]:
    """``count`` connections with random application_names, users and some bad databases or
    roles; returns the application names used."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(PARALLEL)
    names: list[str] = []

    async def one(i: int) -> None:
        app = random_name(rng)[:63]
        names.append(app)
        kind = i % 10
        database = f"nodb_{uuid.uuid4().hex[:8]}" if kind == 0 else dbname
        user = f"norole_{uuid.uuid4().hex[:8]}" if kind == 1 else rng.choice(users)
        async with gate:
            await connect_once(port, database, user, app, i if kind < 5 else None)

    await asyncio.gather(*(one(i) for i in range(count)))
    return names


@pytest.fixture
def many_users(pg, db):
    """USERS login roles (trust auth) in one group that `dualwrite setup` grants mirroring to."""
    prefix = f"dwcard_{uuid.uuid4().hex[:6]}"
    group = f"{prefix}_app"
    users = [f"{prefix}_{i}_{uuid.uuid4().hex[:4]}" for i in range(USERS)]
    pg.sql(f'CREATE ROLE "{group}"')
    pg.sql(
        "DO $$ DECLARE name text; BEGIN"
        f" FOREACH name IN ARRAY '{{{','.join(users)}}}'::text[] LOOP"
        f" EXECUTE format('CREATE ROLE %I LOGIN IN ROLE {group}', name);"
        " END LOOP; END $$"
    )
    try:
        yield group, users
    finally:
        db.sql(f'DROP OWNED BY "{group}"')  # its grants in the test database
        db.close()
        pg.sql(
            "DO $$ DECLARE r text; BEGIN FOR r IN SELECT rolname FROM pg_roles"
            f" WHERE rolname LIKE '{prefix}%' ORDER BY rolname = '{group}'"
            " LOOP EXECUTE format('DROP ROLE %I', r); END LOOP; END $$"
        )


def test_series_do_not_grow_with_client_names_users_or_databases(db, sidecar, many_users):
    group, users = many_users
    prepare(db, app_role=group)
    db.sql(f'GRANT SELECT, INSERT, UPDATE ON items TO "{group}"')
    handle = sidecar({"mappings": [mapping_config()]})

    def drained() -> bool:
        return db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0

    asyncio.run(connection_storm(handle.port, db.name, users, WARMUP, seed=1))
    wait_until(drained, 30, "the applier to drain the outbox")
    before = handle.http("/metrics")[1]

    names = asyncio.run(connection_storm(handle.port, db.name, users, CONNECTIONS, seed=2))
    wait_until(drained, 30, "the applier to drain the outbox")
    after = handle.http("/metrics")[1]

    assert len(set(names)) > CONNECTIONS * 0.9  # the names really were distinct
    # traffic flowed: connections i with i % 10 in (2, 3, 4) wrote row i, and all were mirrored
    assert db.scalar("SELECT count(*) FROM v2.items") == CONNECTIONS * 3 // 10
    assert series(after) == series(before)
    accepted = re.search(r"^dualwrite_client_connections_accepted_total (\S+)$", after, re.M)
    assert accepted is not None
    assert float(accepted.group(1)) >= CONNECTIONS + WARMUP
    for client_value in [*names[:500], *users[:100]]:
        assert f'"{client_value}"' not in after
