"""The cutover report against a real control schema: verdicts, each criterion, numbers, formats."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from support import free_port

from core.control import install
from core.logs import configure_logging
from dualwrite.cli import main

MAPPING = "customers"
#: every criterion a mapping is judged on with the default config
CRITERIA = {
    "clean_window",
    "dead_letters",
    "outbox_age",
    "unmirrored_statements",
    "mirror_failures",
    "uncaptured_changes",
    "resync",
    "backfill",
    "mirroring_active",
}


# --- helpers ---------------------------------------------------------------------------------


def install_control_schema(dsn: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await install(conn)
        finally:
            await conn.close()

    asyncio.run(run())


def mapping_config(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "source": "public.users",
        "target": f"v2.{name}",
        "key": ["id"],
        "columns": {"id": "id", "email": "email"},
    }


def write_config(
    tmp_path: Path, dsn: str, *, mappings: tuple[str, ...] = (MAPPING,), **criteria: Any
) -> Path:
    data = {
        "service_dsn": dsn,
        "report": {"criteria": {"clean_window_hours": 24, **criteria}},
        "mappings": [mapping_config(m) for m in mappings],
    }
    path = tmp_path / "dualwrite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def add_pass(
    db: Any,
    finished_hours_ago: float,
    *,
    mapping: str = MAPPING,
    minutes: float = 10,
    missing: int = 0,
    extra: int = 0,
    changed: int = 0,
    pending: int = 0,
    rows: int = 1000,
    clean: bool | None = None,
    status: str = "done",
    tenant: str | None = None,
) -> int:
    """One reconcile run that finished ``finished_hours_ago`` and took ``minutes``."""
    if clean is None:
        clean = missing + extra + changed == 0
    return int(
        db.scalar(
            "INSERT INTO dualwrite.reconcile_runs (mapping, kind, status, started_at, finished_at,"
            " rows_compared, missing, extra, changed, pending, clean, tenant) VALUES"
            " (%s, 'reconcile', %s,"
            " now() - make_interval(secs => %s * 3600 + %s * 60),"
            " now() - make_interval(secs => %s * 3600), %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            mapping, status, finished_hours_ago, minutes, finished_hours_ago, rows,
            missing, extra, changed, pending, clean, tenant,
        )
    )


def add_hourly_passes(db: Any, hours: range, mapping: str = MAPPING) -> list[int]:
    return [add_pass(db, h + 0.25, mapping=mapping) for h in hours]


def mark_backfilled(db: Any, mapping: str = MAPPING, status: str = "done") -> None:
    db.sql(
        "INSERT INTO dualwrite.backfill_state (mapping, status, finished_at, rows_done,"
        " rows_estimate) VALUES (%s, %s, now() - interval '40 hours', 5000, 5200)",
        mapping, status,
    )


def add_activity(
    db: Any, hours_ago: float, *, statements: int, rows: int, failures: int = 0,
    mapping: str = MAPPING,
) -> None:
    db.sql(
        "INSERT INTO dualwrite.mirror_activity (sidecar, mapping, operation, statements, rows,"
        " failures, period_start, period_end) VALUES ('pod-1', %s, 'update', %s, %s, %s,"
        " now() - make_interval(secs => %s * 3600 + 5), now() - make_interval(secs => %s * 3600))",
        mapping, statements, rows, failures, hours_ago, hours_ago,
    )


def healthy(db: Any, mapping: str = MAPPING) -> None:
    """30 hours of hourly clean passes, backfill done, nothing waiting or failing."""
    add_hourly_passes(db, range(30), mapping)
    mark_backfilled(db, mapping)
    add_activity(db, 2, statements=40, rows=90, mapping=mapping)


def report(config: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["report", "--config", str(config), *args])
    return code, capsys.readouterr().out


def report_json(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code, out = report(config, "--format", "json", *args, capsys=capsys)
    return code, json.loads(out)


def failed(data: dict[str, Any], mapping: str = MAPPING) -> set[str]:
    (entry,) = [m for m in data["mappings"] if m["name"] == mapping]
    return {c["name"] for c in entry["criteria"] if not c["passed"]}


def criterion(data: dict[str, Any], name: str, mapping: str = MAPPING) -> dict[str, Any]:
    (entry,) = [m for m in data["mappings"] if m["name"] == mapping]
    (found,) = [c for c in entry["criteria"] if c["name"] == name]
    return found


@pytest.fixture(autouse=True)
def _logging_to_real_stderr() -> Any:
    """`dualwrite report` configures logging onto the stderr of the moment, which is capsys's
    stream here; point it back at the process's own stderr so later tests can still log."""
    yield
    configure_logging(stream=sys.__stderr__)


