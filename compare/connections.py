"""The reconciler's and backfill's own database sessions: settings, timeouts, connecting.

Reads run in sessions whose every statement is its own REPEATABLE READ, READ ONLY transaction
(one snapshot per chunk, never a long transaction). Both sides of a cross-database comparison
get the same output settings, so values print the same on both servers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg

from core.config import Config
from core.connect import connect as connect_database
from core.errors import DatabaseUnreachable
from core.mapping import CompiledMapping
from core.rowsecurity import SESSION_SETTINGS

#: output settings that make a value's text the same in every session
_CANONICAL_OUTPUT = {
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "extra_float_digits": "1",
    "bytea_output": "hex",
}


def session_settings(config: Config, *, read_only: bool, role: str) -> dict[str, str]:
    """Server settings for a reconcile or backfill session."""
    settings = {
        **_CANONICAL_OUTPUT,
        # a policy the role is subject to raises instead of hiding rows (core/rowsecurity.py)
        **SESSION_SETTINGS,
        "application_name": f"dualwrite-{role}",
        "statement_timeout": str(int(config.reconcile.statement_timeout_ms)),
        "lock_timeout": str(int(config.applier.lock_timeout_ms)),
        "idle_in_transaction_session_timeout": "60000",
    }
    if read_only:
        settings["default_transaction_isolation"] = "repeatable read"
        settings["default_transaction_read_only"] = "on"
        # The chunk statement's plan does not depend on its key bounds (index range scans
        # and a merge join): plan it once instead of once per chunk (~5% of a chunk).
        settings["plan_cache_mode"] = "force_generic_plan"
    else:
        # sync_keys' statements are prepared once per session while a backfill grows the
        # target from empty: a generic plan made when it was empty would seq-scan it forever.
        settings["plan_cache_mode"] = "force_custom_plan"
    return settings


async def connect(dsn: str, settings: dict[str, str], what: str) -> asyncpg.Connection:
    """Connect, turning an unreachable database into a ConfigError naming ``what``."""
    try:
        return await connect_database(dsn, server_settings=settings)
    except DatabaseUnreachable as exc:
        raise DatabaseUnreachable(f"{what}: {exc}") from None


@dataclass
class Sessions:
    """Connections one mapping's pass or backfill uses."""

    #: writes to the control schema (and repair/backfill writes in the source's database)
    control: asyncpg.Connection
    #: read-only snapshot reads of the source (and the target, when in the same database)
    source: asyncpg.Connection
    #: read-only reads of the target database (cross-database mappings), else None
    target: asyncpg.Connection | None = None
    #: read-write session in the target database (cross-database repair/backfill), else None
    target_writer: asyncpg.Connection | None = None
    #: more read-only sessions of the source database, comparing chunks side by side
    readers: list[asyncpg.Connection] = field(default_factory=list)

    @property
    def reading(self) -> list[asyncpg.Connection]:
        return [c for c in (self.source, self.target) if c is not None]


@asynccontextmanager
async def open_sessions(
    config: Config,
    mapping: CompiledMapping,
    *,
    role: str,
    writes_target: bool,
    reads: bool = True,
    readers: int = 0,
) -> AsyncIterator[Sessions]:
    """Open the sessions a pass (``reads``, plus ``readers`` more source readers) or a
    backfill/repair (``writes_target``) needs."""
    service = config.effective_service_dsn()
    target_dsn = mapping.config.target_dsn
    async with AsyncExitStack() as stack:

        async def opened(dsn: str, read_only: bool, what: str) -> asyncpg.Connection:
            settings = session_settings(config, read_only=read_only, role=role)
            conn = await connect(dsn, settings, what)
            stack.push_async_callback(_close, conn)
            return conn

        control = await opened(service, False, "service_dsn")
        source = await opened(service, True, "service_dsn") if reads else control
        sessions = Sessions(control=control, source=source)
        for _ in range(readers):
            sessions.readers.append(await opened(service, True, "service_dsn"))
        if target_dsn is not None:
            where = f"mappings[{mapping.name}].target_dsn"
            if reads:
                sessions.target = await opened(target_dsn, True, where)
            if writes_target:
                sessions.target_writer = await opened(target_dsn, False, where)
        yield sessions


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except (OSError, asyncpg.InterfaceError, TimeoutError):
        conn.terminate()
