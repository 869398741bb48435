"""Which reconcile passes the report shows: those in the history window, the worst per bucket."""

from __future__ import annotations

from datetime import datetime, timedelta

from compare.report.model import MappingReport, Pass, Report


def history_passes(report: Report, mapping: MappingReport) -> list[Pass]:
    """The finished passes inside the history window, newest first."""
    return [p for p in mapping.facts.passes if p.finished_at >= report.history_start]


def worst_pass_per_bucket(
    passes: list[Pass], starts: list[datetime], bucket: timedelta
) -> list[Pass | None]:
    """For each bucket, the pass that finished in it with the most divergent rows (a clean
    pass only when all of them were clean; None: no pass finished there)."""
    found: list[Pass | None] = [None] * len(starts)
    if not starts:
        return found
    for run in passes:
        index = int((run.finished_at - starts[0]) / bucket)
        if 0 <= index < len(starts) and _worse(run, found[index]):
            found[index] = run
    return found


def _worse(run: Pass, than: Pass | None) -> bool:
    if than is None:
        return True
    return (not run.clean, run.divergent) > (not than.clean, than.divergent)
