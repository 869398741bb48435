"""The Markdown report: plain tables and sparklines that paste into a ticket or a pull request."""

from __future__ import annotations

import json

from compare.report.criteria import CLEAN_WINDOW_DEFINITION, plural
from compare.report.format import duration_text, number_text, sparkline, timestamp_text
from compare.report.model import (
    PHASES,
    Criterion,
    InvariantCheck,
    MappingReport,
    Pass,
    Report,
)
from compare.report.passes import history_passes, worst_pass_per_bucket


def render_markdown(report: Report) -> str:
    lines = [
        f"# Cutover report: **{report.verdict}**",
        "",
        f"Generated {timestamp_text(report.generated_at)} from `{report.database}`. "
        f"Criteria window: last {duration_text(report.window_span.total_seconds())} "
        f"(since {timestamp_text(report.window_start)}); allowed gap between passes "
        f"{duration_text(report.max_gap.total_seconds())}. History: last "
        f"{duration_text(report.history_span.total_seconds())} in "
        f"{duration_text(report.bucket.total_seconds())} buckets.",
        "",
        *_relaxed_banner(report),
        "| Mapping | Route | Mode | Verdict | Failing criteria |",
        "|---|---|---|---|---|",
        *(
            f"| {m.name} | `{m.source}` → `{m.target}` | {m.mode} | **{m.verdict}** | "
            f"{', '.join(c.title for c in m.failed) or '—'} |"
            for m in report.mappings
        ),
        "",
    ]
    if report.overall_criteria:
        lines += ["## Deployment", "", *_criteria_table(report.overall_criteria), ""]
    lines += _tenants(report)
    for mapping in report.mappings:
        lines += _mapping(report, mapping)
    lines += _invariants(report)
    lines += _contract(report)
    lines += _shadow(report)
    lines += _settings(report)
    lines += [f"_{CLEAN_WINDOW_DEFINITION}_", ""]
    return "\n".join(lines)


def _relaxed_banner(report: Report) -> list[str]:
    if not report.relaxed:
        return []
    return [f"> **Relaxed criteria:** {'; '.join(report.relaxed)}.", ""]


def _settings(report: Report) -> list[str]:
    """Every criterion's configured value beside the production default."""
    return [
        "## Criteria settings",
        "",
        "| Criterion | Configured | Production default |",
        "|---|---|---|",
        *(
            f"| {name} | {'**' + configured + '**' if configured != default else configured} "
            f"| {default} |"
            for name, configured, default in report.settings
        ),
        "",
    ]


def _criteria_table(criteria: list[Criterion]) -> list[str]:
    return [
        "| Criterion | Measured | Threshold | Result | Detail |",
        "|---|---|---|---|---|",
        *(
            f"| {c.title} | {c.measured_text} | {_cell(c.threshold_text)} | "
            f"{'PASS' if c.passed else '**FAIL**'} | {_cell(c.detail)} |"
            for c in criteria
        ),
    ]


def _mapping(report: Report, mapping: MappingReport) -> list[str]:
    return [
        f"## {mapping.name}: **{mapping.verdict}**",
        "",
        f"`{mapping.source}` → `{mapping.target}`, mode {mapping.mode}",
        "",
        *_criteria_table(mapping.criteria),
        "",
        *_history(report, mapping),
        "",
        *_repairs(mapping),
    ]


def _repairs(mapping: MappingReport) -> list[str]:
    """The repairs on record in the look-back: each one restarts the clean window."""
    repairs = mapping.facts.repairs
    if not repairs:
        return []
    return [
        f"Repairs since {timestamp_text(mapping.facts.passes_since)} (row images: "
        "`dualwrite repairs --images`; each repair restarts the clean window):",
        "",
        "| Repair | At | By | Why | Keys | Upserted | Deleted | Still divergent |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| #{r.id} | {timestamp_text(r.at)} | {_cell(r.requested_by or '-')} | "
            f"{_cell(r.reason or '-')} | {number_text(r.keys)} | {number_text(r.upserted)} | "
            f"{number_text(r.deleted)} | {number_text(r.divergent_after)} |"
            for r in repairs
        ),
        "",
    ]


