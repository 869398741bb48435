"""The ``reconcile`` and ``backfill`` commands: mappings chosen, summary printed, exit code.

Exit codes: 0 clean (or backfill done), 1 divergence found, left after repair, or a failed run,
2 configuration error.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from compare.backfill import BackfillResult, backfill_mapping
from compare.connections import connect
from compare.invariants import CheckOptions, InvariantResult, check_all, invariants_to_check
from compare.progress import Progress, format_table
from compare.reconciler import PassOptions, PassResult, reconcile_mapping
from core.catalog import validate_all
from core.config import Config
from core.control import ensure_current
from core.errors import ConfigError
from core.mapping import CompiledMapping, compile_all
from core.rowsecurity import SESSION_SETTINGS, connect_unfiltered
from mirror import statements as key_sync_statements

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2

Say = Callable[[str], None]
T = TypeVar("T")


async def load_mappings(
    config: Config, name: str | None = None, *, tenant: str | None = None
) -> list[CompiledMapping]:
    """The mappings to work on, validated against the live database (ConfigError if unfit)."""
    if name is not None:
        config.mapping(name)  # raises ConfigError for an unknown name
    conn = await connect(config.effective_service_dsn(), dict(SESSION_SETTINGS), "service_dsn")
    try:
        await ensure_current(conn)
        chosen = [m for m in compile_all(config) if name is None or m.name == name]
        # repair and backfill write the target through sync_keys: its statements must prepare
        bound = await validate_all(
            conn,
            chosen,
            config.search_path,
            connect_unfiltered,
            statements=(key_sync_statements.statements_to_prepare,),
        )
    finally:
        await conn.close()
    if tenant is not None:
        bound = [m for m in bound if m.config.tenant_column is not None]
        if not bound:
            raise ConfigError("--tenant", "no chosen mapping has a tenant_column")
    return bound


async def reconcile_command(
    config: Config,
    *,
    mapping: str | None = None,
    tenant: str | None = None,
    repair: bool = False,
    dry_run: bool = False,
    by: str | None = None,
    reason: str | None = None,
    say: Say = print,
    progress: Progress | None = None,
) -> int:
    """Reconcile (and repair) the chosen mappings; print what was found; the exit code."""
    mappings = await load_mappings(config, mapping, tenant=tenant)
    who = {"requested_by": by} if by else {}
    options = PassOptions(
        tenant=tenant, repair=repair or dry_run, dry_run=dry_run, reason=reason, **who
    )
    results: list[PassResult] = []
    for m in mappings:
        result = await _interruptible(
            reconcile_mapping(config, m, options, progress=progress or Progress(), say=say)
        )
        if result is None:
            say("interrupted")
            return 130
        results.append(result)
    say(reconcile_summary(results))
    for result in results:
        if result.tally.dead_lettered:
            say(
                f"reconcile of {result.mapping}: {result.tally.dead_lettered} divergent keys are "
                "in dualwrite.dead_letters (the applier gave up on them for now): not clean"
            )
        if result.error:
            say(f"reconcile of {result.mapping} failed: {result.error}")
        if result.status == "busy":
            say(f"reconcile of {result.mapping} skipped: another pass of it is running")
    ok = all(r.status == "done" and r.remaining == 0 for r in results)
    checked = await _interruptible(
        check_all(
            config,
            invariants_to_check(config, None if mapping is None else [mapping], tenant),
            CheckOptions(tenant=tenant, requested_by=options.requested_by),
        )
    )
    if checked is None:
        say("interrupted")
        return 130
    if checked:
        say(invariants_summary(checked))
        for inv in checked:
            if inv.error:
                say(f"invariant {inv.invariant} could not be checked: {inv.error}")
    ok = ok and all(i.held for i in checked)
    return EXIT_OK if ok else EXIT_FINDING


def invariants_summary(results: Sequence[InvariantResult]) -> str:
    headers = ["invariant", "scope", "kind", "status", "groups", "failing", "first failing"]
    rows = [
        [
            r.invariant,
            r.mapping or "migration",
            r.kind,
            _invariant_status(r),
            "-" if r.kind == "new_only" else r.groups_checked,
            r.groups_failed,
            _first_failure(r),
        ]
        for r in results
    ]
    return format_table(headers, rows)


def _invariant_status(result: InvariantResult) -> str:
    if result.status != "done":
        return result.status
    return "held" if result.groups_failed == 0 else "BROKEN"


def _first_failure(result: InvariantResult) -> str:
    if not result.failures:
        return "-"
    first = result.failures[0]
    group = ", ".join(f"{n}={v}" for n, v in zip(result.group_columns, first.group, strict=True))
    return f"{group}: old {_values(first.old)} new {_values(first.new)}"


def _values(values: tuple[object, ...] | None) -> str:
    return "(none)" if values is None else "(" + ", ".join(str(v) for v in values) + ")"


def reconcile_summary(results: Sequence[PassResult]) -> str:
    headers = [
        "mapping",
        "method",
        "status",
        "compared",
        "missing",
        "extra",
        "changed",
        "pending",
        "dead_lettered",
        "repaired",
        "remaining",
        "seconds",
    ]
    rows = [
        [
            r.mapping,
            r.method,
            _status(r),
            r.tally.compared,
            r.tally.counts["missing"],
            r.tally.counts["extra"],
            r.tally.counts["changed"],
            r.tally.pending,
            r.tally.dead_lettered,
            _repaired(r),
            r.remaining,
            round(r.seconds, 1),
        ]
        for r in results
    ]
    return format_table(headers, rows)


def _status(result: PassResult) -> str:
    if result.status != "done":
        return result.status
    if result.repair is not None and result.dry_run:
        return "dry-run"
    return "clean" if result.tally.clean else "divergent"


def _repaired(result: PassResult) -> int | str:
    if result.repair is None:
        return "-"
    if result.dry_run:
        return f"would {result.repair.planned}"
    return result.repair.repaired


async def backfill_command(
    config: Config,
    *,
    mapping: str | None = None,
    rate: int | None = None,
    restart: bool = False,
    say: Say = print,
    progress: Progress | None = None,
) -> int:
    """Backfill the chosen mappings (resuming unfinished ones); the exit code."""
    mappings = await load_mappings(config, mapping)
    results: list[BackfillResult] = []
    for m in mappings:
        result = await _interruptible(
            backfill_mapping(config, m, rate=rate, restart=restart, progress=progress or Progress())
        )
        if result is None:
            say("interrupted: run the same command again to resume")
            return 130
        results.append(result)
    say(backfill_summary(results))
    for result in results:
        if result.status == "already_done":
            say(f"backfill of {result.mapping} is already complete (--restart to run it again)")
        elif result.status == "busy":
            say(f"backfill of {result.mapping} skipped: another backfill of it is running")
        elif result.error:
            say(f"backfill of {result.mapping} failed: {result.error}")
    ok = all(r.status in ("done", "already_done") for r in results)
    return EXIT_OK if ok else EXIT_FINDING


def backfill_summary(results: Sequence[BackfillResult]) -> str:
    headers = ["mapping", "status", "rows", "rows_done", "estimate", "upserted", "seconds"]
    rows = [
        [
            r.mapping,
            r.status + (" (resumed)" if r.resumed else ""),
            r.rows,
            r.rows_done,
            r.estimate,
            r.upserted,
            round(r.seconds, 1),
        ]
        for r in results
    ]
    return format_table(headers, rows)


async def _interruptible(job: Coroutine[Any, Any, T]) -> T | None:
    """Run ``job``; SIGINT/SIGTERM cancel it (so its run is recorded as interrupted): None."""
    task = asyncio.ensure_future(job)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    installed = []
    for signum in signals:
        try:
            loop.add_signal_handler(signum, task.cancel)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we were cancelled ourselves, not by a signal
        return None
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
        sys.stderr.flush()
