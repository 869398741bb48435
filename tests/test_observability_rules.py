"""config/prometheus-alerts.yml and config/grafana-dashboard.json: promtool checks and unit tests,
valid PromQL in every panel, and a dashboard Grafana can import."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import REGISTRY
from support import needs_tools

from core import metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "config" / "prometheus-alerts.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")

needs_promtool = needs_tools("promtool")

#: Grafana's variables, as a query run over "All" would expand them
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".+", "$mapping": ".+"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_exprs() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


# --- alert rules ---------------------------------------------------------------------------------


@needs_promtool
def test_alert_rules_pass_promtool_check():
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_required_alerts_exist_with_severity_and_text():
    found = rules()
    assert set(found) >= {
        "DualwriteSidecarDown",
        "DualwriteMirrorFailures",
        "DualwriteDeadLetters",
        "DualwriteOutboxLagging",
        "DualwriteDivergence",
        "DualwriteNoCleanPass",
        "DualwriteShadowMismatches",
        "DualwriteInvariantBroken",
    }
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
    assert found["DualwriteSidecarDown"]["expr"] == 'up{job="dualwrite"} == 0'


def render(template: str, labels: dict[str, str], value: str) -> str:
    """The two template forms the rules use: ``{{ $labels.x }}`` and ``{{ $value | ... }}``."""
    text = re.sub(r"{{\s*\$labels\.(\w+)\s*}}", lambda m: labels[m.group(1)], template)
    text = re.sub(r"{{\s*\$value[^}]*}}", value, text)
    assert "{{" not in text, text
    return " ".join(text.split())


def expect(alert: str, labels: dict[str, str], value: str) -> dict[str, Any]:
    """One expected alert: its labels (severity added) and both annotations rendered."""
    rule = rules()[alert]
    return {
        "exp_labels": {**labels, "severity": rule["labels"]["severity"]},
        "exp_annotations": {
            key: render(rule["annotations"][key], labels, value)
            for key in ("summary", "description")
        },
    }


def alert_cases() -> list[dict[str, Any]]:
    sidecar = {"job": "dualwrite", "instance": "pod-a:9187"}

    def series(name: str, values: str, **labels: str) -> dict[str, str]:
        matchers = ", ".join(f'{k}="{v}"' for k, v in {**sidecar, **labels}.items())
        return {"series": f"{name}{{{matchers}}}", "values": values}

    def other_pod(entry: dict[str, str]) -> dict[str, str]:
        return {**entry, "series": entry["series"].replace("pod-a", "pod-b")}

    dead = series("dualwrite_dead_letters", "0 0 2x10", mapping="customers")
    return [
        {
            "interval": "1m",
            "input_series": [
                series("up", "1 1 0 0 0 0 0"),
                series("dualwrite_mirror_failures_total", "0 0 0 3x12",
                       mapping="customers", stage="applier"),
                dead,
                other_pod(dead),  # two sidecars read the same table: max, not sum
                series("dualwrite_outbox_oldest_age_seconds", "10 10 400x10", mapping="customers"),
                series("dualwrite_last_pass_divergent_rows", "0 0 5x5",
                       mapping="customers", **{"class": "missing"}),
                series("dualwrite_last_pass_divergent_rows", "0x7",
                       mapping="customers", **{"class": "extra"}),
                series("dualwrite_unmirrored_statements_total", "0 0 1x5",
                       mapping="customers", reason="copy"),
                series("dualwrite_invariant_failing_groups", "0 0 0 1x5",
                       invariant="transactions_daily_totals"),
                other_pod(series("dualwrite_invariant_failing_groups", "0 0 0 1x5",
                                 invariant="transactions_daily_totals")),
                series("dualwrite_invariant_failing_groups", "0x8",
                       invariant="inventory_conserved"),
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "DualwriteSidecarDown", "exp_alerts": []},
                {"eval_time": "5m", "alertname": "DualwriteSidecarDown",
                 "exp_alerts": [expect("DualwriteSidecarDown", sidecar, "")]},
                {"eval_time": "5m", "alertname": "DualwriteMirrorFailures",
                 "exp_alerts": [expect("DualwriteMirrorFailures",
                                       {"mapping": "customers", "stage": "applier"}, "3")]},
                {"eval_time": "12m", "alertname": "DualwriteMirrorFailures", "exp_alerts": []},
                {"eval_time": "6m", "alertname": "DualwriteDeadLetters", "exp_alerts": []},
                {"eval_time": "7m", "alertname": "DualwriteDeadLetters",
                 "exp_alerts": [expect("DualwriteDeadLetters", {"mapping": "customers"}, "2")]},
                {"eval_time": "7m", "alertname": "DualwriteOutboxLagging",
                 "exp_alerts": [expect("DualwriteOutboxLagging", {"mapping": "customers"},
                                       "6m 40s")]},
                {"eval_time": "1m", "alertname": "DualwriteDivergence", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "DualwriteDivergence",
                 "exp_alerts": [expect("DualwriteDivergence",
                                       {"mapping": "customers", "class": "missing"}, "5")]},
                {"eval_time": "2m", "alertname": "DualwriteUnmirroredStatements",
                 "exp_alerts": [expect("DualwriteUnmirroredStatements",
                                       {"mapping": "customers", "reason": "copy"}, "")]},
                {"eval_time": "5m", "alertname": "DualwriteSidecarsAbsent", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "DualwriteInvariantBroken", "exp_alerts": []},
                {"eval_time": "4m", "alertname": "DualwriteInvariantBroken",
                 "exp_alerts": [expect("DualwriteInvariantBroken",
                                       {"invariant": "transactions_daily_totals"}, "1")]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series("up", "1x400"),
                # never clean (0) vs. a clean pass every minute (the timestamp follows time)
                series("dualwrite_last_clean_pass_timestamp_seconds", "0x400", mapping="customers"),
                series("dualwrite_last_clean_pass_timestamp_seconds", "0+60x400",
                       mapping="employees"),
            ],
            "alert_rule_test": [
                {"eval_time": "6h5m", "alertname": "DualwriteNoCleanPass", "exp_alerts": []},
                {"eval_time": "6h20m", "alertname": "DualwriteNoCleanPass",
                 "exp_alerts": [expect("DualwriteNoCleanPass", {"mapping": "customers"},
                                       "6h 20m 0s")]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                series("dualwrite_uncaptured_changes_total", "0 0 4x20", mapping="audit_events"),
                series("dualwrite_wal_slot_retained_bytes", "0 0 1e9x20", slot="dualwrite"),
                series("dualwrite_wal_slot_retained_bytes", "1e6x20", slot="quiet"),
                series("dualwrite_wal_oldest_unconfirmed_age_seconds", "0 0 600x20",
                       slot="dualwrite"),
                series("dualwrite_wal_slot_dropped_total", "0 0 1x20", slot="dualwrite"),
                series("dualwrite_resync_needed", "0 0 1x20", mapping="audit_events"),
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "DualwriteUncapturedChanges", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "DualwriteUncapturedChanges",
                 "exp_alerts": [expect("DualwriteUncapturedChanges",
                                       {"mapping": "audit_events"}, "4")]},
                {"eval_time": "5m", "alertname": "DualwriteWalSlotRetainingWal", "exp_alerts": []},
                {"eval_time": "13m", "alertname": "DualwriteWalSlotRetainingWal",
                 "exp_alerts": [expect("DualwriteWalSlotRetainingWal", {"slot": "dualwrite"},
                                       "953.7Mi")]},
                {"eval_time": "8m", "alertname": "DualwriteWalReaderBehind",
                 "exp_alerts": [expect("DualwriteWalReaderBehind", {"slot": "dualwrite"},
                                       "10m 0s")]},
                {"eval_time": "3m", "alertname": "DualwriteWalSlotDropped",
                 "exp_alerts": [expect("DualwriteWalSlotDropped", {"slot": "dualwrite"}, "")]},
                {"eval_time": "3m", "alertname": "DualwriteResyncNeeded",
                 "exp_alerts": [expect("DualwriteResyncNeeded", {"mapping": "audit_events"}, "")]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [
                # compared shadow reads: all match for 10 minutes, then one in three mismatches
                series("dualwrite_shadow_statements_total", "0+20x40", outcome="match"),
                series("dualwrite_shadow_statements_total", "0x10 0+10x30", outcome="mismatch"),
                series("dualwrite_shadow_statements_total", "0+50x40", outcome="noise"),
            ],
            "alert_rule_test": [
                {"eval_time": "10m", "alertname": "DualwriteShadowMismatches", "exp_alerts": []},
                {"eval_time": "25m", "alertname": "DualwriteShadowMismatches",
                 "exp_alerts": [expect("DualwriteShadowMismatches", {}, "")]},
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": 'up{job="other"}', "values": "1x20"}],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "DualwriteSidecarsAbsent", "exp_alerts": []},
                {"eval_time": "11m", "alertname": "DualwriteSidecarsAbsent",
                 "exp_alerts": [expect("DualwriteSidecarsAbsent", {"job": "dualwrite"}, "")]},
            ],
        },
    ]


@needs_promtool
def test_alert_rules_fire_when_and_only_when_they_should(tmp_path):
    tests = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": alert_cases(),
    }
    path = tmp_path / "alerts.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path):
    """The harness above would notice an alert that does not fire."""
    cases = alert_cases()[:1]
    cases[0]["alert_rule_test"] = [
        {"eval_time": "1m", "alertname": "DualwriteSidecarDown",
         "exp_alerts": [{"exp_labels": {"job": "dualwrite"}}]}
    ]
    path = tmp_path / "failing.test.yml"
    path.write_text(yaml.safe_dump({"rule_files": [str(ALERTS)], "tests": cases}))
    assert promtool("test", "rules", str(path)).returncode != 0


# --- dashboard -----------------------------------------------------------------------------------


def test_dashboard_is_importable_grafana_json():
    board = dashboard()
    assert board["title"]
    assert board["uid"]
    assert board["schemaVersion"] >= 30
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_do_not_overlap():
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        grid = panel["gridPos"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, panel["title"]
        taken |= cells


def test_dashboard_has_the_panels_operators_need():
    text = json.dumps(dashboard())
    for metric in (
        "dualwrite_rows_mirrored_total",
        "dualwrite_mirror_failures_total",
        "dualwrite_unmirrored_statements_total",
        "dualwrite_outbox_depth",
        "dualwrite_outbox_oldest_age_seconds",
        "dualwrite_applier_batch_seconds_bucket",
        "dualwrite_last_pass_divergent_rows",
        "dualwrite_last_clean_pass_timestamp_seconds",
        "dualwrite_client_connections_open",
        "dualwrite_proxy_processing_seconds_bucket",
        "dualwrite_backfill_rows_done",
        "dualwrite_shadow_statements_total",
        "dualwrite_shadow_latency_ratio_bucket",
        "dualwrite_shadow_queue_depth",
    ):
        assert metric in text, metric


#: the name a family of each type is queried by on a dashboard
CHARTED_AS = {"counter": "_total", "histogram": "_bucket", "info": "_info", "gauge": ""}


def test_every_metric_is_charted_or_listed_as_not_charted_with_a_reason():
    text = json.dumps(dashboard())
    families = {
        f.name: f.type for f in REGISTRY.collect() if f.name.startswith("dualwrite_")
    }
    assert len(families) >= 40  # the registry holds what core/metrics.py defines
    uncharted = {
        name
        for name, kind in families.items()
        if not re.search(rf"\b{name}{CHARTED_AS[kind]}\b", text)
    }
    assert uncharted == set(metrics.NOT_CHARTED), uncharted
    assert all(reason.strip() for reason in metrics.NOT_CHARTED.values())
    for name in (
        "dualwrite_reconcile_repaired_rows",
        "dualwrite_reconcile_pending_keys",
        "dualwrite_admin_actions",
        "dualwrite_rewrite_cache",
        "dualwrite_invariant_failing_groups",
    ):
        assert name not in uncharted, name


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path):
    """Each panel query, with Grafana's variables expanded, loads as a recording rule."""
    recording = [
        {"record": f"dashboard:panel_{i}", "expr": expand(expr)}
        for i, (_title, expr) in enumerate(panel_exprs())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recording}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(recording) >= 20


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, expr
    return expr
