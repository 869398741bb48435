"""Applying keys for repair and backfill: ``sync_keys`` in short, retried transactions.

Each batch runs ``sync_keys`` (or ``sync_keys_across``) in a transaction of its own with a
lock timeout, retried when the failure says nothing about the keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from compare.connections import Sessions
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error
from mirror.applier import is_transient
from mirror.keysync import SyncResult, sync_keys, sync_keys_across

_log = get_logger("keyapply")

#: keys per sync_keys transaction: each key takes an advisory lock until commit, and the
#: shared lock table is sized by max_locks_per_transaction
MAX_KEYS_PER_TRANSACTION = 500
ATTEMPTS = 6

#: work done in the source database's transaction after the keys are applied (a checkpoint)
AfterApply = Callable[[asyncpg.Connection], Awaitable[None]]


def batches(items: Sequence[str], size: int = MAX_KEYS_PER_TRANSACTION) -> list[list[str]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


async def apply_keys(
    sessions: Sessions,
    mapping: CompiledMapping,
    keys: Sequence[str],
    *,
    lock_timeout_ms: int,
    after_apply: AfterApply | None = None,
) -> SyncResult:
    """Copy the current source state of ``keys`` to the target, retrying transient failures."""
    delay = 0.2
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await _apply_once(sessions, mapping, keys, lock_timeout_ms, after_apply)
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            if not is_transient(exc) or attempt == ATTEMPTS:
                raise
            _log.info(
                "apply_retry",
                mapping=mapping.name,
                attempt=attempt,
                error=describe_error(exc, mapping)[:500],
            )
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


async def _apply_once(
    sessions: Sessions,
    mapping: CompiledMapping,
    keys: Sequence[str],
    lock_timeout_ms: int,
    after_apply: AfterApply | None,
) -> SyncResult:
    source = sessions.control
    timeout = f"SET LOCAL lock_timeout = {int(lock_timeout_ms)}"
    async with source.transaction():
        await source.execute(timeout)
        if sessions.target_writer is None:
            result = await sync_keys(source, mapping, keys)
        else:
            target = sessions.target_writer
            # The target commits first; the source transaction (checkpoint) after it, so a
            # crash in between only means the keys are copied again.
            async with target.transaction():
                await target.execute(timeout)
                result = await sync_keys_across(source, target, mapping, keys)
        if after_apply is not None:
            await after_apply(source)
    return result
