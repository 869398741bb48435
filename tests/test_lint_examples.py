"""The example migrations in config/migrations/: they lint clean, they really run (twice) against
the seed schema with psql and give the mappings what they need, their contract steps are clean
with evidence and caught without it; and a deliberately bad version of each is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import Database, run_psql
from support.lint import lint_text, record_traffic, rules_of, run_cli, write_config
from support.pos import MIGRATIONS, ROOT, migration, run_setup

EXAMPLES = ROOT / "config" / "migrations"
BAD = ROOT / "tests" / "cases" / "lint"
V1 = ROOT / "dualwrite" / "demo" / "pos_v1.sql"
#: what each migration's contract step drops (the mapping's source)
OLD_TABLES = {
    "split-users": "users",
    "tier-pricing": "products",
    "transactions-total": "transactions",
    "inventory-normalization": "inventory",
    "audit-log-rls": "audit_log",
}
#: the rules each deliberately bad script must be caught by (offline)
CAUGHT = {
    "split-users.expand": {
        "template-header",
        "template-idempotent",
        "lock-timeout-missing",
        "require-concurrent-index-creation",
        "template-validation",
    },
    "split-users.contract": {"template-idempotent", "lock-timeout-missing", "template-validation"},
    "tier-pricing.expand": {
        "adding-required-field",
        "constraint-missing-not-valid",
        "template-idempotent",
        "template-validation",
    },
    "tier-pricing.contract": {"expand-contract-mixed", "renaming-table", "template-idempotent"},
    "transactions-total.expand": {
        "adding-field-with-default",
        "backfill-in-ddl-transaction",
        "concurrently-in-transaction",
        "unbatched-backfill",
    },
    "transactions-total.contract": {"lock-timeout-missing"},
    "inventory-normalization.expand": {
        "changing-column-type",
        "renaming-column",
        "adding-auto-increment-column",
        "expand-contract-mixed",
    },
    "inventory-normalization.contract": {"expand-contract-mixed"},
    "audit-log-rls.expand": {"expand-contract-mixed", "template-idempotent", "prefer-jsonb"},
    "audit-log-rls.contract": {"ban-truncate-cascade", "template-validation"},
}


def example(name: str, step: str) -> Path:
    return EXAMPLES / f"{name}.{step}.sql"


def test_there_is_an_expand_and_a_contract_script_per_migration() -> None:
    shipped = {p.name for p in EXAMPLES.glob("*.sql")}
    assert shipped == {f"{m}.{s}.sql" for m in MIGRATIONS for s in ("expand", "contract")}
    assert {p.name.removesuffix(".bad.sql") for p in BAD.glob("*.bad.sql")} == set(CAUGHT)
    assert set(CAUGHT) == {f"{m}.{s}" for m in MIGRATIONS for s in ("expand", "contract")}


def test_every_example_lints_clean_offline_but_for_the_drop_warnings() -> None:
    paths = sorted(str(p) for p in EXAMPLES.glob("*.sql"))
    code, out, _ = run_cli(*paths, "--format", "json")
    assert code == 0
    findings = json.loads(out)["findings"]
    # without --live nothing shows that the old tables are unused: that, and only that, is said
    assert {(f["rule"], Path(f["path"]).name) for f in findings} == {
        ("ban-drop-table", f"{m}.contract.sql") for m in MIGRATIONS
    }


@pytest.mark.parametrize("name", sorted(CAUGHT))
def test_the_bad_version_is_caught(name: str, tmp_path: Path) -> None:
    text = (BAD / f"{name}.bad.sql").read_text()
    findings = lint_text(tmp_path, text, name=f"{name}.sql")
    missing = CAUGHT[name] - rules_of(findings)
    assert not missing, [f"{f.rule}: {f.message}" for f in findings]
    assert any(f.severity == "error" for f in findings)
    code, _, _ = run_cli(str(BAD / f"{name}.bad.sql"))
    assert code == 1


def test_the_examples_run_twice_then_the_contracts_are_clean_with_evidence(
    db: Database, tmp_path: Path
) -> None:
    db.sql(V1.read_text())
    db.sql("INSERT INTO tenants (id, name) VALUES (1, 'Store group 1')")
    for name in MIGRATIONS:
        for _ in range(2):  # re-runnable, as the template demands
            done = run_psql(db.dsn, example(name, "expand"), "-v", "ON_ERROR_STOP=1")
            assert done.returncode == 0, (name, done.stderr)
    # the expand steps made everything the mappings need (setup validates every mapping)
    run_setup(db, migration())
    # the application now runs on v2 only; the sidecars recorded a week of it
    record_traffic(
        db,
        [
            "SELECT full_name, email FROM v2.customers WHERE id = $1",
            "INSERT INTO v2.transactions (id, tenant_id, quantity, unit_price, discount, "
            "total_amount, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, now())",
        ],
    )
    contracts = [str(example(name, "contract")) for name in MIGRATIONS]
    after_cutover = write_config(tmp_path / "after.yaml", {"service_dsn": db.dsn})
    code, out, _ = run_cli(*contracts, "--config", str(after_cutover), "--live")
    assert code == 0, out
    assert "0 errors, 0 warnings" in out, out
    assert out.count("[traffic-unreferenced]") == len(MIGRATIONS)
    # with the mappings still configured, every contract step is refused
    during = write_config(tmp_path / "during.yaml", {"service_dsn": db.dsn, **migration()})
    code, out, _ = run_cli(*contracts, "--config", str(during), "--live")
    assert code == 1
    for name in MIGRATIONS:
        assert f"{name}.contract.sql" in out
    assert out.count("[mapping-still-uses]") >= len(MIGRATIONS)
    # the contract steps run, twice
    for name in MIGRATIONS:
        for _ in range(2):
            done = run_psql(db.dsn, example(name, "contract"), "-v", "ON_ERROR_STOP=1")
            assert done.returncode == 0, (name, done.stderr)
    left = db.sql(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace "
        "AND relkind = 'r' AND relname = ANY(%s)",
        list(OLD_TABLES.values()),
    )
    assert left == []


def test_a_contract_whose_old_table_is_still_used_is_refused(db: Database, tmp_path: Path) -> None:
    db.sql(V1.read_text())
    record_traffic(db, ["SELECT sku, price FROM products WHERE tenant_id = $1"])
    config = write_config(tmp_path / "c.yaml", {"service_dsn": db.dsn})
    code, out, _ = run_cli(
        str(example("tier-pricing", "contract")), "--config", str(config), "--live"
    )
    assert code == 1
    assert "[traffic-still-references] drops public.products" in out
    assert "[traffic-unreferenced]" not in out
