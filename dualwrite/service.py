"""Service wiring for ``dualwrite run`` and ``apply``: start the parts in order, stop in reverse.

Order on start: compile mappings, connect the service pool, check the control schema,
validate every mapping against the live database, then the applier, the admin server and
last the proxy (no client is accepted before the mappings are known good). Stop is the
reverse, with the proxy draining open transactions first.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from compare.continuous import ContinuousReconciler
from compare.invariants import export_invariant_gauges, validate_invariants
from compare.reconciler import PassOptions, reconcile_mapping
from compare.report.gather import passes_lookback
from compare.report.history import (
    database_now,
    export_gauges,
    export_tenant_gauges,
    latest_runs,
    tenant_trouble,
    tenants_of_passes,
)
from core import cutover, metrics, nullcheck
from core.catalog import StatementsOf, foreign_rows_problem, validate_all
from core.config import Config
from core.connect import connect, create_pool
from core.control import (
    ActivityRecorder,
    MappingStates,
    StateWatcher,
    create_delete_functions,
    current_version,
    ensure_current,
    install,
    latest_version,
    load_paused,
    set_paused,
)
from core.errors import ConfigError, MappingValidationError
from core.logs import get_logger
from core.mapping import CompiledMapping, compile_all
from core.privileges import app_role_problems, grant
from core.rowsecurity import SESSION_SETTINGS, connect_unfiltered
from core.shadow import check_views
from dualwrite.admin import ActionResponse, ActionResult, AdminHooks, AdminServer
from mirror import statements as key_sync_statements
from mirror.applier import Applier
from mirror.wal import keys as wal_keys
from mirror.wal import slot as wal_slot
from mirror.wal.reader import WalReader
from proxy import mirror_sql
from proxy.host import MirrorContext
from proxy.rewrite import Rewriter
from proxy.server import ProxyServer
from proxy.shadow.supervisor import ShadowProcess
from proxy.shadow.tap import ShadowTap
from proxy.shadow.worker import WorkerSettings
from proxy.traffic import TrafficRecorder

_log = get_logger("service")

#: the reconcile and backfill gauges are re-read from the control schema at most this often
GAUGE_REFRESH_SECONDS = 5.0
#: runs one reconcile pass over a mapping: (mapping, requested_by)
ReconcileRunner = Callable[[CompiledMapping, str], Awaitable[object]]
#: what the sidecar runs for a mapping, prepared when mappings are validated: the rewrite's
#: statements and sync_keys' (the applier's)
SIDECAR_STATEMENTS: tuple[StatementsOf, ...] = (
    mirror_sql.statements_to_prepare,
    key_sync_statements.statements_to_prepare,
    wal_keys.statements_to_prepare,
)


async def upstream_reachable(config: Config) -> tuple[bool, str]:
    """Readiness: a TCP connection to the upstream server opens."""
    upstream = config.upstream
    try:
        async with asyncio.timeout(upstream.connect_timeout_seconds):
            _, writer = await asyncio.open_connection(upstream.host, upstream.port)
    except (OSError, TimeoutError) as exc:
        return False, f"{upstream.host}:{upstream.port}: {exc}"
    writer.close()
    return True, f"{upstream.host}:{upstream.port}"


def sidecar_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


async def connect_service(config: Config, **kwargs: Any) -> asyncpg.Connection:
    """One connection as the sidecar's own service role (row_security off: see
    core/rowsecurity.py)."""
    settings = {**SESSION_SETTINGS, **kwargs.pop("server_settings", {})}
    return await connect(config.effective_service_dsn(), server_settings=settings, **kwargs)


async def create_service_pool(config: Config, *, size: int) -> asyncpg.Pool:
    return await create_pool(
        config.effective_service_dsn(),
        min_size=1,
        max_size=size,
        # The applier's statements are prepared once and run against tables that grow from
        # empty: a generic plan made early would seq-scan the target forever after.
        server_settings={
            "application_name": "dualwrite",
            "plan_cache_mode": "force_custom_plan",
            **SESSION_SETTINGS,
        },
    )


async def validated_mappings(
    conn: asyncpg.Connection, config: Config, *, require_functions: bool = True
) -> list[CompiledMapping]:
    """Compile, validate and bind every mapping."""
    compiled = compile_all(config)
    return await validate_all(
        conn,
        compiled,
        config.search_path,
        connect_unfiltered,
        statements=SIDECAR_STATEMENTS,
        require_functions=require_functions,
    )


async def check_live(config: Config) -> list[str]:
    """``check`` without --offline: upstream reachable, control schema, mappings valid."""
    ok, detail = await upstream_reachable(config)
    if not ok:
        raise ConfigError("upstream", f"not reachable: {detail}")
    lines = [f"upstream {detail}: reachable"]
    if not config.mappings and not config.shadow.views:
        return lines
    conn = await connect_service(config)
    try:
        version = await current_version(conn)
        mappings: list[CompiledMapping] = []
        if version < latest_version():
            lines.append(
                f"control schema: at version {version}, needs {latest_version()}: step still "
                "to do: `dualwrite setup --config FILE` (validated below as setup would leave it)"
            )
            if config.mappings:
                mappings = await _validated_as_after_setup(conn, config)
        elif config.mappings:
            mappings = await validated_mappings(conn, config)
        if mappings:
            await wal_slot.require_ready(conn, config.wal, wal_slot.wal_mappings(mappings))
            for mapping in mappings:
                problem = await foreign_rows_problem(conn, mapping)
                if problem is not None:
                    raise MappingValidationError(mapping.name, problem)
            lines += [
                f"mapping {m.name}: {m.source} -> {m.target} ({describe(m)}) ok"
                for m in mappings
            ]
            lines += await nullcheck.check_lines(conn, mappings)
            lines += await cutover.check_lines(conn, mappings, config.cutover.tenants)
        lines += await check_views(conn, config.shadow.views)
        if mappings and config.app_role:
            lines += await _check_app_role(conn, config.app_role, mappings)
    finally:
        await conn.close()
    return lines + await validate_invariants(config)


async def _validated_as_after_setup(
    conn: asyncpg.Connection, config: Config
) -> list[CompiledMapping]:
    """Rehearse ``setup`` in a transaction that is rolled back, and validate inside it.

    ``check`` before ``setup`` (the runbook's order) thus still validates every mapping,
    including the statements that need the control schema and the delete functions.
    """
    rehearsal = conn.transaction()
    await rehearsal.start()
    try:
        await install(conn)
        mappings = await validated_mappings(conn, config, require_functions=False)
        await create_delete_functions(conn, mappings)
        mappings = await validated_mappings(conn, config)
    finally:
        await rehearsal.rollback()
    return mappings


def describe(mapping: CompiledMapping) -> str:
    """``outbox`` or ``outbox, capture wal``: how a mapping is mirrored, for command output."""
    if mapping.capture.reads_wal:
        return f"{mapping.mode}, capture {mapping.capture}"
    return str(mapping.mode)


async def _check_app_role(
    conn: asyncpg.Connection, role: str, mappings: list[CompiledMapping]
) -> list[str]:
    """``check``: the application role can run every statement the rewrite generates."""
    missing, skipped = await app_role_problems(conn, role, mappings)
    if skipped is not None:
        return [skipped]
    if missing:
        mapping, _ = missing[0]
        lacks = "; ".join(what for _, what in missing)
        reason = (
            f"app_role {role} cannot run the mirrored statements: it lacks {lacks}. "
            "Run `dualwrite setup --config FILE` (it grants them)"
        )
        if mapping is None:
            raise ConfigError("app_role", reason)
        raise MappingValidationError(mapping, reason)
    return [f"app_role {role}: can run every mirrored statement"]


async def setup(config: Config) -> list[str]:
    """``dualwrite setup``: install the control schema, validate mappings, grant app_role."""
    conn = await connect_service(config)
    try:
        applied = await install(conn)
        lines = [
            f"control schema: applied versions {applied}"
            if applied
            else "control schema: already current"
        ]
        mappings = await validated_mappings(conn, config, require_functions=False)
        await create_delete_functions(conn, mappings)
        lines += [
            f"mapping {m.name}: {m.source} -> {m.target} ({describe(m)}) ok"
            for m in mappings
        ]
        lines += await setup_wal(conn, config, mappings)
        lines += await nullcheck.setup_warnings(conn, mappings)
        if config.app_role:
            for statement in await grant(conn, config.app_role, mappings):
                lines.append(statement)
    finally:
        await conn.close()
    return lines


async def setup_wal(
    conn: asyncpg.Connection, config: Config, mappings: list[CompiledMapping]
) -> list[str]:
    """The publications and the slot of the WAL-read mappings (nothing when there are none)."""
    wal = wal_slot.wal_mappings(mappings)
    if not wal:
        return []
    await wal_slot.require_ready(conn, config.wal, wal)
    lines = await wal_slot.ensure_publications(conn, config.wal, wal)
    created = await wal_slot.ensure_slot(conn, config.wal.slot_name)
    lines.append(
        f"replication slot {config.wal.slot_name}: {'created' if created else 'already present'}"
    )
    return lines


async def teardown(config: Config) -> list[str]:
    """``dualwrite teardown``: drop the WAL reader's slot and publications (the contract step's
    clean-up; stop the sidecars first, or they create the slot again)."""
    conn = await connect_service(config)
    try:
        return await wal_slot.teardown(conn, config.wal)
    finally:
        await conn.close()


async def target_pools(mappings: list[CompiledMapping]) -> dict[str, asyncpg.Pool]:
    """One small pool per distinct target database of cross-database mappings."""
    pools: dict[str, asyncpg.Pool] = {}
    for mapping in mappings:
        dsn = mapping.config.target_dsn
        if dsn is not None and dsn not in pools:
            pools[dsn] = await create_pool(
                dsn, min_size=1, max_size=4, server_settings=dict(SESSION_SETTINGS)
            )
    return pools


def shadow_tenant_columns(config: Config) -> frozenset[str]:
    """The result column names a shadow read's tenant is found in: each mapping's
    tenant_column, and the source column it is mapped from when that is a plain column."""
    names: set[str] = set()
    for mapping in config.mappings:
        if mapping.tenant_column is None:
            continue
        names.add(mapping.tenant_column)
        source = mapping.columns.get(mapping.tenant_column, "").strip()
        if source.isidentifier():
            names.add(source.lower())  # an unquoted name is folded, as the parser does
        elif len(source) > 2 and source[0] == source[-1] == '"':
            names.add(source[1:-1].replace('""', '"'))
    return frozenset(names)


class Sidecar:
    """Everything ``dualwrite run`` runs, startable in-process (the tests do this)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mappings: list[CompiledMapping] = []
        self.states = MappingStates()
        self.pool: asyncpg.Pool | None = None
        self.applier: Applier | None = None
        #: the WAL reader (only with mappings captured from the WAL)
        self.wal_reader: WalReader | None = None
        self.watcher: StateWatcher | None = None
        self.recorder = ActivityRecorder(sidecar_id())
        #: lint's traffic evidence (set up with the mirroring, when traffic.enabled)
        self.traffic: TrafficRecorder | None = None
        #: shadow reads (set up with the mirroring, when shadow.sample_rate > 0)
        self.shadow: ShadowProcess | None = None
        self.proxy: ProxyServer = ProxyServer(config)
        self.admin = AdminServer(config.admin, self._hooks())
        self.stopping = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._stopped = False
        self.validated = False
        self.started_at = time.time()
        #: what POST /actions/mappings/{name}/reconcile runs (None: not available here)
        self.reconcile_runner: ReconcileRunner | None = self._reconcile_pass
        self._reconciles: dict[str, asyncio.Task[None]] = {}
        #: the continuous reconcile loop (only when reconcile.interval_seconds is set)
        self.reconciler: ContinuousReconciler | None = None
        self._gauges_refreshed = -GAUGE_REFRESH_SECONDS

    def _hooks(self) -> AdminHooks:
        return AdminHooks(
            checks={
                "upstream": lambda: upstream_reachable(self.config),
                "mappings": self._mappings_ready,
                "applier": self._applier_ready,
            },
            status=self.status,
            refresh=self._refresh_gauges,
            actions={
                "/actions/mappings/{name}/pause": self._pause,
                "/actions/mappings/{name}/resume": self._resume,
                "/actions/mappings/{name}/reconcile": self._reconcile,
            },
            audit=self._audit,
        )

    async def start(self) -> None:
        if self.config.mappings:
            await self._start_mirroring()
        elif self.config.shadow.enabled:
            await self._start_shadow_only()
        await self.admin.start()
        await self.proxy.start()

    async def _start_mirroring(self) -> None:
        config = self.config
        self.pool = await create_service_pool(config, size=2 + config.applier.workers)
        async with self.pool.acquire() as conn:
            await ensure_current(conn)
            self.mappings = await validated_mappings(conn, config)
            self.states.update(await load_paused(conn))
        self.validated = True
        _log.info("mappings_validated", mappings=[m.name for m in self.mappings])
        self.watcher = StateWatcher(lambda: connect_service(config), self.states)
        await self.watcher.start()
        rewriter = Rewriter(self.mappings, states=self.states)
        if config.traffic.enabled:
            self.traffic = TrafficRecorder(config.traffic, self.recorder.sidecar)
            await self.traffic.start(self.pool)
        tap = await self._start_shadow() if config.shadow.enabled else None
        self.proxy = ProxyServer(
            config, MirrorContext(rewriter, self.recorder, self.traffic, shadow=tap)
        )
        if config.applier.enabled:
            self.applier = Applier(
                self.pool,
                self.mappings,
                config.applier,
                self.states,
                await target_pools(self.mappings),
            )
            await self.applier.start()
        wal = wal_slot.wal_mappings(self.mappings)
        if wal:
            async with self.pool.acquire() as conn:
                await wal_slot.require_ready(conn, config.wal, wal)
            self.wal_reader = WalReader(
                lambda: connect_service(config),
                wal,
                config.wal,
                reader_id=self.recorder.sidecar,
                states=self.states,
                dsn=config.effective_service_dsn(),
            )
            await self.wal_reader.start()
        if config.reconcile.interval_seconds is not None:
            self.reconciler = ContinuousReconciler(
                config, self.mappings, sidecar=self.recorder.sidecar
            )
            await self.reconciler.start()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_activity())

    async def _start_shadow_only(self) -> None:
        """Shadow reads without mappings (compatibility views over an unchanged schema, or a
        replay on another server): the relay mirrors nothing, the tap samples reads."""
        self.pool = await create_service_pool(self.config, size=2)
        async with self.pool.acquire() as conn:
            await ensure_current(conn)
        tap = await self._start_shadow()
        # no rewriter: the relay's statement paths stay those of a plain relay
        self.proxy = ProxyServer(self.config, MirrorContext(None, self.recorder, shadow=tap))

    async def _start_shadow(self) -> ShadowTap:
        """The tap the relay samples into and the worker process that replays (see
        proxy/shadow/supervisor.py): replays never run on the relay's event loop."""
        config = self.config
        shadow = config.shadow
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            await check_views(conn, shadow.views)
        tap = ShadowTap(shadow)
        service = config.effective_service_dsn()
        settings = WorkerSettings(
            shadow=shadow,
            search_path=list(config.search_path),
            primary_dsn=service,
            service_dsn=service,
            log_level=config.logging.level,
            log_format=config.logging.format,
            tenant_columns=shadow_tenant_columns(config),
        )
        self.shadow = ShadowProcess(settings, tap)
        await self.shadow.start()
        return tap

    async def stop(self, grace_seconds: float | None = None) -> None:
        """Drain the proxy within the grace period, then stop everything else."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown.grace_seconds if grace_seconds is None else grace_seconds
        await self.proxy.shutdown(grace)
        if self.wal_reader is not None:
            await self.wal_reader.stop()
        if self.applier is not None:
            await self.applier.stop()
        await self._stop_reconciles()
        if self.reconciler is not None:
            await self.reconciler.stop()
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self.pool is not None:
            await self._flush_once()
            await self.admin.flush_unauthorized()  # while the audit table can still be written
        if self.traffic is not None:
            await self.traffic.stop(self.pool)
        if self.shadow is not None:
            await self.shadow.stop()
        if self.watcher is not None:
            await self.watcher.stop()
        if self.pool is not None:
            await self.pool.close()
        await self.admin.stop()

    async def _flush_activity(self) -> None:
        while True:
            await asyncio.sleep(5.0)
            await self._flush_once()

    async def _flush_once(self) -> None:
        if self.pool is None or not self.recorder.pending:
            return
        try:
            async with self.pool.acquire() as conn:
                await self.recorder.flush(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _log.warning("activity_flush_failed", error=str(exc))

    async def _mappings_ready(self) -> tuple[bool, str]:
        if not self.config.mappings:
            return True, "no mappings configured"
        return self.validated, f"{len(self.mappings)} mappings validated"

    async def _applier_ready(self) -> tuple[bool, str]:
        if not self.config.mappings or not self.config.applier.enabled:
            return True, "applier not used here"
        if self.applier is None or not self.applier.running:
            return False, "applier not running"
        return self.applier.last_error is None, self.applier.last_error or "running"

    async def _pause(self, params: Mapping[str, str], body: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self._set_paused(params["name"], True, body)

    async def _resume(
        self, params: Mapping[str, str], body: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        return await self._set_paused(params["name"], False, body)

    async def _set_paused(
        self, name: str, paused: bool, body: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        self._mapping_named(name)
        assert self.pool is not None
        async with self.pool.acquire() as conn:
            await set_paused(conn, name, paused, by=str(body.get("by") or "admin-api"))
            self.states.update(await load_paused(conn))
        return {"mapping": name, "paused": paused}

    async def _reconcile(
        self, params: Mapping[str, str], body: Mapping[str, Any]
    ) -> ActionResult:
        """Start one reconcile pass of a mapping in the background (202), one at a time."""
        mapping = self._mapping_named(params["name"])
        if self.reconcile_runner is None:
            return ActionResponse(501, {"error": "reconcile is not available in this sidecar"})
        if self._reconcile_running(mapping.name):
            return ActionResponse(409, {"mapping": mapping.name, "error": "a pass is running"})
        by = str(body.get("by") or "admin-api")
        task = asyncio.get_running_loop().create_task(
            self._run_reconcile(mapping, by), name=f"reconcile-{mapping.name}"
        )
        self._reconciles[mapping.name] = task
        return ActionResponse(202, {"mapping": mapping.name, "started": True, "by": by})

    async def _reconcile_pass(self, mapping: CompiledMapping, by: str) -> None:
        """One pass of compare's reconciler, recorded in reconcile_runs like any other."""
        options = PassOptions(requested_by=by, sidecar=self.recorder.sidecar)
        result = await reconcile_mapping(self.config, mapping, options)
        _log.info(
            "admin_reconcile_finished", mapping=mapping.name, status=result.status,
            run_id=result.run_id, divergent=result.divergent,
        )

    async def _run_reconcile(self, mapping: CompiledMapping, by: str) -> None:
        assert self.reconcile_runner is not None
        try:
            await self.reconcile_runner(mapping, by)
        except Exception as exc:  # the pass records its own failure; keep the sidecar up
            _log.exception("admin_reconcile_failed", mapping=mapping.name, error=str(exc))

    def _reconcile_running(self, name: str) -> bool:
        task = self._reconciles.get(name)
        return task is not None and not task.done()

    async def _stop_reconciles(self) -> None:
        for task in self._reconciles.values():
            task.cancel()
        await asyncio.gather(*self._reconciles.values(), return_exceptions=True)
        self._reconciles.clear()

    def _mapping_named(self, name: str) -> CompiledMapping:
        for mapping in self.mappings:
            if mapping.name == name:
                return mapping
        raise KeyError(f"mapping {name}")

    async def _audit(self, action: str, params: Mapping[str, Any], outcome: str) -> None:
        """Record an admin action attempt in dualwrite.admin_actions (when mirroring is on)."""
        if self.pool is None:
            return  # no mappings, no control schema in use: the log line is the record
        async with self.pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO dualwrite.admin_actions (action, params, outcome, sidecar) "
                "VALUES ($1, $2::jsonb, $3, $4)",
                action,
                json.dumps(dict(params), default=str),
                outcome,
                self.recorder.sidecar,
            )

    async def status(self) -> dict[str, Any]:
        figures: dict[str, dict[str, Any]] = {}
        if self.applier is not None:
            try:
                figures = await self.applier.refresh_gauges()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                figures = {"error": {"message": str(exc)}}
        runs = await self._reconcile_history()
        since_start = metrics.counts_since_start()
        return {
            "sidecar": self.recorder.sidecar,
            "started_at": self.started_at,
            "proxy": self.proxy.status(),
            "wal_reader": None
            if self.wal_reader is None
            else {
                "slot": self.config.wal.slot_name,
                "leader": self.wal_reader.leader,
                "last_error": self.wal_reader.last_error,
            },
            # what this sidecar's config says has moved: every sidecar must agree before a
            # moved tenant's writes resume (README, staged cutover)
            "cutover": {
                "tenants": list(self.config.cutover.tenants),
                "reverse": dict(self.config.cutover.reverse),
            },
            "mappings": {
                m.name: {
                    "mode": m.mode,
                    "capture": m.capture,
                    "paused": self.states.is_paused(m.name),
                    "source": str(m.source),
                    "target": str(m.target),
                    **figures.get(m.name, {}),
                    "reconcile_running": self._reconcile_running(m.name),
                    **runs.get(m.name, {"last_reconcile": None, "last_clean_pass_at": None}),
                    "since_start": since_start.get(m.name, {}),
                }
                for m in self.mappings
            },
        }

    async def _refresh_gauges(self) -> None:
        """Before a scrape: pause flags, and the reconcile and backfill gauges (from the
        control schema, at most every GAUGE_REFRESH_SECONDS)."""
        for mapping in self.mappings:
            metrics.MAPPING_PAUSED.labels(mapping.name).set(self.states.is_paused(mapping.name))
        now = time.monotonic()
        if self.pool is None or now - self._gauges_refreshed < GAUGE_REFRESH_SECONDS:
            return
        self._gauges_refreshed = now
        async with self.pool.acquire() as conn:
            await export_gauges(conn, [m.name for m in self.mappings])
            await wal_slot.export_resync(conn, [m.name for m in self.mappings])
            await export_invariant_gauges(conn, [i.name for i in self.config.all_invariants()])
            tenant_mappings = [m for m in self.mappings if m.config.tenant_column]
            if tenant_mappings:
                aware = [i.name for i in self.config.all_invariants() if i.tenant]
                trouble = await tenant_trouble(conn, tenant_mappings, aware)
                since = await database_now(conn) - passes_lookback(self.config)
                judged = await tenants_of_passes(conn, tenant_mappings, since)
                export_tenant_gauges(
                    trouble,
                    {*self.config.report.tenants, *self.config.cutover.tenants, *judged},
                )

    async def _reconcile_history(self) -> dict[str, dict[str, Any]]:
        if self.pool is None:
            return {}
        try:
            async with self.pool.acquire() as conn:
                return await latest_runs(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            _log.warning("status_history_failed", error=str(exc))
            return {}


async def run_until_signalled(sidecar: Sidecar) -> int:
    """Run until SIGTERM/SIGINT; drain for the grace period; a second signal exits at once."""
    await sidecar.start()
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            _log.warning("second_signal_exit_now", signal=signal.Signals(signum).name)
            sidecar.proxy.close_all()
            sys.stderr.flush()
            os._exit(0)
        _log.info(
            "shutdown_requested",
            signal=signal.Signals(signum).name,
            grace_seconds=sidecar.config.shutdown.grace_seconds,
        )
        sidecar.stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await sidecar.stopping.wait()
    await sidecar.stop()
    _log.info("stopped")
    return 0


async def run_applier_until_signalled(config: Config) -> int:
    """``dualwrite apply``: the outbox applier, and the WAL reader of the WAL-read mappings
    (capture without a proxy), until SIGTERM/SIGINT."""
    pool = await create_service_pool(config, size=1 + config.applier.workers)
    reader: WalReader | None = None
    try:
        async with pool.acquire() as conn:
            await ensure_current(conn)
            mappings = await validated_mappings(conn, config)
            states = MappingStates()
            states.update(await load_paused(conn))
        watcher = StateWatcher(lambda: connect_service(config), states)
        await watcher.start()
        applier = Applier(pool, mappings, config.applier, states, await target_pools(mappings))
        await applier.start()
        wal = wal_slot.wal_mappings(mappings)
        if wal:
            async with pool.acquire() as conn:
                await wal_slot.require_ready(conn, config.wal, wal)
            # one reader per slot across sidecars and appliers: the same leadership lock
            reader = WalReader(
                lambda: connect_service(config),
                wal,
                config.wal,
                reader_id=sidecar_id(),
                states=states,
                dsn=config.effective_service_dsn(),
            )
            await reader.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        _log.info(
            "applier_running",
            mappings=[m.name for m in mappings],
            wal_mappings=[m.name for m in wal],
        )
        await stop.wait()
        await applier.stop()
        await watcher.stop()
    finally:
        if reader is not None:
            await reader.stop()
        await pool.close()
    return 0
