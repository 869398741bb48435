"""The cutover report's Shadow reads: what the replays came to, and the two GO criteria.

Counts are what the control schema holds for every statement shape replayed since the history
window began (a shape's counts are kept since it was first replayed). Only matched and
mismatched replays are evidence: noise, errors and unsafe statements judge nothing.

Per tenant (a mapping has a ``tenant_column``), the mismatch ratio is judged again on the
replays attributed to the tenant plus those attributed to no tenant (which could concern any
tenant); another tenant's mismatches do not count against it. ``min_shadow_statements`` stays a
deployment criterion: a tenant with few reads is not held back for lack of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import asyncpg

from compare.report.format import number_text
from compare.report.model import Criterion
from core.config import Config, CutoverCriteria
from core.shadow import ShadowSummary, TenantShadow, read_summary, read_tenants


def shadow_configured(config: Config) -> bool:
    """The report has a Shadow reads section: the shadow is on, or GO requires it."""
    return config.shadow.enabled or config.report.criteria.min_shadow_statements > 0


async def read_shadow(conn: asyncpg.Connection, since: datetime) -> ShadowSummary:
    return await read_summary(conn, since)


async def read_shadow_tenants(
    conn: asyncpg.Connection, since: datetime
) -> dict[str | None, TenantShadow]:
    return await read_tenants(conn, since)


def tenant_shadow_criterion(
    tenant: str, per_tenant: Mapping[str | None, TenantShadow], criteria: CutoverCriteria
) -> Criterion:
    """max_shadow_mismatch_ratio over the tenant's replays and the unattributed ones."""
    mine, shared = per_tenant.get(tenant), per_tenant.get(None)
    own = mine.counts["mismatch"] if mine else 0
    unattributed = shared.counts["mismatch"] if shared else 0
    compared = (mine.compared if mine else 0) + (shared.compared if shared else 0)
    ratio = (own + unattributed) / compared if compared else 0.0
    detail = f"{own} of this tenant's replays mismatched, {unattributed} unattributed"
    if mine is not None and mine.last_mismatch:
        detail += f"; latest mismatching shape {mine.last_mismatch}"
    return Criterion(
        name="shadow_mismatch_ratio",
        title="Shadow read mismatch ratio (this tenant's and unattributed reads)",
        measured=ratio,
        measured_text=f"{ratio:.4%}",
        threshold_text=f"<= {criteria.max_shadow_mismatch_ratio:.4%}",
        passed=ratio <= criteria.max_shadow_mismatch_ratio,
        detail=detail,
    )


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
