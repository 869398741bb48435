"""Writes a report as Markdown (tickets), HTML (one self-contained page) or JSON (pipelines)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from typing import Any

from compare.report.html_page import render_html
from compare.report.markdown import render_markdown
from compare.report.model import Bucket, MappingReport, Pass, Report
from compare.report.passes import history_passes
from core.shadow import OUTCOMES

FORMATS = ("md", "html", "json")


def render(report: Report, fmt: str) -> str:
    """The report in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "json":
        return json.dumps(to_json(report), indent=2, default=_json_default) + "\n"
    if fmt == "md":
        return render_markdown(report)
    if fmt == "html":
        return render_html(report)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def to_json(report: Report) -> dict[str, Any]:
    """The report as plain data; every number is the measured value, not a rounded text."""
    return {
        "verdict": report.verdict,
        "go": report.go,
        "generated_at": report.generated_at,
        "database": report.database,
        "window": {
            "criteria_start": report.window_start,
            "history_start": report.history_start,
            "max_gap_seconds": report.max_gap.total_seconds(),
            "bucket_seconds": report.bucket.total_seconds(),
        },
        "thresholds": report.thresholds,
        "relaxed_criteria": report.relaxed,
        "criteria_settings": [
            {"criterion": n, "configured": c, "production_default": d}
            for n, c, d in report.settings
        ],
        "overall_criteria": [asdict(c) for c in report.overall_criteria],
        "mappings": [_mapping_json(report, m) for m in report.mappings],
        "status_url": report.status_url,
        "status": report.status,
        "contract_readiness": [
            {**asdict(r), "gaps": list(r.gaps), "ready": r.ready} for r in report.contract
        ],
        "shadow": _shadow_json(report),
        "invariants": [{**asdict(c), "scope": c.scope} for c in report.invariants],
        "tenant": report.tenant,
        "exit_go": report.exit_go,
        "tenants": [
            {**asdict(t), "verdict": t.verdict, "go": t.go, "failing": [c.name for c in t.failed]}
            for t in report.tenants
        ],
    }


def _mapping_json(report: Report, mapping: MappingReport) -> dict[str, Any]:
    facts = mapping.facts
    return {
        "name": mapping.name,
        "source": mapping.source,
        "target": mapping.target,
        "mode": mapping.mode,
        "verdict": mapping.verdict,
        "go": mapping.go,
        "criteria": [asdict(c) for c in mapping.criteria],
        "figures": {
            "dead_letters": facts.dead_letters,
            "dead_letters_by_sqlstate": facts.dead_letters_by_sqlstate,
            "outbox_depth": facts.outbox_depth,
            "outbox_oldest_age_seconds": facts.outbox_oldest_age_seconds,
            "unmirrored_in_window": facts.unmirrored_in_window,
            "mirror_failures_in_window": facts.mirror_failures_in_window,
            "uncaptured_in_window": facts.uncaptured_in_window,
            "resync_reason": facts.resync_reason,
            "paused": facts.paused,
            "unfinished_passes": facts.unfinished_passes,
            "backfill": asdict(facts.backfill) if facts.backfill else None,
        },
        "passes": [_pass_json(p) for p in history_passes(report, mapping)],
        "repairs": [asdict(r) for r in facts.repairs],
        "activity": [_bucket_json(b) for b in facts.activity],
        "live": mapping.live,
    }


def _shadow_json(report: Report) -> dict[str, Any] | None:
    summary = report.shadow
    if summary is None:
        return None
    return {
        "compared": summary.compared,
        "mismatch_ratio": summary.mismatch_ratio,
        "totals": {outcome: summary.total(outcome) for outcome in OUTCOMES},
        "latency_ratio": list(summary.latency_ratio) if summary.latency_ratio else None,
        "shapes": [asdict(shape) for shape in summary.shapes],
    }


def _pass_json(run: Pass) -> dict[str, Any]:
    return {**asdict(run), "divergent": run.divergent, "clean": run.clean}


def _bucket_json(bucket: Bucket) -> dict[str, Any]:
    return asdict(bucket)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