@pytest.fixture
def control(db: Any) -> Any:
    install_control_schema(db.dsn)
    return db


# --- verdicts --------------------------------------------------------------------------------


def test_go_when_every_criterion_passes(control, tmp_path, capsys):
    healthy(control)
    config = write_config(tmp_path, control.dsn)
    code, data = report_json(config, capsys)
    assert code == 0
    assert data["verdict"] == "GO"
    assert data["go"] is True
    assert {c["name"] for c in data["mappings"][0]["criteria"]} == CRITERIA
    assert failed(data) == set()


def _divergent_recent_pass(db: Any) -> None:
    add_pass(db, 1.5, missing=1)


def _clean_history_too_short(db: Any) -> None:
    db.sql("DELETE FROM dualwrite.reconcile_runs WHERE finished_at < now() - interval '10 hours'")


def _gap_between_passes(db: Any) -> None:
    db.sql(
        "DELETE FROM dualwrite.reconcile_runs WHERE finished_at"
        " BETWEEN now() - interval '17 hours' AND now() - interval '9 hours'"
    )


def _no_recent_pass(db: Any) -> None:
    db.sql("DELETE FROM dualwrite.reconcile_runs WHERE finished_at > now() - interval '7 hours'")


def _pass_flagged_unclean(db: Any) -> None:
    add_pass(db, 0.5, clean=False)


def _divergent_tenant_pass(db: Any) -> None:
    add_pass(db, 3.1, changed=2, tenant="42")


def _dead_letter(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.dead_letters (mapping, key, error, sqlstate)"
        " VALUES (%s, '[7]', 'null value in column \"email\"', '23502')",
        MAPPING,
    )


def _old_outbox_key(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.outbox (mapping, key, enqueued_at)"
        " VALUES (%s, '[1]', now() - interval '5 minutes')",
        MAPPING,
    )


def _unmirrored_statement(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.unmirrored_events (mapping, reason, statements, at)"
        " VALUES (%s, 'copy', 1, now() - interval '3 hours')",
        MAPPING,
    )


def _mirror_failure(db: Any) -> None:
    add_activity(db, 5, statements=10, rows=10, failures=1)


def _uncaptured_change(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.uncaptured_changes (mapping, xid, commit_time, lsn, operation, key)"
        " VALUES (%s, 742, now() - interval '2 hours', '0/16B3748', 'insert', '[9]')",
        MAPPING,
    )


def _resync_marked(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.resync_needed (mapping, reason)"
        " VALUES (%s, 'TRUNCATE of the source')",
        MAPPING,
    )


def _backfill_running(db: Any) -> None:
    db.sql("UPDATE dualwrite.backfill_state SET status = 'running', finished_at = NULL")


def _backfill_never_run(db: Any) -> None:
    db.sql("DELETE FROM dualwrite.backfill_state")


def _paused(db: Any) -> None:
    db.sql(
        "INSERT INTO dualwrite.mapping_state (mapping, paused, updated_by) VALUES (%s, true, 't')",
        MAPPING,
    )


