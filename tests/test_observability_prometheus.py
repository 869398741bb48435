"""End to end: a real Prometheus scrapes a running sidecar, answers every dashboard query, and
evaluates the alert rules against it."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import free_port, needs_tools, wait_for_port, wait_until

from core.config import parse_config
from dualwrite.service import setup

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
PROMETHEUS = shutil.which("prometheus") or "prometheus"
#: its own name: counters live in the test process's registry, shared with other tests
MAPPING = "prom_items"
GRAFANA_VARIABLES = {"$__rate_interval": "15s", "$job": "dualwrite", "$mapping": ".+"}

pytestmark = needs_tools("prometheus")


class Prometheus:
    """A throwaway Prometheus on loopback with its own config and storage."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {"job_name": "dualwrite", "static_configs": [{"targets": targets}]}
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def wait_ready(self) -> None:
        wait_for_port("127.0.0.1", self.port, timeout=30)

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return True
            except OSError:
                return False

        wait_until(ready, 30, "Prometheus to be ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def mapping_config() -> dict[str, Any]:
    return {
        "name": MAPPING,
        "source": "public.items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "name": "name"},
    }


@pytest.fixture
def scraped(db, sidecar, tmp_path) -> Iterator[tuple[Any, Prometheus]]:
    """A sidecar mirroring one mapping, and a Prometheus scraping it every second."""
    db.sql(
        "CREATE TABLE items (id int PRIMARY KEY, name text);"
        "CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, name text)"
    )
    asyncio.run(setup(parse_config({"service_dsn": db.dsn, "mappings": [mapping_config()]})))
    db.sql(
        "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, finished_at, clean)"
        " VALUES (%s, 'reconcile', 'done', now(), true)",
        MAPPING,
    )
    db.sql(
        "INSERT INTO dualwrite.backfill_state (mapping, status, rows_done, rows_estimate)"
        " VALUES (%s, 'running', 30, 120)",
        MAPPING,
    )
    handle = sidecar({"mappings": [mapping_config()]})
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{handle.admin_port}"])
    try:
        prometheus.wait_ready()
        yield handle, prometheus
    finally:
        prometheus.stop()


def value(result: list[dict[str, Any]]) -> float:
    return sum(float(r["value"][1]) for r in result)


def test_prometheus_scrapes_the_sidecar_and_answers_dashboard_queries(scraped):
    handle, prometheus = scraped
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items SELECT g, 'x' FROM generate_series(1, 7) g")
        conn.execute("UPDATE items SET name = 'y' WHERE id <= 3")

    rows = f'dualwrite_rows_mirrored_total{{job="dualwrite", mapping="{MAPPING}"}}'
    wait_until(lambda: value(prometheus.query(rows)) == 10, 30, "the mirrored rows in Prometheus")
    by_operation = {r["metric"]["operation"]: float(r["value"][1]) for r in prometheus.query(rows)}
    assert by_operation == {"insert": 7.0, "update": 3.0}
    assert value(prometheus.query('up{job="dualwrite"}')) == 1.0
    progress = f'dualwrite_backfill_rows_done{{mapping="{MAPPING}"}}'
    assert value(prometheus.query(progress)) == 30.0

    # every panel query is accepted; the mirroring ones have data once two scrapes are in
    wait_until(
        lambda: prometheus.query(f'rate({rows}[15s])'), 30, "two scrapes for rate()"
    )
    answered = {}
    for title, expr in panel_exprs():
        answered.setdefault(title, []).append(bool(prometheus.query(expand(expr))))
    for title in (
        "Mirror throughput",
        "Outbox depth",
        "Last clean pass age",
        "Backfill progress",
        "Divergence by mapping and class",
        "Client connections",
        "Sidecars up",
    ):
        assert any(answered[title]), title


def test_prometheus_evaluates_the_alert_rules_against_the_sidecar(scraped, db):
    _handle, prometheus = scraped

    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(r["lastEvaluation"][:4] != "0001" for r in rules) else []

    rules = wait_until(evaluated, 30, "every rule to be evaluated once")
    assert {r["name"]: r["health"] for r in rules} == {r["name"]: "ok" for r in rules}
    assert len(rules) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])

    db.sql(
        "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, finished_at, changed,"
        " clean) VALUES (%s, 'reconcile', 'done', now(), 4, false)",
        MAPPING,
    )

    def divergence_alert() -> list[dict[str, Any]]:
        # this test's mapping only: the registry is the test process's, shared with other tests
        alerts = prometheus.get("/api/v1/alerts")["data"]["alerts"]
        return [
            a for a in alerts
            if a["labels"]["alertname"] == "DualwriteDivergence" and a["state"] == "firing"
            and a["labels"].get("mapping") == MAPPING
        ]

    (alert,) = wait_until(divergence_alert, 45, "DualwriteDivergence to fire")
    assert alert["labels"]["mapping"] == MAPPING
    assert alert["labels"]["class"] == "changed"
    assert float(alert["value"]) == 4.0


def panel_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]


def expand(expr: str) -> str:
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, replacement)
    return expr
