"""Builds the report: reads the control schema (and the sidecar's /status when given), judges it.

The database session is read-only (``default_transaction_read_only``) and every query runs in
one repeatable-read snapshot, so the figures agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from compare.report.criteria import Window, criteria_settings, invariant, judge, relaxed
from compare.report.format import pick_bucket
from compare.report.history import (
    database_now,
    dead_letters_by_tenant,
    read_facts,
    read_invariant,
)
from compare.report.model import Criterion, MappingReport, Report
from compare.report.readiness import read_readiness
from compare.report.shadow import (
    read_shadow,
    read_shadow_tenants,
    shadow_configured,
    shadow_criteria,
)
from compare.report.tenants import TenantEvidence, judge_tenants
from core.config import Config
from core.connect import connect
from core.control import ensure_current
from core.errors import ConfigError, DatabaseUnreachable
from core.mapping import compile_all

STATUS_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class ReportRequest:
    """What the operator asked for on the command line."""

    since: timedelta = timedelta(hours=24)
    #: None: derived from the config (see :func:`default_max_gap`)
    max_gap: timedelta | None = None
    status_url: str | None = None
    #: judge this tenant (its verdict decides the exit status)
    tenant: str | None = None


def default_max_gap(config: Config) -> timedelta:
    """The longest tolerated stretch without a reconcile pass.

    Twice the continuous reconcile interval when one is configured (one pass may be missed),
    else a quarter of the clean window, but never under an hour.
    """
    interval = config.reconcile.interval_seconds
    if interval is not None:
        return timedelta(seconds=2 * interval)
    quarter = timedelta(hours=config.report.criteria.clean_window_hours / 4)
    return max(timedelta(hours=1), quarter)


def passes_lookback(
    config: Config, since: timedelta = timedelta(hours=24), max_gap: timedelta | None = None
) -> timedelta:
    """How far back the report reads passes: the history shown, or two clean windows and a
    gap (a window may be walked from any pass inside it), whichever is longer."""
    clean = timedelta(hours=config.report.criteria.clean_window_hours)
    return max(since, 2 * clean + (max_gap or default_max_gap(config)))


async def build_report(config: Config, request: ReportRequest) -> Report:
    """Read everything, judge every mapping; raise ConfigError when nothing can be read."""
    if not config.mappings:
        raise ConfigError("mappings", "no mappings configured: nothing to report on")
    if request.tenant is not None and not any(m.tenant_column for m in config.mappings):
        raise ConfigError("--tenant", "no mapping has a tenant_column")
    conn = await _connect(config)
    try:
        await ensure_current(conn)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            report = await _read(conn, config, request)
    except asyncpg.PostgresError as exc:  # e.g. a role without SELECT on the control schema
        raise ConfigError("service_dsn", f"cannot read the control schema: {exc}") from None
    finally:
        await conn.close()
    if request.status_url:
        await _add_live_status(report, request.status_url)
    return report


async def _connect(config: Config) -> asyncpg.Connection:
    dsn = config.effective_service_dsn()
    try:
        return await connect(
            dsn,
            timeout=config.upstream.connect_timeout_seconds,
            server_settings={
                "application_name": "dualwrite-report",
                "default_transaction_read_only": "on",
            },
        )
    except DatabaseUnreachable as exc:
        raise DatabaseUnreachable(f"service_dsn: {exc}") from None


async def _read(conn: asyncpg.Connection, config: Config, request: ReportRequest) -> Report:
    now = await database_now(conn)
    criteria = config.report.criteria
    window = Window(
        now=now,
        clean_window=timedelta(hours=criteria.clean_window_hours),
        max_gap=request.max_gap or default_max_gap(config),
    )
    history_start = now - request.since
    bucket = pick_bucket(request.since)
    lookback = passes_lookback(config, request.since, window.max_gap)
    checks = [await read_invariant(conn, i, None) for i in config.invariants]
    checks += [
        await read_invariant(conn, i, m.name) for m in config.mappings for i in m.invariants
    ]
    mappings = []
    for mapping in config.mappings:
        facts = await read_facts(
            conn,
            mapping.name,
            passes_since=now - lookback,
            history_start=history_start,
            window_start=window.start,
            bucket=bucket,
            now=now,
        )
        mappings.append(
            MappingReport(
                name=mapping.name,
                source=mapping.source,
                target=mapping.target,
                mode=mapping.mode,
                criteria=judge(facts, criteria, window)
                + [invariant(c, criteria, window) for c in checks if c.mapping == mapping.name],
                facts=facts,
            )
        )
    overall = [invariant(c, criteria, window) for c in checks if c.mapping is None]
    tenant_mappings = [
        (m, c) for m, c in zip(mappings, compile_all(config), strict=True) if c.config.tenant_column
    ]
    tenants = []
    if tenant_mappings:
        names = {m.name for m, _ in tenant_mappings}
        evidence = TenantEvidence(
            mappings=[m for m, _ in tenant_mappings],
            dead_letters={
                c.name: await dead_letters_by_tenant(conn, c) for _, c in tenant_mappings
            },
            checks=[c for c in checks if c.mapping is None or c.mapping in names],
            overall=overall,
            directions={
                **dict.fromkeys(config.cutover.reverse, "forward"),
                **dict.fromkeys(config.cutover.reverse.values(), "reverse"),
            },
            moved=frozenset(config.cutover.tenants) if config.cutover.reverse else None,
            named=[
                *config.report.tenants,
                *config.cutover.tenants,
                *([request.tenant] if request.tenant else []),
            ],
            shadow=(
                await read_shadow_tenants(conn, history_start)
                if shadow_configured(config)
                else None
            ),
        )
        tenants = judge_tenants(evidence, criteria, window)
    report = Report(
        generated_at=now,
        database=_safe_dsn(config.effective_service_dsn()),
        window_start=window.start,
        history_start=history_start,
        max_gap=window.max_gap,
        bucket=bucket,
        thresholds=criteria.model_dump(),
        mappings=mappings,
        contract=await read_readiness(conn, config.mappings, history_start, config.search_path),
        overall_criteria=overall,
        invariants=checks,
        tenants=tenants,
        tenant=request.tenant,
        relaxed=relaxed(criteria),
        settings=criteria_settings(criteria),
    )
    if shadow_configured(config):
        report.shadow = await read_shadow(conn, history_start)
        for criterion in shadow_criteria(report.shadow, criteria):
            if criterion.name == "shadow_mismatch_ratio" and report.tenants:
                # each tenant has its own (compare/report/tenants.py)
                report.overall_criteria.append(criterion)
            else:
                _add_overall(report, criterion)
    return report


async def _add_live_status(report: Report, url: str) -> None:
    """Attach the sidecar's /status; an unreachable sidecar is a failed overall criterion."""
    url = status_endpoint(url)
    report.status_url = url
    try:
        report.status = await fetch_status(url)
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
        _add_overall(report, _status_criterion(False, f"{type(exc).__name__}: {exc}"))
        return
    live = report.status.get("mappings") or {}
    for mapping in report.mappings:
        mapping.live = live.get(mapping.name)
    missing = [m.name for m in report.mappings if m.live is None]
    detail = f"mappings not served by this sidecar: {', '.join(missing)}" if missing else ""
    _add_overall(report, _status_criterion(not missing, detail))


def _add_overall(report: Report, criterion: Criterion) -> None:
    """A deployment criterion counts for the whole report and for every tenant."""
    report.overall_criteria.append(criterion)
    for tenant in report.tenants:
        tenant.criteria.append(criterion)


def _status_criterion(passed: bool, detail: str) -> Criterion:
    return Criterion(
        name="sidecar_status",
        title="Sidecar /status answers and serves every mapping",
        measured="ok" if passed else "failed",
        measured_text="ok" if passed else "failed",
        threshold_text="ok",
        passed=passed,
        detail=detail,
    )


async def fetch_status(url: str) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        response.raise_for_status()
        body = await response.json(content_type=None)
    if not isinstance(body, dict):
        raise TypeError("/status did not return a JSON object")
    return body


def status_endpoint(url: str) -> str:
    """``http://host:9187`` -> ``http://host:9187/status``; a URL with a path is kept."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        parts = parts._replace(path="/status")
    return urlunsplit(parts)


def _safe_dsn(dsn: str) -> str:
    """The DSN without user or password: host, port and database."""
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{host}{port}{parts.path}"