@pytest.mark.parametrize(
    ("breaks", "criterion_name"),
    [
        (_divergent_recent_pass, "clean_window"),
        (_clean_history_too_short, "clean_window"),
        (_gap_between_passes, "clean_window"),
        (_no_recent_pass, "clean_window"),
        (_pass_flagged_unclean, "clean_window"),
        (_divergent_tenant_pass, "clean_window"),
        (_dead_letter, "dead_letters"),
        (_old_outbox_key, "outbox_age"),
        (_unmirrored_statement, "unmirrored_statements"),
        (_mirror_failure, "mirror_failures"),
        (_uncaptured_change, "uncaptured_changes"),
        (_resync_marked, "resync"),
        (_backfill_running, "backfill"),
        (_backfill_never_run, "backfill"),
        (_paused, "mirroring_active"),
    ],
    ids=lambda value: value.__name__.strip("_") if callable(value) else None,
)
def test_no_go_when_any_single_criterion_fails(control, tmp_path, capsys, breaks, criterion_name):
    healthy(control)
    breaks(control)
    config = write_config(tmp_path, control.dsn)
    code, data = report_json(config, capsys)
    assert code == 1
    assert data["verdict"] == "NO-GO"
    assert failed(data) == {criterion_name}


def test_history_outside_the_window_does_not_block(control, tmp_path, capsys):
    healthy(control)
    add_pass(control, 29.5, missing=3)  # divergence, but 29 clean hours since
    control.sql(
        "INSERT INTO dualwrite.unmirrored_events (mapping, reason, statements, at)"
        " VALUES (%s, 'copy', 4, now() - interval '26 hours')",
        MAPPING,
    )
    add_activity(control, 25, statements=1, rows=0, failures=2)
    code, data = report_json(write_config(tmp_path, control.dsn), capsys)
    assert code == 0, failed(data)
    # the 30 clean passes: the oldest started 29.25 h + 10 min ago, the newest ended 0.25 h ago
    assert criterion(data, "clean_window")["measured"] == pytest.approx(29 + 10 / 60, abs=0.01)


def test_thresholds_come_from_report_criteria(control, tmp_path, capsys):
    healthy(control)
    _dead_letter(control)
    _old_outbox_key(control)
    add_activity(control, 1, statements=3, rows=3, failures=2)
    config = write_config(
        tmp_path, control.dsn, max_dead_letters=1, max_outbox_age_seconds=600,
        max_mirror_failures=2, clean_window_hours=40,
    )
    code, data = report_json(config, capsys)
    assert code == 1
    assert failed(data) == {"clean_window"}  # 30 h of passes < 40 h; the rest within bounds
    assert criterion(data, "dead_letters")["threshold_text"] == "<= 1"
    assert data["thresholds"]["clean_window_hours"] == 40


def test_backfill_not_required_when_configured_so(control, tmp_path, capsys):
    add_hourly_passes(control, range(30))
    config = write_config(tmp_path, control.dsn, require_backfill_complete=False)
    code, data = report_json(config, capsys)
    assert code == 0
    assert "backfill" not in {c["name"] for c in data["mappings"][0]["criteria"]}


def test_overall_is_no_go_when_one_mapping_is(control, tmp_path, capsys):
    healthy(control, "customers")
    healthy(control, "employees")
    add_pass(control, 0.1, mapping="employees", extra=1)
    config = write_config(tmp_path, control.dsn, mappings=("customers", "employees"))
    code, data = report_json(config, capsys)
    assert code == 1
    verdicts = {m["name"]: m["verdict"] for m in data["mappings"]}
    assert verdicts == {"customers": "GO", "employees": "NO-GO"}
    assert failed(data, "employees") == {"clean_window"}


def test_clean_window_of_zero_hours_needs_one_fresh_clean_pass(control, tmp_path, capsys):
    mark_backfilled(control)
    config = write_config(tmp_path, control.dsn, clean_window_hours=0)
    assert report_json(config, capsys)[0] == 1  # no pass at all
    add_pass(control, 0.2)
    assert report_json(config, capsys)[0] == 0


# --- numbers ---------------------------------------------------------------------------------


