"""The HTML report: one self-contained page (inline CSS and SVG, no scripts), made to print."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from html import escape

from compare.report import charts
from compare.report.criteria import CLEAN_WINDOW_DEFINITION, clean_streak, plural
from compare.report.format import duration_text, number_text, timestamp_text
from compare.report.model import (
    PHASES,
    Criterion,
    InvariantCheck,
    MappingReport,
    Pass,
    Report,
)
from compare.report.passes import history_passes, worst_pass_per_bucket

_CSS = """
:root { --go: #1e7b3c; --nogo: #b3261e; --ink: #1d1d1f; --muted: #666; --rule: #d9d9d9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 Helvetica, Arial, sans-serif; color: var(--ink); margin: 0 auto;
       max-width: 1080px; padding: 24px 32px 48px; }
h1 { font-size: 24px; margin: 0; }
h2 { font-size: 19px; margin: 0 0 4px; display: flex; align-items: center; gap: 10px; }
h3 { font-size: 14px; margin: 18px 0 4px; color: #333; }
p.meta, p.route { color: var(--muted); margin: 2px 0 10px; }
header { display: flex; align-items: center; gap: 20px; padding: 16px 20px; border-radius: 8px;
         border: 2px solid var(--rule); margin-bottom: 22px; }
header.go { border-color: var(--go); background: #eef8f1; }
header.nogo { border-color: var(--nogo); background: #fcefee; }
.badge { font-size: 30px; font-weight: 700; letter-spacing: .04em; color: #fff;
         padding: 8px 18px; border-radius: 6px; white-space: nowrap; }
.go .badge, .pill.go { background: var(--go); }
.nogo .badge, .pill.nogo { background: var(--nogo); }
.pill { color: #fff; font-size: 12px; font-weight: 700; padding: 2px 9px; border-radius: 10px;
        white-space: nowrap; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--rule);
         vertical-align: top; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.measured, td.threshold { white-space: nowrap; }
td.result { font-weight: 700; white-space: nowrap; }
td.pass { color: var(--go); }
td.fail { color: var(--nogo); }
tr.fail td { background: #fdf3f2; }
td.detail { color: var(--muted); font-size: 12.5px; }
section.mapping { border-top: 3px solid var(--rule); padding-top: 16px; margin-top: 26px; }
.chart { margin: 0 0 6px; }
.facts { display: flex; flex-wrap: wrap; gap: 6px 26px; color: #333; margin: 4px 0 6px;
         font-size: 13px; }
.facts b { font-variant-numeric: tabular-nums; }
.relaxed { border: 2px solid #c77700; background: #fff4e0; color: #5a3600; padding: 10px 16px;
           border-radius: 6px; margin: -8px 0 20px; font-size: 14.5px; }
td.changed { font-weight: 700; color: #c77700; }
footer { margin-top: 34px; color: var(--muted); font-size: 12px; border-top: 1px solid var(--rule);
         padding-top: 10px; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  * { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  header { break-inside: avoid; }
  section.mapping + section.mapping { break-before: page; border-top: none; margin-top: 0; }
  .chart, table, h3 { break-inside: avoid; }
  h3 { break-after: avoid; }
}
"""


def render_html(report: Report) -> str:
    """The whole page."""
    verdict_class = "go" if report.go else "nogo"
    body = [
        _header(report, verdict_class),
        _relaxed_banner(report),
        _summary(report),
        _tenants(report),
        *(_mapping_section(report, m) for m in report.mappings),
        _invariants(report),
        _contract(report),
        _shadow(report),
        _footer(report),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Cutover report: {report.verdict}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _header(report: Report, verdict_class: str) -> str:
    go_count = sum(m.go for m in report.mappings)
    return (
        f'<header class="{verdict_class}"><div class="badge">{report.verdict}</div><div>'
        f"<h1>Cutover report</h1>"
        f'<p class="meta">{go_count} of {plural(len(report.mappings), "mapping")} ready · database '
        f"<b>{escape(report.database)}</b> · generated {timestamp_text(report.generated_at)}</p>"
        f'<p class="meta">Criteria window from {timestamp_text(report.window_start)} · history '
        f"from {timestamp_text(report.history_start)} in "
        f"{duration_text(report.bucket.total_seconds())} buckets</p></div></header>"
    )


def _relaxed_banner(report: Report) -> str:
    if not report.relaxed:
        return ""
    return (
        '<div class="relaxed" role="note"><b>Relaxed criteria:</b> '
        f"{escape('; '.join(report.relaxed))}. A GO here is not a production GO.</div>"
    )


def _summary(report: Report) -> str:
    rows = "".join(
        f"<tr><td><b>{escape(m.name)}</b></td><td>{escape(m.source)} → {escape(m.target)}</td>"
        f"<td>{escape(m.mode)}</td><td>{_pill(m.go, m.verdict)}</td>"
        f"<td>{escape(', '.join(c.title for c in m.failed)) or '—'}</td></tr>"
        for m in report.mappings
    )
    overall = ""
    if report.overall_criteria:
        overall = "<h3>Deployment</h3>" + _criteria_table(report.overall_criteria)
    return (
        "<section><h2>Summary</h2><table><thead><tr><th>Mapping</th><th>Route</th><th>Mode</th>"
        f"<th>Verdict</th><th>Failing criteria</th></tr></thead><tbody>{rows}</tbody></table>"
        f"{overall}</section>"
    )


def _mapping_section(report: Report, mapping: MappingReport) -> str:
    return "\n".join(
        [
            f'<section class="mapping" id="{escape(mapping.name)}">',
            f"<h2>{escape(mapping.name)} {_pill(mapping.go, mapping.verdict)}</h2>",
            f'<p class="route">{escape(mapping.source)} → {escape(mapping.target)} · mode '
            f"{escape(mapping.mode)}</p>",
            _criteria_table(mapping.criteria),
            *_history(report, mapping),
            _repairs(mapping),
            _live(mapping),
            "</section>",
        ]
    )


def _criteria_table(criteria: Iterable[Criterion]) -> str:
    rows = "".join(
        f'<tr class="{"pass" if c.passed else "fail"}"><td>{escape(c.title)}</td>'
        f'<td class="measured">{escape(c.measured_text)}</td>'
        f'<td class="threshold">{escape(c.threshold_text)}</td>'
        f'<td class="result {"pass" if c.passed else "fail"}">'
        f'{"✔ PASS" if c.passed else "✘ FAIL"}</td>'
        f'<td class="detail">{escape(c.detail)}</td></tr>'
        for c in criteria
    )
    return (
        "<table><thead><tr><th>Criterion</th><th>Measured</th><th>Threshold</th><th>Result</th>"
        f"<th>Detail</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _history(report: Report, mapping: MappingReport) -> list[str]:
    facts = mapping.facts
    passes = history_passes(report, mapping)
    starts = [b.start for b in facts.activity]
    return [
        f"<h3>Reconcile passes, last {duration_text(report.history_span.total_seconds())}</h3>",
        _pass_facts(passes, facts.unfinished_passes),
        f'<div class="chart">{_timeline(report, mapping)}</div>',
        "<h3>Divergent rows by class (worst pass in each bucket)</h3>",
        f'<div class="chart">{_divergence_chart(report, mapping, starts)}</div>',
        "<h3>Mirror volume</h3>",
        _activity_facts(mapping),
        f'<div class="chart">{_volume_chart(report, mapping, starts)}</div>',
        "<h3>Mirror failures and unmirrored statements</h3>",
        f'<div class="chart">{_failure_chart(report, mapping, starts)}</div>',
        _recent_passes(passes),
    ]


def _pass_facts(passes: list[Pass], unfinished: int) -> str:
    clean = sum(p.clean for p in passes)
    return (
        f'<div class="facts"><span>finished <b>{len(passes)}</b></span>'
        f"<span>clean <b>{clean}</b></span><span>divergent <b>{len(passes) - clean}</b></span>"
        f"<span>failed or interrupted <b>{unfinished}</b></span></div>"
    )


def _timeline(report: Report, mapping: MappingReport) -> str:
    streak = clean_streak(
        mapping.facts.passes, report.generated_at, report.max_gap, mapping.facts.repairs
    )
    span = None
    if streak.passes:
        span = (min(p.started_at for p in streak.passes), streak.passes[0].finished_at)
    runs = [(p.started_at, p.finished_at, _kind(p)) for p in history_passes(report, mapping)]
    starts = [b.start for b in mapping.facts.activity]
    if not starts:
        starts = [report.history_start]
    # the bar charts' time axis: the same range and the same ticks on every chart of the page
    return charts.pass_timeline(
        runs,
        starts[0],
        starts[-1] + report.bucket,
        streak=span,
        required=report.window_span,
        label=f"{mapping.name}: reconcile passes over time",
        now=report.generated_at,
        ticks=charts.axis_ticks(starts),
    )


def _kind(run: Pass) -> str:
    if not run.clean:
        return "divergent"
    return "clean" if run.full else "partial"


def _divergence_chart(report: Report, mapping: MappingReport, starts: list[datetime]) -> str:
    last = worst_pass_per_bucket(history_passes(report, mapping), starts, report.bucket)
    series = [
        charts.Series(name, color, [float(getattr(p, name)) if p else 0.0 for p in last])
        for name, color in (("missing", "#d0392b"), ("extra", "#e67e22"), ("changed", "#8e44ad"))
    ]
    return charts.bar_chart(
        starts,
        report.bucket,
        series,
        label=f"{mapping.name}: divergent rows by class",
        markers=[p is not None and p.clean for p in last],
        marker_label="clean pass",
        empty_note="no divergence found" if any(last) else "no pass finished in this period",
    )


def _volume_chart(report: Report, mapping: MappingReport, starts: list[datetime]) -> str:
    activity = mapping.facts.activity
    return charts.bar_chart(
        starts,
        report.bucket,
        [charts.Series("rows mirrored", "#2f6db5", [float(b.rows) for b in activity])],
        label=f"{mapping.name}: rows mirrored per bucket",
    )


def _failure_chart(report: Report, mapping: MappingReport, starts: list[datetime]) -> str:
    activity = mapping.facts.activity
    failures = [float(b.failures) for b in activity]
    unmirrored = [float(b.unmirrored) for b in activity]
    return charts.bar_chart(
        starts,
        report.bucket,
        [
            charts.Series("mirror failures", "#d0392b", failures),
            charts.Series("unmirrored statements", "#e67e22", unmirrored),
        ],
        label=f"{mapping.name}: mirror failures and unmirrored statements",
        empty_note="none recorded",
    )


def _activity_facts(mapping: MappingReport) -> str:
    activity = mapping.facts.activity
    totals = {
        "statements": sum(b.statements for b in activity),
        "rows": sum(b.rows for b in activity),
        "failures": sum(b.failures for b in activity),
        "unmirrored": sum(b.unmirrored for b in activity),
    }
    return '<div class="facts">' + "".join(
        f"<span>{name} <b>{number_text(value)}</b></span>" for name, value in totals.items()
    ) + "</div>"


def _recent_passes(passes: list[Pass], limit: int = 10) -> str:
    if not passes:
        return ""
    rows = "".join(
        f"<tr><td>#{p.id}</td><td>{timestamp_text(p.finished_at)}</td>"
        f"<td class=\"num\">{duration_text((p.finished_at - p.started_at).total_seconds())}</td>"
        f'<td class="num">{number_text(p.rows_compared)}</td><td class="num">{p.missing}</td>'
        f'<td class="num">{p.extra}</td><td class="num">{p.changed}</td>'
        f'<td class="num">{p.pending}</td><td class="num">{p.dead_lettered}</td>'
        f'<td class="result {"pass" if p.clean else "fail"}">{"clean" if p.clean else "divergent"}'
        f'{"" if p.full else " (one tenant)"}</td></tr>'
        for p in passes[:limit]
    )
    return (
        f"<h3>Latest passes ({min(limit, len(passes))} of {len(passes)})</h3><table><thead><tr>"
        "<th>Pass</th><th>Finished</th><th>Took</th><th>Rows</th><th>Missing</th><th>Extra</th>"
        "<th>Changed</th><th>Pending</th><th>Dead-lettered</th><th>Outcome</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
    )


def _repairs(mapping: MappingReport) -> str:
    """The repairs on record in the look-back: each one restarts the clean window."""
    repairs = mapping.facts.repairs
    if not repairs:
        return ""
    rows = "".join(
        f"<tr><td>#{r.id}</td><td>{escape(timestamp_text(r.at))}</td>"
        f"<td>{escape(r.requested_by or '-')}</td><td>{escape(r.reason or '-')}</td>"
        f'<td class="num">{number_text(r.keys)}</td><td class="num">{number_text(r.upserted)}</td>'
        f'<td class="num">{number_text(r.deleted)}</td>'
        f'<td class="num">{number_text(r.divergent_after)}</td></tr>'
        for r in repairs
    )
    return (
        f"<h3>Repairs since {escape(timestamp_text(mapping.facts.passes_since))}</h3>"
        '<p class="route">Each repair restarts the clean window; row images: '
        "<code>dualwrite repairs --images</code>.</p><table><thead><tr><th>Repair</th>"
        "<th>At</th><th>By</th><th>Why</th><th>Keys</th><th>Upserted</th><th>Deleted</th>"
        f"<th>Still divergent</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _live(mapping: MappingReport) -> str:
    if mapping.live is None:
        return ""
    shown = {k: v for k, v in mapping.live.items() if not isinstance(v, dict | list)}
    items = "".join(f"<span>{escape(k)} <b>{escape(str(v))}</b></span>" for k, v in shown.items())
    return f'<h3>Live sidecar status</h3><div class="facts">{items}</div>'


#: tenants listed in the table (NO-GO ones first); the rest are counted
TENANT_ROWS = 100


def _tenants(report: Report) -> str:
    """Per tenant: its own evidence and verdict (mappings with a tenant_column)."""
    if not report.tenants:
        return ""
    go = sum(t.go for t in report.tenants)
    focus = ""
    if report.tenant is not None:
        found = report.tenant_report(report.tenant)
        focus = (
            f'<p><b>Tenant {escape(report.tenant)}:</b> '
            f"{_pill(found is not None and found.go, found.verdict if found else 'NO-GO')}"
            " (the exit status follows it)</p>"
        )
    rows = "".join(
        f'<tr class="{"pass" if t.go else "fail"}"><td><b>{escape(t.label)}</b></td>'
        f"<td>{_pill(t.go, t.verdict)}</td>"
        + "".join(f'<td class="num">{t.divergent[c]}</td>' for c in ("missing", "extra", "changed"))
        + f'<td class="num">{t.dead_letters}</td><td class="num">{t.invariant_failures}</td>'
        f'<td class="num">{t.shadow_mismatches}</td>'
        f'<td class="detail">{escape(", ".join(c.title for c in t.failed)) or "—"}</td></tr>'
        for t in report.tenants[:TENANT_ROWS]
    )
    if any(t.phase for t in report.tenants):
        focus = f"<p>{escape(PHASES)}</p>{focus}"
    hidden = len(report.tenants) - TENANT_ROWS
    more = f"<p>… and {plural(hidden, 'more tenant')}.</p>" if hidden > 0 else ""
    return (
        '<section class="tenants" id="tenants"><h2>Tenants</h2>'
        f'<p class="meta">{go} of {plural(len(report.tenants), "tenant")} GO. Each tenant is '
        "judged on its own rows (divergence, dead letters, invariant groups, shadow reads "
        "attributed to it) plus every "
        "criterion that cannot be told apart by tenant (outbox age, backfill, pause, "
        "unmirrored statements, ...)."
        f"</p>{focus}<table><thead><tr><th>Tenant</th><th>Verdict</th><th>Missing</th>"
        "<th>Extra</th><th>Changed</th><th>Dead letters</th><th>Invariant groups</th>"
        "<th>Shadow mismatches</th>"
        f"<th>Failing criteria</th></tr></thead><tbody>{rows}</tbody></table>{more}</section>"
    )


def _invariants(report: Report) -> str:
    """Business invariants: each one's latest full check, then its first failing groups."""
    if not report.invariants:
        return ""
    rows = "".join(
        f'<tr class="{"pass" if _held(c) else "fail"}"><td><b>{escape(c.name)}</b>'
        f'<div class="detail">{escape(c.description)}</div></td><td>{escape(c.scope)}</td>'
        f"<td>{escape(c.kind)}</td><td>{escape(timestamp_text(c.finished_at))}</td>"
        f'<td class="num">{"—" if c.kind == "new_only" else number_text(c.groups_checked)}</td>'
        f'<td class="num">{number_text(c.groups_failed)}</td>'
        f'<td class="result {"pass" if _held(c) else "fail"}">{_invariant_result(c)}</td></tr>'
        for c in report.invariants
    )
    failing = "".join(
        f"<tr><td>{escape(c.name)}</td><td>"
        + escape(", ".join(f"{k}={v}" for k, v in f.group.items()))
        + f"</td><td>{escape(', '.join(c.value_columns))}</td>"
        f"<td>{escape(_values(f.old))}</td><td>{escape(_values(f.new))}</td></tr>"
        for c in report.invariants
        for f in c.failures
    )
    samples = (
        "<h3>Failing groups (first of each check)</h3><table><thead><tr><th>Invariant</th>"
        f"<th>Group</th><th>Figures</th><th>Old</th><th>New</th></tr></thead>"
        f"<tbody>{failing}</tbody></table>"
        if failing
        else ""
    )
    return (
        '<section class="invariants" id="invariants"><h2>Business invariants</h2>'
        "<table><thead><tr><th>Invariant</th><th>Scope</th><th>Kind</th><th>Last checked</th>"
        "<th>Groups</th><th>Failing</th><th>Result</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{samples}</section>"
    )


def _held(check: InvariantCheck) -> bool:
    return check.status == "done" and check.groups_failed == 0


def _invariant_result(check: InvariantCheck) -> str:
    if check.status is None:
        return "✘ never checked"
    if check.status != "done":
        return "✘ check failed"
    return "✔ held" if check.groups_failed == 0 else "✘ broken"


def _values(values: list[object] | None) -> str:
    return "absent" if values is None else ", ".join(str(v) for v in values)


def _contract(report: Report) -> str:
    """Contract readiness: what of the old relations the application still uses."""
    if not report.contract:
        return ""
    rows = "".join(
        f"<tr><td>{escape(r.mapping)}</td><td><code>{escape(r.relation)}</code></td>"
        f"<td>{r.statements}</td><td>{escape(timestamp_text(r.first_seen))}</td>"
        f"<td>{escape(timestamp_text(r.last_seen))}</td><td>"
        + escape(", ".join(f"{c} ({timestamp_text(t)})" for c, t in r.columns.items()) or "—")
        + "</td></tr>"
        for r in report.contract
    )
    gaps = report.contract[0].gaps
    note = f"<p>Evidence is incomplete: {escape('; '.join(gaps))}.</p>" if gaps else ""
    return (
        "<section><h2>Contract readiness</h2><p>Application statements that referenced each "
        f"mapping's source since {escape(timestamp_text(report.history_start))} (traffic "
        "recorded by the sidecars).</p><table><tr><th>Mapping</th><th>Old relation</th>"
        "<th>Statement shapes</th><th>First seen</th><th>Last seen</th><th>Columns (last "
        f"seen)</th></tr>{rows}</table>{note}</section>"
    )


def _shadow(report: Report) -> str:
    """Shadow reads: the application's reads replayed against the new schema."""
    summary = report.shadow
    if summary is None:
        return ""
    compared = summary.compared
    rate = f"{1 - summary.mismatch_ratio:.2%}" if compared else "—"
    ratio = summary.latency_ratio
    latency = (
        f"p50 {ratio[0]:.2f}x, p90 {ratio[1]:.2f}x, p99 {ratio[2]:.2f}x" if ratio else "no samples"
    )
    rows = "".join(
        f"<tr><td><code>{escape(s.fingerprint)}</code></td><td><code>{escape(s.statement)}"
        f"</code></td><td>{s.counts['mismatch']}</td><td>{s.counts['match']}</td><td><code>"
        f"{escape(json.dumps(s.samples.get('mismatch', {})))}</code></td></tr>"
        for s in summary.top_mismatches()
    )
    table = (
        "<table><tr><th>Fingerprint</th><th>Statement</th><th>Mismatched</th><th>Matched</th>"
        f"<th>Sample</th></tr>{rows}</table>"
        if rows
        else ""
    )
    return (
        f"<section><h2>Shadow reads</h2><p>Match rate <b>{rate}</b> of {number_text(compared)} "
        f"compared replays in {len(summary.shapes)} statement shapes; noise "
        f"{number_text(summary.total('noise'))}, errors {number_text(summary.total('error'))}, "
        f"unsafe {number_text(summary.total('unsafe'))}. Latency new/old: {escape(latency)}."
        f"</p>{table}</section>"
    )


def _settings(report: Report) -> str:
    """Every criterion's configured value beside the production default."""
    rows = "".join(
        f"<tr><td>{escape(name)}</td>"
        f'<td class="{"changed" if configured != default else ""}">{escape(configured)}</td>'
        f"<td>{escape(default)}</td></tr>"
        for name, configured, default in report.settings
    )
    return (
        "<h3>Criteria settings</h3><table><thead><tr><th>Criterion</th><th>Configured</th>"
        f"<th>Production default</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _footer(report: Report) -> str:
    return (
        f"<footer>{_settings(report)}<p><b>How the verdict is reached.</b> "
        f"{escape(CLEAN_WINDOW_DEFINITION)} "
        f"Allowed gap between passes: {duration_text(report.max_gap.total_seconds())}.</p>"
        "<p>Generated by <code>dualwrite report</code> from the dualwrite control schema.</p>"
        "</footer>"
    )


def _pill(go: bool, verdict: str) -> str:
    return f'<span class="pill {"go" if go else "nogo"}">{verdict}</span>'
