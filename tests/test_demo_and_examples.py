"""The first ten minutes: `dualwrite demo` end to end, and every example config in config/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.config import load_config
from core.mapping import compile_all
from dualwrite.service import check_live, setup

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p for p in (REPO / "config").glob("*.yaml") if "alerts" not in p.name)


def test_there_are_example_migrations() -> None:
    names = {p.stem for p in EXAMPLES}
    assert {"split-users", "tier-pricing", "transactions-total", "inventory-normalization"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_is_valid_offline(path: Path) -> None:
    config = load_config(path)
    assert config.mappings, f"{path.name} declares no mapping"
    compile_all(config, source=str(path))


def _seed_schema(db: Any) -> None:
    for name in ("pos_v1.sql", "pos_v2.sql"):
        db.sql(resources.files("dualwrite.demo").joinpath(name).read_text(encoding="utf-8"))
    if not db.scalar("SELECT 1 FROM pg_roles WHERE rolname = 'pos_app'"):
        db.sql("CREATE ROLE pos_app LOGIN")


def _reads_wal(path: Path) -> bool:
    return any(m.capture.reads_wal for m in load_config(path).mappings)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_example_config_is_valid_against_the_seed_schema(
    path: Path, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # a config captured from the WAL needs wal_level = logical: the logical cluster's database
    wal = _reads_wal(path)
    db = request.getfixturevalue("logical_db" if wal else "db")
    pg = request.getfixturevalue("pg_logical" if wal else "pg")
    _seed_schema(db)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["service_dsn"] = db.dsn
    raw["upstream"] = {"host": pg.host, "port": pg.port}
    if wal:  # slots are cluster-wide: one of this database's own
        raw["wal"] = {**raw.get("wal", {}), "slot_name": db.name, "publication_name": db.name}
    config = load_config(_write(tmp_path / path.name, raw))
    lines = await setup(config)
    assert any("ok" in line for line in lines)
    live = await check_live(config)
    assert len([line for line in live if line.startswith("mapping ")]) == len(config.mappings)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    """A short demo on its own embedded PostgreSQL: GO, with every mapping reconciled clean."""
    workdir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k != "DUALWRITE_TEST_DSN"}
    result = subprocess.run(
        [sys.executable, "-m", "dualwrite", "demo", "--workdir", str(workdir),
         "--seconds", "4", "--clients", "3", "--no-wait"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for step in ("embedded PostgreSQL", "setup", "backfilling", "live traffic", "reconciling"):
        assert step in out, f"demo output lacks the {step!r} step:\n{out}"
    assert "verdict: GO" in out
    report = json.loads((workdir / "reports" / "cutover.json").read_text(encoding="utf-8"))
    assert report["verdict"] == "GO"
    mappings = {m["name"]: m for m in report["mappings"]}
    assert set(mappings) == {"customers", "employees", "products", "transactions", "stock_levels"}
    html = (workdir / "reports" / "cutover.html").read_text(encoding="utf-8")
    assert "<svg" in html
    assert "GO" in html
    # the demo's short window is said to be one, and its business rules held
    assert report["relaxed_criteria"] == ["clean window 0 h (production default 24 h)"]
    assert "Relaxed criteria:" in html
    checks = {i["name"]: i for i in report["invariants"]}
    assert set(checks) == {
        "transactions_daily_totals", "inventory_conserved", "user_in_exactly_one_target"
    }
    for name, check in checks.items():
        assert (check["status"], check["groups_failed"]) == ("done", 0), name
    assert checks["transactions_daily_totals"]["groups_checked"] > 0
    assert [(t["tenant"], t["verdict"]) for t in report["tenants"]] == [
        ("1", "GO"), ("2", "GO"), ("3", "GO")
    ]
    assert (workdir / "reports" / "cutover.md").stat().st_size > 0
    # shadow reads of products were replayed against v2compat.products and all agreed
    assert report["shadow"]["compared"] > 0
    assert report["shadow"]["totals"]["mismatch"] == 0
    assert "## Shadow reads" in (workdir / "reports" / "cutover.md").read_text(encoding="utf-8")
    logs = (workdir / "dualwrite.log").read_text(encoding="utf-8").splitlines()
    assert any(json.loads(line).get("event") == "mappings_validated" for line in logs if line)
    # Every mapping was reconciled after the traffic, and the pass found nothing divergent.
    for name, mapping in mappings.items():
        assert mapping["passes"], f"{name}: no reconcile pass recorded"
        assert all(p["clean"] for p in mapping["passes"]), mapping["passes"]
        assert mapping["figures"]["dead_letters"] == 0
