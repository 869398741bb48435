"""The cutover report's Shadow reads: what the replays came to, and the two GO criteria.

Counts are what the control schema holds for every statement shape replayed since the history
window began (a shape's counts are kept since it was first replayed). Only matched and
mismatched replays are evidence: noise, errors and unsafe statements judge nothing.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from compare.report.format import number_text
from compare.report.model import Criterion
from core.config import Config, CutoverCriteria
from core.shadow import ShadowSummary, read_summary


def shadow_configured(config: Config) -> bool:
    """The report has a Shadow reads section: the shadow is on, or GO requires it."""
    return config.shadow.enabled or config.report.criteria.min_shadow_statements > 0


async def read_shadow(conn: asyncpg.Connection, since: datetime) -> ShadowSummary:
    return await read_summary(conn, since)


def shadow_criteria(summary: ShadowSummary, criteria: CutoverCriteria) -> list[Criterion]:
    """min_shadow_statements and max_shadow_mismatch_ratio, judged."""
    compared = summary.compared
    ratio = summary.mismatch_ratio
    worst = summary.top_mismatches(1)
    return [
        Criterion(
            name="shadow_statements",
            title="Shadow reads compared",
            measured=compared,
            measured_text=number_text(compared),
            threshold_text=f">= {criteria.min_shadow_statements}",
            passed=compared >= criteria.min_shadow_statements,
            detail=f"{len(summary.shapes)} statement shapes replayed",
        ),
        Criterion(
            name="shadow_mismatch_ratio",
            title="Shadow read mismatch ratio",
            measured=ratio,
            measured_text=f"{ratio:.4%}",
            threshold_text=f"<= {criteria.max_shadow_mismatch_ratio:.4%}",
            passed=ratio <= criteria.max_shadow_mismatch_ratio,
            detail=f"worst shape {worst[0].fingerprint}" if worst else "",
        ),
    ]