def test_numbers_match_the_recorded_runs(control, tmp_path, capsys):
    ids = add_hourly_passes(control, range(30))
    divergent = add_pass(control, 31.5, missing=2, extra=1, changed=4, pending=3, rows=777)
    failed_run = add_pass(control, 5.5, status="failed")
    mark_backfilled(control)
    add_activity(control, 1, statements=10, rows=25)
    add_activity(control, 3, statements=5, rows=7, failures=0)
    add_activity(control, 40, statements=999, rows=999)  # before --since 36h
    control.sql(
        "INSERT INTO dualwrite.unmirrored_events (mapping, reason, statements, at)"
        " VALUES (%s, 'copy', 6, now() - interval '30 hours')",
        MAPPING,
    )
    control.sql(
        "INSERT INTO dualwrite.outbox (mapping, key, enqueued_at) VALUES"
        " (%s, '[1]', now() - interval '20 seconds'), (%s, '[2]', now())",
        MAPPING, MAPPING,
    )
    code, data = report_json(write_config(tmp_path, control.dsn), capsys, "--since", "36h")
    assert code == 0, failed(data)
    entry = data["mappings"][0]
    passes = entry["passes"]
    assert [p["id"] for p in passes] == [*ids, divergent]  # newest first, failed run excluded
    assert failed_run not in {p["id"] for p in passes}
    assert passes[-1]["divergent"] == 7
    assert (passes[-1]["missing"], passes[-1]["extra"], passes[-1]["changed"]) == (2, 1, 4)
    assert passes[-1]["pending"] == 3
    assert passes[-1]["rows_compared"] == 777
    assert passes[-1]["clean"] is False
    figures = entry["figures"]
    assert figures["unfinished_passes"] == 1
    assert figures["outbox_depth"] == 2
    assert 20 <= figures["outbox_oldest_age_seconds"] < 60
    assert figures["backfill"]["rows_done"] == 5000
    assert figures["unmirrored_in_window"] == 0  # 30 h ago: outside the 24 h window
    activity = entry["activity"]
    assert sum(b["statements"] for b in activity) == 15
    assert sum(b["rows"] for b in activity) == 32
    assert sum(b["unmirrored"] for b in activity) == 6  # inside the 36 h history
    # clean window: from the start of the oldest of the 30 clean passes to the newest's end
    clean = criterion(data, "clean_window")
    assert clean["measured"] == pytest.approx(29 + 10 / 60, abs=0.01)
    assert "30 passes" in clean["measured_text"]
    assert f"#{divergent}" in clean["detail"]


def test_dead_letters_are_reported_by_sqlstate_without_their_error_text(control, tmp_path, capsys):
    healthy(control)
    for key, state in (("[1]", "23502"), ("[2]", "23502"), ("[3]", "23505")):
        control.sql(
            "INSERT INTO dualwrite.dead_letters (mapping, key, error, sqlstate)"
            " VALUES (%s, %s, 'secret value alice@example.com', %s)",
            MAPPING, key, state,
        )
    config = write_config(tmp_path, control.dsn)
    code, data = report_json(config, capsys)
    assert code == 1
    assert data["mappings"][0]["figures"]["dead_letters_by_sqlstate"] == {"23502": 2, "23505": 1}
    assert criterion(data, "dead_letters")["measured"] == 3
    for fmt in ("md", "html", "json"):
        assert "alice@example.com" not in report(config, "--format", fmt, capsys=capsys)[1]


# --- formats ---------------------------------------------------------------------------------


def test_markdown_has_a_verdict_a_summary_and_a_row_per_criterion(control, tmp_path, capsys):
    healthy(control)
    _dead_letter(control)
    code, text = report(write_config(tmp_path, control.dsn), capsys=capsys)
    assert code == 1
    assert text.startswith("# Cutover report: **NO-GO**")
    summary = f"| {MAPPING} | `public.users` → `v2.{MAPPING}` | outbox | **NO-GO** | Dead letters |"
    assert summary in text
    assert f"## {MAPPING}: **NO-GO**" in text
    rows = [line for line in text.splitlines() if line.startswith("| Dead letters |")]
    assert rows == ["| Dead letters | 1 | <= 0 | **FAIL** | by SQLSTATE: 23502: 1 |"]
    assert sum("| PASS |" in line for line in text.splitlines()) == len(CRITERIA) - 1
    # the default history is 24 h: 24 of the 30 hourly passes
    assert "Reconcile passes: 24 finished (24 clean, 0 divergent)" in text