def _history(report: Report, mapping: MappingReport) -> list[str]:
    facts = mapping.facts
    passes = history_passes(report, mapping)
    clean = sum(p.clean for p in passes)
    starts = [b.start for b in facts.activity]
    last = worst_pass_per_bucket(passes, starts, report.bucket)
    divergence = [float(p.divergent) if p else 0.0 for p in last]
    activity = facts.activity
    rows = [float(b.rows) for b in activity]
    trouble = [float(b.failures + b.unmirrored) for b in activity]
    return [
        f"History, last {duration_text(report.history_span.total_seconds())} "
        f"(one character per {duration_text(report.bucket.total_seconds())}, oldest left):",
        "",
        f"- Reconcile passes: {len(passes)} finished ({clean} clean, {len(passes) - clean} "
        f"divergent), {facts.unfinished_passes} failed or interrupted",
        f"- Divergent rows (worst pass per bucket): `{sparkline(divergence)}` max "
        f"{number_text(max(divergence, default=0))}",
        f"- Rows mirrored: `{sparkline(rows)}` total {number_text(sum(b.rows for b in activity))}"
        f" in {number_text(sum(b.statements for b in activity))} statements",
        f"- Mirror failures + unmirrored statements: `{sparkline(trouble)}` "
        f"{number_text(sum(b.failures for b in activity))} failures, "
        f"{number_text(sum(b.unmirrored for b in activity))} unmirrored",
        *_recent(passes),
    ]


def _recent(passes: list[Pass], limit: int = 5) -> list[str]:
    if not passes:
        return []
    return [
        "",
        "| Pass | Finished | Rows compared | Missing | Extra | Changed | Pending | Dead-lettered "
        "| Outcome |",
        "|---|---|---|---|---|---|---|---|---|",
        *(
            f"| #{p.id} | {timestamp_text(p.finished_at)} | {number_text(p.rows_compared)} | "
            f"{p.missing} | {p.extra} | {p.changed} | {p.pending} | {p.dead_lettered} | "
            f"{'clean' if p.clean else '**divergent**'}{'' if p.full else ' (one tenant)'} |"
            for p in passes[:limit]
        ),
    ]


#: tenants listed in the table (NO-GO ones first); the rest are counted
TENANT_ROWS = 100


