"""Cutover evidence on the POS seed: business invariants checked by ``dualwrite reconcile``,
group by group, recorded, exported and judged by the report."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from support import pos, wait_until
from test_compare_support import config_data, run_dualwrite, write_config

from compare.commands import reconcile_command
from compare.report import charts
from compare.report.history import export_tenant_gauges, tenant_trouble
from core import metrics
from core.config import parse_config
from core.errors import ConfigError
from dualwrite.service import check_live, setup, validated_mappings

DAYS = ("2026-11-30", "2026-12-01", "2026-12-02")
#: the transactions-total example's invariants
DAILY = "transactions_daily_totals"
LINE = "transaction_total_is_line_plus_tax"
TENANT_FK = "transaction_tenant_exists"


def sales(db: Any) -> None:
    """Four sales per tenant per day, with tax; v2 filled as the mapping says (a finished
    backfill), so every invariant holds."""
    for tenant in pos.TENANTS:
        for day in DAYS:
            for n in range(1, 5):
                db.sql(
                    "INSERT INTO transactions (tenant_id, quantity, unit_price, discount, tax, "
                    "created_at) "
                    "VALUES (%s, %s, %s, %s, %s, %s::timestamptz + interval '1 h' * %s)",
                    tenant,
                    n,
                    "9.99",
                    "0.50" if n == 2 else "0",
                    f"{n * 0.8:.2f}",
                    f"{day} 08:00+00",
                    n,
                )
    db.sql(
        "INSERT INTO v2.transactions SELECT id, tenant_id, user_id, product_id, quantity, "
        "unit_price, discount, tax, quantity * unit_price - discount + tax, status, created_at "
        "FROM public.transactions"
    )


def evidence_config(db: Any, *names: str, **sections: Any) -> dict[str, Any]:
    migration = pos.migration(*names)
    data = config_data(db.dsn, migration["mappings"], **sections)
    data["app_role"] = migration["app_role"]
    if "invariants" in migration:
        data["invariants"] = migration["invariants"]
    return data


@pytest.fixture
def seeded(db: Any) -> Any:
    pos.load_schema(db)
    pos.ensure_app_role(db)
    sales(db)
    return db


def failing_groups(invariant: str) -> float | None:
    return REGISTRY.get_sample_value(
        "dualwrite_invariant_failing_groups", {"invariant": invariant}
    )


def reconcile(data: dict[str, Any], **options: Any) -> tuple[int, str]:
    lines: list[str] = []
    code = asyncio.run(
        reconcile_command(parse_config(data), say=lines.append, **options)
    )
    return code, "\n".join(lines)


def run_setup(data: dict[str, Any]) -> None:
    asyncio.run(setup(parse_config(data)))


def test_a_broken_day_of_one_tenant_is_exactly_that_group(seeded: Any, tmp_path: Path) -> None:
    db = seeded
    # small chunks: 9 groups (3 tenants x 3 days) are read 2 at a time
    data = evidence_config(db, "transactions-total")
    for inv in data["mappings"][0]["invariants"]:
        inv["chunk_groups"] = 2
    run_setup(data)

    code, out = reconcile(data)
    assert code == 0, out
    assert "held" in out
    assert "BROKEN" not in out
    assert failing_groups(DAILY) == 0
    checked = db.sql(
        "SELECT invariant, status, groups_checked, groups_failed FROM dualwrite.invariant_runs "
        "ORDER BY id"
    )
    assert checked == [(DAILY, "done", 9, 0), (LINE, "done", 0, 0), (TENANT_FK, "done", 0, 0)]

    # tenant 2's till recorded one sale's tax twice on 1 December, in v2 only: the stored
    # total still equals line + tax (the row rule holds), the day's takings do not
    db.sql(
        "UPDATE v2.transactions SET tax = tax * 2, total_amount = total_amount + tax "
        "WHERE id = (SELECT min(id) FROM v2.transactions WHERE tenant_id = 2 "
        "AND (created_at AT TIME ZONE 'UTC')::date = '2026-12-01')"
    )
    code, out = reconcile(data)
    assert code == 1, out
    assert "BROKEN" in out
    assert "tenant_id=2, day=2026-12-01" in out
    assert failing_groups(DAILY) == 1
    assert failing_groups(LINE) == 0
    failures = db.sql(
        "SELECT f.grp::text, f.tenant, f.old_values::text, f.new_values::text "
        "FROM dualwrite.invariant_failures f JOIN dualwrite.invariant_runs r ON r.id = f.run_id "
        "WHERE r.id = (SELECT max(id) FROM dualwrite.invariant_runs WHERE invariant = %s)",
        DAILY,
    )
    assert failures == [
        (
            '{"day": "2026-12-01", "tenant_id": 2}',
            "2",
            '[4, "107.40", "8.00"]',
            '[4, "108.20", "8.80"]',
        )
    ]

    # the report: the mapping is NO-GO on that invariant alone, naming the group
    path = write_config(tmp_path / "dw.yaml", {**data, "report": {"criteria": {
        "clean_window_hours": 0, "require_backfill_complete": False}}})
    done = run_dualwrite("report", "--config", str(path), "--format", "json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    mapping = report["mappings"][0]
    failed = {c["name"] for c in mapping["criteria"] if not c["passed"]}
    # the pass found the changed row too; the invariant is its own criterion
    assert f"invariant:{DAILY}" in failed
    assert f"invariant:{LINE}" not in failed
    daily = next(i for i in report["invariants"] if i["name"] == DAILY)
    assert daily["groups_failed"] == 1
    assert daily["failures"][0]["group"] == {"tenant_id": 2, "day": "2026-12-01"}
    markdown = run_dualwrite("report", "--config", str(path), "--format", "md").stdout
    assert "## Business invariants" in markdown
    assert (
        f"| {DAILY} | tenant_id=2, day=2026-12-01 | sales, total, tax | 4, 107.40, 8.00 "
        "| 4, 108.20, 8.80 |"
    ) in markdown


def test_new_only_invariants_find_orphans_and_wrong_totals(seeded: Any) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    run_setup(data)
    db.sql("INSERT INTO tenants (id, name) VALUES (9, 'Closed store')")
    db.sql(
        "INSERT INTO v2.transactions (id, tenant_id, quantity, unit_price, discount, tax, "
        "total_amount, status, created_at) VALUES "
        "(9001, 9, 1, 1, 0, 0, 1, 'completed', '2026-12-01'), "
        "(9002, 1, 1, 1, 0, 0, 5, 'completed', '2026-12-01')"
    )
    db.sql("DELETE FROM tenants WHERE id = 9")
    code, out = reconcile(data)
    assert code == 1, out
    runs = dict(
        db.sql(
            "SELECT invariant, groups_failed FROM dualwrite.invariant_runs WHERE status = 'done'"
        )
    )
    assert runs == {DAILY: 2, LINE: 1, TENANT_FK: 1}
    groups = db.sql(
        "SELECT invariant, grp::text FROM dualwrite.invariant_failures ORDER BY invariant, grp"
    )
    assert (LINE, '{"id": 9002, "tenant_id": 1}') in groups
    assert (TENANT_FK, '{"id": 9001, "tenant_id": 9}') in groups


def test_inventory_and_user_split_invariants_hold_then_catch_a_loss(db: Any) -> None:
    pos.load_schema(db)
    pos.ensure_app_role(db)
    db.sql(
        "INSERT INTO products (tenant_id, sku, name, price) "
        "SELECT 1 + g % 3, 'sku-' || g, 'product ' || g, 5 FROM generate_series(1, 6) g"
    )
    db.sql(
        "INSERT INTO inventory (product_id, store_code, tenant_id, on_hand, reserved) "
        "SELECT p.id, s, p.tenant_id, 10 + p.id, 3 FROM products p, "
        "unnest(ARRAY['n1', 's2']) s"
    )
    db.sql(
        "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
        "SELECT 1 + g % 3, 'u' || g || '@x', 'F', 'L', (ARRAY['customer', 'employee', "
        "'manager'])[1 + g % 3] FROM generate_series(1, 12) g"
    )
    db.sql(
        "INSERT INTO v2.stock_levels SELECT product_id, upper(store_code), tenant_id, on_hand, "
        "greatest(on_hand - reserved, 0) FROM inventory;"
        "INSERT INTO v2.customers SELECT id, tenant_id, email, first_name || ' ' || last_name, "
        "phone, created_at FROM users WHERE role = 'customer';"
        "INSERT INTO v2.employees SELECT id, tenant_id, email, first_name || ' ' || last_name, "
        "role = 'manager', created_at FROM users WHERE role <> 'customer'"
    )
    data = evidence_config(db, "inventory-normalization", "split-users")
    run_setup(data)
    code, out = reconcile(data)
    assert code == 0, out
    for name in (
        "inventory_conserved",
        "available_within_on_hand",
        "users_split_per_tenant",
        "user_in_exactly_one_target",
    ):
        assert failing_groups(name) == 0, name

    lost = db.scalar("SELECT min(id) FROM v2.employees")
    db.sql("DELETE FROM v2.employees WHERE id = %s", lost)
    db.sql("UPDATE v2.stock_levels SET on_hand = on_hand + 1 WHERE store = 'S2'")
    code, out = reconcile(data)
    assert code == 1
    assert failing_groups("users_split_per_tenant") == 1
    assert failing_groups("user_in_exactly_one_target") == 1
    assert failing_groups("inventory_conserved") == 6
    assert failing_groups("available_within_on_hand") == 0


def test_reconcile_for_one_tenant_checks_only_that_tenants_groups(seeded: Any) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    run_setup(data)
    db.sql("UPDATE v2.transactions SET tax = tax + 1, total_amount = total_amount + 1 "
           "WHERE tenant_id = 3")
    code, _ = reconcile(data, tenant="1")
    assert code == 0
    assert db.sql(
        "SELECT tenant, groups_checked, groups_failed FROM dualwrite.invariant_runs "
        "WHERE invariant = %s", DAILY
    ) == [("1", 3, 0)]
    code, _ = reconcile(data, tenant="3")
    assert code == 1


def test_a_check_that_times_out_is_failed_not_held(seeded: Any) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    slow = data["mappings"][0]["invariants"][0]
    slow["new"] = slow["new"].replace("FROM v2.transactions", "FROM v2.transactions, "
                                      "LATERAL (SELECT pg_sleep(0.2)) AS s")
    slow["statement_timeout_ms"] = 100
    run_setup(data)
    code, out = reconcile(data)
    assert code == 1
    assert "could not be checked" in out
    assert "statement timeout" in out
    assert db.scalar(
        "SELECT status FROM dualwrite.invariant_runs WHERE invariant = %s", DAILY
    ) == "failed"


@pytest.mark.parametrize(
    ("invariant", "path", "reason"),
    [
        ({"group": ["t"], "new": "SELECT 1 AS t"}, "invariants[0]",
         "kind compare needs an old query"),
        ({"group": ["t"], "kind": "new_only", "old": "SELECT 1 AS t", "new": "SELECT 1 AS t"},
         "invariants[0]", "remove old"),
        ({"group": ["t"], "old": "SELECT 1 AS t", "new": "DELETE FROM x"},
         "invariants[0].new", "exactly one SELECT"),
        ({"group": ["t"], "tenant": "x", "old": "SELECT 1 AS t", "new": "SELECT 1 AS t"},
         "invariants[0]", "not one of the group columns"),
    ],
)
def test_bad_invariants_are_rejected_at_load_with_their_path(
    invariant: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"invariants": [{"name": "rule", **invariant}]})
    assert caught.value.path == path
    assert reason in caught.value.reason


def test_check_prepares_every_invariant_and_names_a_bad_one(seeded: Any) -> None:
    data = evidence_config(seeded, "transactions-total")
    run_setup(data)
    lines = asyncio.run(check_live(parse_config(data)))
    assert f"invariant {DAILY} (compare, transactions): ok" in lines
    data["mappings"][0]["invariants"][0]["new"] = "SELECT tenant_id, 1 AS n FROM v2.nothing"
    with pytest.raises(ConfigError) as caught:
        asyncio.run(check_live(parse_config(data)))
    assert caught.value.path == f"invariants[{DAILY}].new"
    assert "v2.nothing" in caught.value.reason


# --- repairs on the record ---------------------------------------------------------------------


def test_a_repair_keeps_who_when_why_and_redacted_row_images(seeded: Any, tmp_path: Path) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    data["mappings"][0]["compare"] = {"reveal_columns": ["id", "tenant_id", "tax"]}
    run_setup(data)
    first, second, third = (r[0] for r in db.sql("SELECT id FROM v2.transactions ORDER BY id")[:3])
    db.sql("DELETE FROM v2.transactions WHERE id = %s", first)
    db.sql("UPDATE v2.transactions SET tax = tax + 1, total_amount = total_amount + 1 "
           "WHERE id = %s", second)
    db.sql(
        "INSERT INTO v2.transactions SELECT id + 100000, tenant_id, user_id, product_id, "
        "quantity, unit_price, discount, tax, total_amount, status, created_at "
        "FROM v2.transactions WHERE id = %s", third
    )
    code, out = reconcile(data, repair=True, by="alice", reason="INC-42: till outage replay")
    assert code == 0, out
    # one record per repaired batch (the keys were found in different chunks)
    records = db.sql(
        "SELECT requested_by, reason, jsonb_array_length(keys), upserted, deleted, images::text "
        "FROM dualwrite.repairs"
    )
    assert {(who, why) for who, why, *_ in records} == {("alice", "INC-42: till outage replay")}
    assert [sum(r[i] for r in records) for i in (2, 3, 4)] == [3, 2, 1]
    by_key = {tuple(i["key"]): i for r in records for i in json.loads(r[5])}
    missing, changed, extra = by_key[(first,)], by_key[(second,)], by_key[(third + 100000,)]
    assert missing["class"] == "missing"
    assert missing["before"] is None
    assert missing["after"]["id"] == first
    assert changed["class"] == "changed"
    assert Decimal(str(changed["before"]["tax"])) == Decimal(str(changed["after"]["tax"])) + 1
    # columns not in reveal_columns never reach the record
    assert changed["before"]["total_amount"] == "<redacted>"
    assert extra["class"] == "extra"
    assert extra["after"] is None

    path = write_config(tmp_path / "dw.yaml", data)
    listed = run_dualwrite("repairs", "--config", str(path), "--since", "1h", "--images")
    assert listed.returncode == 0, listed.stderr
    assert "INC-42: till outage replay" in listed.stdout
    assert "alice" in listed.stdout
    assert f"[{first}] missing: (no row) -> " in listed.stdout
    assert f"[{third + 100000}] extra: " in listed.stdout
    as_json = run_dualwrite("repairs", "--config", str(path), "--format", "json")
    assert json.loads(as_json.stdout)[0]["reason"] == "INC-42: till outage replay"


def test_a_repair_inside_the_window_restarts_it(db: Any, tmp_path: Path) -> None:
    db.sql("CREATE TABLE users (id int PRIMARY KEY, email text); CREATE SCHEMA v2; "
           "CREATE TABLE v2.customers (id int PRIMARY KEY, email text)")
    mapping = {"name": "customers", "source": "public.users", "target": "v2.customers",
               "key": ["id"], "columns": {"id": "id", "email": "email"}}
    data = config_data(db.dsn, [mapping], report={"criteria": {"clean_window_hours": 24}})
    run_setup(data)
    for hours_ago in range(30):  # a clean pass every hour for 30 hours
        db.sql(
            "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, started_at, "
            "finished_at, clean) VALUES ('customers', 'reconcile', 'done', "
            "now() - make_interval(mins => %s * 60 + 20), now() - make_interval(mins => %s * 60 "
            "+ 10), true)", hours_ago, hours_ago,
        )
    db.sql("INSERT INTO dualwrite.backfill_state (mapping, status) VALUES ('customers', 'done')")
    path = write_config(tmp_path / "dw.yaml", data)

    def clean_window() -> tuple[int, dict[str, Any], dict[str, Any]]:
        done = run_dualwrite("report", "--config", str(path), "--format", "json")
        mapping_report = json.loads(done.stdout)["mappings"][0]
        criterion = next(c for c in mapping_report["criteria"] if c["name"] == "clean_window")
        return done.returncode, criterion, mapping_report

    code, criterion, _ = clean_window()
    assert code == 0
    assert criterion["passed"]
    # three hours ago someone repaired 5 rows (and nothing found divergence since)
    db.sql(
        "INSERT INTO dualwrite.repairs (mapping, requested_by, reason, at, dry_run, keys, "
        "divergent_before, divergent_after, upserted, deleted) VALUES ('customers', 'bob', "
        "'backfill gap', now() - interval '3 hours', false, '[[1], [2], [3], [4], [5]]', 5, 0, "
        "5, 0)"
    )
    code, criterion, mapping_report = clean_window()
    assert code == 1
    assert not criterion["passed"]
    assert criterion["measured"] < 3
    assert "repair #" in criterion["detail"]
    assert "by bob wrote 5 rows (backfill gap); a repair restarts the window" in (
        criterion["detail"]
    )
    assert [(r["requested_by"], r["upserted"]) for r in mapping_report["repairs"]] == [("bob", 5)]
    markdown = run_dualwrite("report", "--config", str(path)).stdout
    assert "| bob | backfill gap | 5 | 5 | 0 | 0 |" in markdown
    # a dry run writes nothing: it neither restarts the window nor shows as a repair
    db.sql("DELETE FROM dualwrite.repairs")
    db.sql(
        "INSERT INTO dualwrite.repairs (mapping, requested_by, at, dry_run, keys, "
        "divergent_before, upserted, deleted) VALUES ('customers', 'bob', now(), true, "
        "'[[1]]', 1, 1, 0)"
    )
    code, criterion, mapping_report = clean_window()
    assert code == 0
    assert mapping_report["repairs"] == []


# --- per tenant ----------------------------------------------------------------------------------


def test_one_tenant_is_go_while_another_is_no_go(seeded: Any, tmp_path: Path) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    data["report"] = {
        "criteria": {"clean_window_hours": 0, "require_backfill_complete": False},
        "tenants": ["1", "2", "3"],
    }
    run_setup(data)
    # tenant 2: one sale's tax recorded twice in v2 (a changed row, and its day's totals);
    # tenant 3: a key the target keeps rejecting
    db.sql(
        "UPDATE v2.transactions SET tax = tax * 2, total_amount = total_amount + tax "
        "WHERE id = (SELECT min(id) FROM v2.transactions WHERE tenant_id = 2)"
    )
    rejected = db.scalar("SELECT max(id) FROM transactions WHERE tenant_id = 3")
    db.sql("DELETE FROM v2.transactions WHERE id = %s", rejected)
    db.sql(
        "INSERT INTO dualwrite.dead_letters (mapping, key, error, sqlstate) "
        "VALUES ('transactions', jsonb_build_array(%s::bigint), 'check violation', '23514')",
        rejected,
    )
    code, out = reconcile(data)
    assert code == 1, out
    # the pass met the dead-lettered key: not clean, but not tenant 1's business
    assert db.scalar(
        "SELECT dead_lettered FROM dualwrite.reconcile_runs ORDER BY id DESC LIMIT 1"
    ) == 1
    path = write_config(tmp_path / "dw.yaml", data)

    def report(*args: str) -> tuple[int, dict[str, Any]]:
        done = run_dualwrite("report", "--config", str(path), "--format", "json", *args)
        assert done.returncode in (0, 1), done.stderr
        return done.returncode, json.loads(done.stdout)

    code, whole = report()
    assert code == 1
    tenants = {t["tenant"]: t for t in whole["tenants"]}
    assert [t["tenant"] for t in whole["tenants"]] == ["2", "3", "1"]  # NO-GO, worst first
    assert tenants["1"]["verdict"] == "GO"
    assert tenants["2"]["verdict"] == "NO-GO"
    assert tenants["2"]["divergent"] == {"missing": 0, "extra": 0, "changed": 1}
    assert tenants["2"]["invariant_failures"] == 1
    assert set(tenants["2"]["failing"]) == {
        "transactions:clean_window", f"invariant:{DAILY}"
    }
    assert tenants["3"]["dead_letters"] == 1
    # its lost sale also breaks its day's totals; its clean window holds (the key is dead
    # lettered, judged by the dead-letters criterion)
    assert set(tenants["3"]["failing"]) == {
        "transactions:dead_letters", f"invariant:{DAILY}"
    }

    assert report("--tenant", "1")[0] == 0
    code, focused = report("--tenant", "2")
    assert code == 1
    assert focused["tenant"] == "2"
    assert report("--tenant", "3")[0] == 1
    markdown = run_dualwrite("report", "--config", str(path), "--tenant", "1").stdout
    assert "**Tenant 1: GO** (the exit status follows it)." in markdown
    assert "| 2 | **NO-GO** | 0 | 0 | 1 | 0 | 1 |" in markdown


def test_report_for_a_tenant_needs_a_tenant_column(db: Any, tmp_path: Path) -> None:
    db.sql("CREATE TABLE users (id int PRIMARY KEY); CREATE SCHEMA v2; "
           "CREATE TABLE v2.users (id int PRIMARY KEY)")
    data = config_data(db.dsn, [{"name": "users", "source": "public.users",
                                 "target": "v2.users", "key": ["id"], "columns": {"id": "id"}}])
    run_setup(data)
    path = write_config(tmp_path / "dw.yaml", data)
    done = run_dualwrite("report", "--config", str(path), "--tenant", "1")
    assert done.returncode == 2
    assert "--tenant: no mapping has a tenant_column" in done.stderr


def tenant_series() -> dict[str, float]:
    return {
        s.labels["tenant"]: s.value
        for family in REGISTRY.collect()
        if family.name == "dualwrite_worst_tenant_trouble"
        for s in family.samples
    }


def test_tenant_metrics_are_a_capped_label_set(seeded: Any) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    run_setup(data)
    db.sql("UPDATE v2.transactions SET tax = tax + 1, total_amount = total_amount + 1 "
           "WHERE tenant_id = 2")
    assert reconcile(data)[0] == 1
    config = parse_config(data)
    compiled = [m for m in asyncio.run(_bound(config)) if m.config.tenant_column]

    async def trouble() -> dict[str, int]:
        conn = await asyncpg.connect(db.dsn)
        try:
            return await tenant_trouble(conn, compiled, [DAILY, LINE, TENANT_FK])
        finally:
            await conn.close()

    found = asyncio.run(trouble())
    # 12 changed rows of tenant 2, and its 3 days' totals
    assert found == {"2": 12 + 3}
    export_tenant_gauges(found, ["1", "2", "3"])
    assert REGISTRY.get_sample_value("dualwrite_tenants", {"verdict": "no_go"}) == 1
    assert REGISTRY.get_sample_value("dualwrite_tenants", {"verdict": "go"}) == 2
    assert tenant_series() == {"2": 15}
    # however many tenants have trouble, at most WORST_TENANTS_MAX are named, worst first
    many = {f"t{i:02d}": i for i in range(1, 40)}
    export_tenant_gauges(many, [])
    assert metrics.WORST_TENANTS_MAX == 5
    assert tenant_series() == {f"t{i}": i for i in range(35, 40)}
    assert REGISTRY.get_sample_value("dualwrite_tenants", {"verdict": "no_go"}) == 39
    export_tenant_gauges({}, [])
    assert tenant_series() == {}


async def _bound(config: Any) -> list[Any]:
    conn = await asyncpg.connect(config.service_dsn)
    try:
        return list(await validated_mappings(conn, config))
    finally:
        await conn.close()


# --- report honesty ------------------------------------------------------------------------------


def test_relaxed_criteria_are_flagged_and_every_setting_shows_its_default(
    db: Any, tmp_path: Path
) -> None:
    db.sql("CREATE TABLE users (id int PRIMARY KEY); CREATE SCHEMA v2; "
           "CREATE TABLE v2.users (id int PRIMARY KEY)")
    mapping = {"name": "users", "source": "public.users", "target": "v2.users", "key": ["id"],
               "columns": {"id": "id"}}
    demo = config_data(db.dsn, [mapping], report={"criteria": {"clean_window_hours": 0}})
    run_setup(demo)
    code, _ = reconcile(demo)
    assert code == 0
    path = write_config(tmp_path / "demo.yaml", demo)
    markdown = run_dualwrite("report", "--config", str(path)).stdout
    assert "> **Relaxed criteria:** clean window 0 h (production default 24 h)." in markdown
    assert "| clean_window_hours | **0 h** | 24 h |" in markdown
    assert "| max_dead_letters | 0 | 0 |" in markdown
    # the wording agrees with its numbers
    assert "(1 pass)" in markdown
    assert "1 passes" not in markdown
    html = run_dualwrite("report", "--config", str(path), "--format", "html").stdout
    assert '<div class="relaxed" role="note"><b>Relaxed criteria:</b> clean window 0 h ' in html
    as_json = json.loads(
        run_dualwrite("report", "--config", str(path), "--format", "json").stdout
    )
    assert as_json["relaxed_criteria"] == ["clean window 0 h (production default 24 h)"]

    strict = write_config(tmp_path / "prod.yaml", config_data(db.dsn, [mapping]))
    assert "Relaxed criteria" not in run_dualwrite("report", "--config", str(strict)).stdout


def axis(svg: str, y: str) -> list[tuple[str, str]]:
    """(x, label) of the text elements on the time axis at height ``y``."""
    return re.findall(rf'<text x="([0-9.]+)" y="{y}"[^>]*>([^<]+)</text>', svg)


def test_every_chart_of_a_page_has_the_same_time_axis() -> None:
    bucket = timedelta(minutes=30)
    first = datetime(2026, 12, 3, 12, 30, tzinfo=UTC)
    starts = [first + bucket * i for i in range(48)]
    now = starts[-1] + timedelta(minutes=7)
    bars = charts.bar_chart(starts, bucket, [charts.Series("rows", "#000", [1.0] * 48)],
                            label="bars")
    timeline = charts.pass_timeline(
        [(now - timedelta(hours=2), now - timedelta(hours=1), "clean")],
        starts[0],
        starts[-1] + bucket,
        streak=None,
        required=timedelta(hours=24),
        label="passes",
        now=now,
        ticks=charts.axis_ticks(starts),
    )
    bar_axis = axis(bars, f"{charts.HEIGHT - 6:.1f}")
    assert len(bar_axis) == 8
    assert bar_axis[0] == (f"{charts.LEFT:.1f}", "03 Dec 12:30")
    assert axis(timeline, "97.0") == bar_axis


def test_the_sidecar_checks_invariants_after_its_continuous_passes(seeded: Any, sidecar) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    run_setup(data)
    handle = sidecar({
        "mappings": data["mappings"],
        "reconcile": {"interval_seconds": 0.3, "recheck_delay_seconds": 0},
    })
    runs = wait_until(
        lambda: db.sql(
            "SELECT invariant, requested_by, groups_checked FROM dualwrite.invariant_runs "
            "WHERE status = 'done' AND invariant = %s", DAILY
        )[1:],
        30,
        "two continuous invariant checks",
    )
    assert {(r[1], r[2]) for r in runs} == {
        (f"continuous:{handle.sidecar.recorder.sidecar}", 9)
    }
    # the sidecar's /metrics reads the latest check from the control schema
    text = handle.http("/metrics")[1]
    assert f'dualwrite_invariant_failing_groups{{invariant="{DAILY}"}} 0.0' in text


def test_a_criterion_no_tenant_can_be_told_apart_in_counts_for_every_tenant(
    seeded: Any, tmp_path: Path
) -> None:
    db = seeded
    data = evidence_config(db, "transactions-total")
    data["report"] = {
        "criteria": {"clean_window_hours": 0, "require_backfill_complete": False},
        "tenants": ["1", "2"],
    }
    run_setup(data)
    assert reconcile(data)[0] == 0
    # a paused mapping is mirrored for no tenant
    db.sql("INSERT INTO dualwrite.mapping_state (mapping, paused) VALUES ('transactions', true)")
    path = write_config(tmp_path / "dw.yaml", data)
    done = run_dualwrite("report", "--config", str(path), "--format", "json", "--tenant", "1")
    assert done.returncode == 1
    for tenant in json.loads(done.stdout)["tenants"]:
        assert tenant["failing"] == ["transactions:mirroring_active"], tenant
