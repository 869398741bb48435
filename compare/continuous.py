"""The reconcile passes inside ``dualwrite run``: a loop, and the admin action's single pass.

Every ``reconcile.interval_seconds`` each mapping gets a pass, unless any process finished one
that started less than an interval ago; then the configured invariants are checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from compare.connections import connect
from compare.invariants import CheckOptions, check_all, invariants_to_check
from compare.reconciler import PassOptions, PassResult, reconcile_mapping
from core.config import Config
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error

_log = get_logger("reconcile")

_RECENT = """
SELECT 1 FROM dualwrite.reconcile_runs
WHERE mapping = $1 AND kind = 'reconcile' AND tenant IS NULL
  AND status = 'done' AND started_at > now() - make_interval(secs => $2)
LIMIT 1
"""


class ContinuousReconciler:
    """Runs passes in the background until stopped; a failing pass is logged, never fatal."""

    def __init__(
        self, config: Config, mappings: Sequence[CompiledMapping], *, sidecar: str | None = None
    ) -> None:
        self.config = config
        self.mappings = list(mappings)
        #: seconds between passes; None: passes only on request (:meth:`run_pass`)
        self.interval = config.reconcile.interval_seconds
        self.sidecar = sidecar
        self.last_results: dict[str, PassResult] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start the loop of passes (only when an interval is configured)."""
        if self.interval is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(self.interval), name="reconcile-loop"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def run_pass(self, mapping: CompiledMapping, requested_by: str) -> PassResult:
        """One pass over ``mapping`` (also what the admin API's reconcile action runs)."""
        options = PassOptions(requested_by=requested_by, sidecar=self.sidecar)
        result = await reconcile_mapping(self.config, mapping, options)
        self.last_results[mapping.name] = result
        return result

    async def _run(self, interval: float) -> None:
        while True:
            started = time.monotonic()
            for mapping in self.mappings:
                await self._maybe_pass(mapping, interval)
            await self._check_invariants()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _maybe_pass(self, mapping: CompiledMapping, interval: float) -> None:
        try:
            if await self._recently_reconciled(mapping, interval):
                return
            await self.run_pass(mapping, f"continuous:{self.sidecar or 'sidecar'}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failing pass must never stop the loop or the sidecar
            _log.warning(
                "continuous_reconcile_failed",
                mapping=mapping.name,
                error=describe_error(exc, mapping),
            )

    async def _check_invariants(self) -> None:
        """The configured invariants, after the passes (each check records its own outcome;
        one that cannot connect is logged, never fatal)."""
        chosen = invariants_to_check(self.config, None, None)
        if not chosen:
            return
        who = f"continuous:{self.sidecar or 'sidecar'}"
        try:
            await check_all(
                self.config, chosen, CheckOptions(requested_by=who, sidecar=self.sidecar)
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the loop and the sidecar must outlive a failing check
            _log.warning("continuous_invariants_failed", error=f"{type(exc).__name__}: {exc}")

    async def _recently_reconciled(self, mapping: CompiledMapping, interval: float) -> bool:
        """A full pass by any process finished that started less than 90% of an interval ago
        (a pass running elsewhere makes ours return 'busy' through the mapping's lock)."""
        conn = await connect(self.config.effective_service_dsn(), {}, "service_dsn")
        try:
            return bool(await conn.fetchval(_RECENT, mapping.name, interval * 0.9))
        finally:
            await conn.close()