def _tenants(report: Report) -> list[str]:
    """Per tenant: its own evidence and verdict (mappings with a tenant_column)."""
    if not report.tenants:
        return []
    go = sum(t.go for t in report.tenants)
    lines = [
        "## Tenants",
        "",
        f"{go} of {plural(len(report.tenants), 'tenant')} GO. Each tenant is judged on its own "
        "rows (divergence, dead letters, invariant groups, shadow reads attributed to it) plus "
        "every criterion that cannot be "
        "told apart by tenant (outbox age, backfill, pause, unmirrored statements, ...).",
        "",
    ]
    if any(t.phase for t in report.tenants):
        lines += [PHASES, ""]
    if report.tenant is not None:
        found = report.tenant_report(report.tenant)
        verdict = found.verdict if found else "NO-GO (no evidence)"
        lines += [f"**Tenant {report.tenant}: {verdict}** (the exit status follows it).", ""]
    lines += [
        "| Tenant | Verdict | Missing | Extra | Changed | Dead letters | Invariant groups "
        "| Shadow mismatches | Failing criteria |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in report.tenants[:TENANT_ROWS]:
        lines.append(
            f"| {_cell(t.label)} | **{t.verdict}** | {t.divergent['missing']} | "
            f"{t.divergent['extra']} | {t.divergent['changed']} | {t.dead_letters} | "
            f"{t.invariant_failures} | {t.shadow_mismatches} | "
            f"{_cell(', '.join(c.title for c in t.failed)) or '—'} |"
        )
    hidden = len(report.tenants) - TENANT_ROWS
    if hidden > 0:
        lines.append(f"| … {plural(hidden, 'more tenant')} | | | | | | | | |")
    return [*lines, ""]


def _invariants(report: Report) -> list[str]:
    """Business invariants: each one's latest full check and its first failing groups."""
    if not report.invariants:
        return []
    lines = [
        "## Business invariants",
        "",
        "| Invariant | Scope | Kind | Last checked | Groups | Failing | Result |",
        "|---|---|---|---|---|---|---|",
    ]
    for check in report.invariants:
        lines.append(
            f"| {check.name} | {check.scope} | {check.kind} | "
            f"{timestamp_text(check.finished_at)} | {_groups(check)} | "
            f"{number_text(check.groups_failed)} | {_invariant_result(check)} |"
        )
    failing = [c for c in report.invariants if c.failures]
    if failing:
        lines += [
            "",
            "Failing groups (first of each check):",
            "",
            "| Invariant | Group | Figures | Old | New |",
            "|---|---|---|---|---|",
        ]
        for check in failing:
            for failure in check.failures:
                group = ", ".join(f"{k}={v}" for k, v in failure.group.items())
                lines.append(
                    f"| {check.name} | {_cell(group)} | {_cell(', '.join(check.value_columns))} "
                    f"| {_cell(_values(failure.old))} | {_cell(_values(failure.new))} |"
                )
    return [*lines, ""]


def _groups(check: InvariantCheck) -> str:
    """Groups compared (a new_only rule compares none: it lists offending rows)."""
    return "—" if check.kind == "new_only" else number_text(check.groups_checked)


def _invariant_result(check: InvariantCheck) -> str:
    if check.status is None:
        return "**never checked**"
    if check.status != "done":
        return "**check failed**"
    return "held" if check.groups_failed == 0 else "**BROKEN**"


def _values(values: list[object] | None) -> str:
    return "absent" if values is None else ", ".join(str(v) for v in values)


def _contract(report: Report) -> list[str]:
    """Contract readiness: what of the old relations the application still uses."""
    if not report.contract:
        return []
    lines = [
        "## Contract readiness",
        "",
        f"Application statements that referenced each mapping's source since "
        f"{timestamp_text(report.history_start)} (traffic recorded by the sidecars; "
        "`dualwrite lint --live` checks the contract script against the same evidence).",
        "",
        "| Mapping | Old relation | Statement shapes | First seen | Last seen "
        "| Columns (last seen) |",
        "|---|---|---|---|---|---|",
    ]
    for item in report.contract:
        columns = ", ".join(f"{c} ({timestamp_text(t)})" for c, t in item.columns.items())
        lines.append(
            f"| {item.mapping} | `{item.relation}` | {item.statements} | "
            f"{timestamp_text(item.first_seen)} | {timestamp_text(item.last_seen)} | "
            f"{_cell(columns) or '—'} |"
        )
    gaps = report.contract[0].gaps
    if gaps:
        lines += ["", "Evidence is incomplete: " + "; ".join(gaps) + "."]
    return [*lines, ""]


def _shadow(report: Report) -> list[str]:
    """Shadow reads: the application's reads replayed against the new schema."""
    summary = report.shadow
    if summary is None:
        return []
    compared = summary.compared
    rate = f"{1 - summary.mismatch_ratio:.2%}" if compared else "—"
    ratio = summary.latency_ratio
    latency = (
        f"p50 {ratio[0]:.2f}x, p90 {ratio[1]:.2f}x, p99 {ratio[2]:.2f}x" if ratio else "no samples"
    )
    lines = [
        "## Shadow reads",
        "",
        f"Match rate **{rate}** of {number_text(compared)} compared replays in "
        f"{len(summary.shapes)} statement shapes seen since "
        f"{timestamp_text(report.history_start)}; "
        f"noise {number_text(summary.total('noise'))}, errors "
        f"{number_text(summary.total('error'))}, unsafe {number_text(summary.total('unsafe'))}. "
        f"Latency new/old: {latency}.",
        "",
    ]
    worst = summary.top_mismatches()
    if worst:
        lines += [
            "| Fingerprint | Statement | Mismatched | Matched | Sample |",
            "|---|---|---|---|---|",
            *(
                f"| `{s.fingerprint}` | `{_cell(s.statement)}` | {s.counts['mismatch']} | "
                f"{s.counts['match']} | {_cell(json.dumps(s.samples.get('mismatch', {})))} |"
                for s in worst
            ),
            "",
        ]
    return lines


def _cell(text: str) -> str:
    """Table cells cannot hold a bare ``|``."""
    return text.replace("|", "\\|")
