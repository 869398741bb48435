"""Throttling for the reconciler and backfill: a rows-per-second pace, pauses under pressure.

Pressure is too many active connections (pg_stat_activity) or a lagging replica
(pg_stat_replication), per ``reconcile.pressure``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import asyncpg

from core import metrics
from core.config import PressureConfig
from core.logs import get_logger

_log = get_logger("throttle")

_PRESSURE = """
SELECT (SELECT count(*) FROM pg_stat_activity
        WHERE state = 'active' AND backend_type = 'client backend'
          AND pid <> pg_backend_pid()) AS active,
       (SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8
        FROM pg_stat_replication) AS lag
"""


async def pressure_reason(conn: asyncpg.Connection, config: PressureConfig) -> str | None:
    """Why the database behind ``conn`` is under pressure now, or None when it is not."""
    if config.max_active_connections is None and config.max_replication_lag_seconds is None:
        return None
    row = await conn.fetchrow(_PRESSURE)
    assert row is not None
    limit = config.max_active_connections
    if limit is not None and row["active"] > limit:
        return f"{row['active']} active connections (limit {limit})"
    lag_limit = config.max_replication_lag_seconds
    if lag_limit is not None and row["lag"] > lag_limit:
        return f"replication lag {row['lag']:.1f}s (limit {lag_limit}s)"
    return None


class Throttle:
    """Paces one mapping's work to ``rows_per_second`` and waits out database pressure."""

    def __init__(
        self,
        mapping: str,
        rows_per_second: int | None,
        pressure: PressureConfig,
        conns: Sequence[asyncpg.Connection],
        *,
        activity: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mapping = mapping
        self.rows_per_second = rows_per_second
        self.pressure = pressure
        self.conns = list(conns)
        self.activity = activity
        self.paused_seconds = 0.0
        self._clock = clock
        self._since = clock()
        self._rows = 0
        self._checked_at = -float("inf")

    async def wait_for_calm(self) -> None:
        """Return once no database is under pressure (checked at most every check interval)."""
        now = time.monotonic()
        if now - self._checked_at < self.pressure.check_interval_seconds:
            return
        self._checked_at = now
        reason = await self._reason()
        if reason is None:
            return
        started = time.monotonic()
        _log.warning("throttle_paused", mapping=self.mapping, activity=self.activity, reason=reason)
        while reason is not None:
            await asyncio.sleep(self.pressure.check_interval_seconds)
            reason = await self._reason()
        paused = time.monotonic() - started
        self.paused_seconds += paused
        metrics.THROTTLE_PAUSED_SECONDS.labels(self.mapping).inc(paused)
        _log.info(
            "throttle_resumed",
            mapping=self.mapping,
            activity=self.activity,
            paused_seconds=round(paused, 3),
        )
        self._restart_pace()

    async def pace(self, rows: int) -> None:
        """Account for ``rows`` just done; sleep as long as keeps the average under the rate."""
        if self.rows_per_second is None or rows <= 0:
            return
        self._rows += rows
        ahead = self._rows / self.rows_per_second - (self._clock() - self._since)
        if ahead > 0:
            await asyncio.sleep(ahead)

    def _restart_pace(self) -> None:
        # After a pause, do not burst to catch up on the time spent waiting.
        self._since = self._clock()
        self._rows = 0

    async def _reason(self) -> str | None:
        for conn in self.conns:
            reason = await pressure_reason(conn, self.pressure)
            if reason is not None:
                return reason
        return None