def test_html_is_one_self_contained_printable_page(control, tmp_path, capsys):
    healthy(control)
    add_pass(control, 26.5, changed=3)
    out = tmp_path / "report.html"
    code = main(["report", "--config", str(write_config(tmp_path, control.dsn)),
                 "--out", str(out), "--since", "30h"])
    assert code == 0
    assert "dualwrite report: GO ->" in capsys.readouterr().err
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "@import" not in page
    assert "url(" not in page
    assert page.count("<svg") == 4  # timeline, divergence, volume, failures
    assert "@media print" in page
    assert "@page" in page
    assert page.count("✔ PASS") == len(CRITERIA)
    assert '<div class="badge">GO</div>' in page


def test_json_is_the_pipeline_contract(control, tmp_path, capsys):
    healthy(control)
    code, data = report_json(write_config(tmp_path, control.dsn), capsys)
    assert code == 0
    assert set(data) >= {"verdict", "go", "generated_at", "window", "thresholds", "mappings"}
    entry = data["mappings"][0]
    assert set(entry) >= {"name", "verdict", "criteria", "figures", "passes", "activity"}
    for item in entry["criteria"]:
        assert set(item) == {"name", "title", "measured", "measured_text", "threshold_text",
                             "passed", "detail"}


def test_format_is_taken_from_the_out_suffix(control, tmp_path, capsys):
    healthy(control)
    out = tmp_path / "r.json"
    assert main(["report", "--config", str(write_config(tmp_path, control.dsn)),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["verdict"] == "GO"


# --- exit 2, and the CLI as a process ---------------------------------------------------------


def test_config_errors_exit_2(control, tmp_path, capsys):
    no_mappings = tmp_path / "empty.yaml"
    no_mappings.write_text(yaml.safe_dump({"service_dsn": control.dsn}))
    assert main(["report", "--config", str(no_mappings)]) == 2
    config = write_config(tmp_path, control.dsn)
    assert main(["report", "--config", str(config), "--since", "yesterday"]) == 2
    assert main(["report", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config error" in capsys.readouterr().err


def test_missing_control_schema_exits_2(db, tmp_path, capsys):
    assert main(["report", "--config", str(write_config(tmp_path, db.dsn))]) == 2
    assert "dualwrite setup" in capsys.readouterr().err


def test_unreachable_database_exits_2(tmp_path, capsys):
    config = write_config(tmp_path, f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere")
    assert main(["report", "--config", str(config)]) == 2
    assert "cannot connect" in capsys.readouterr().err


def test_cli_process_exit_codes(control, tmp_path):
    healthy(control)
    config = write_config(tmp_path, control.dsn)

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dualwrite", "report", "--config", str(config), "--format",
             "json"],
            capture_output=True, text=True, timeout=60, check=False,
        )

    go = run()
    assert go.returncode == 0, go.stderr
    assert json.loads(go.stdout)["verdict"] == "GO"
    _paused(control)
    no_go = run()
    assert no_go.returncode == 1
    assert json.loads(no_go.stdout)["verdict"] == "NO-GO"


# --- the sidecar's /status ---------------------------------------------------------------------


def test_status_url_of_a_dead_sidecar_is_no_go(control, tmp_path, capsys):
    healthy(control)
    config = write_config(tmp_path, control.dsn)
    code, data = report_json(config, capsys, "--status-url", f"http://127.0.0.1:{free_port()}")
    assert code == 1
    assert failed(data) == set()
    assert [(c["name"], c["passed"]) for c in data["overall_criteria"]] == [
        ("sidecar_status", False)
    ]


def test_a_resync_mark_is_cleared_by_a_clean_full_pass_started_after_it(
    control, tmp_path, capsys
):
    healthy(control)  # hourly clean passes up to a quarter of an hour ago
    control.sql(
        "INSERT INTO dualwrite.resync_needed (mapping, reason, first_at, last_at)"
        " VALUES (%s, 'TRUNCATE of the source', now() - interval '3 hours',"
        " now() - interval '3 hours')",
        MAPPING,
    )
    code, data = report_json(write_config(tmp_path, control.dsn), capsys)
    assert code == 0, failed(data)
    assert criterion(data, "resync")["measured"] == "none"
    assert "a clean pass since" in criterion(data, "resync")["detail"]
