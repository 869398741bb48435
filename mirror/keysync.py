"""``sync_keys``: make the target rows of some keys equal to the mapping of the source rows *now*.

It copies current state rather than replaying events, so it is idempotent and order-independent:
the applier, repair and backfill all call it, concurrently and repeatedly, safely.

Locking discipline (why it is correct under concurrency, see also docs/architecture.md):

1. An advisory lock per (mapping, key), taken in hash order, serialises every sync_keys call
   on the same key: whoever reads the source last also writes the target last.
2. For mappings in ``sync`` mode, where application statements write the target themselves,
   the source rows are share-locked first (in key order), then existing target rows are
   locked; the source is then read with a fresh snapshot. A key whose target row did not
   exist is inserted with ON CONFLICT DO NOTHING: a row that appeared meanwhile came from a
   sync-mode statement that saw newer source state than this read.
3. In ``outbox`` mode only sync_keys writes the target, so step 1 is enough and application
   transactions never wait on it.

Callers run it inside a transaction they own (so the outbox claim commits with it).

In a staged cutover a key whose row belongs to a tenant the mapping does not carry under this
process's config (captured by a process with another config, during a rolling restart) is
refused with an error, which the applier turns into a dead letter, retried until a process
whose config carries the tenant applies it: never dropped as "not mine".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from core.control import LOCK_CLASS
from core.mapping import CompiledMapping
from mirror.statements import (
    apply_keys_sql,
    apply_rows_sql,
    lock_source_rows_sql,
    lock_target_rows_sql,
    other_phase_sql,
    source_rows_json_sql,
)

#: why a key of the other phase of a staged cutover is refused (and so dead-lettered)
OTHER_PHASE = (
    "dualwrite: mapping {mapping} does not carry the tenant of this row under the cutover "
    "config of this process (cutover.tenants here: {tenants}), yet the key was captured for "
    "it: a sidecar or applier with another cutover config is running; the key is retried "
    "until a process whose config carries the tenant applies it"
)

_ADVISORY_LOCKS = """
SELECT count(pg_advisory_xact_lock($3, h)) FROM (
    SELECT DISTINCT hashtext($1 || ':' || value::text) AS h
    FROM jsonb_array_elements($2::jsonb) ORDER BY 1
) AS keys
"""


@dataclass(frozen=True)
class SyncResult:
    upserted: int
    deleted: int

    def __add__(self, other: SyncResult) -> SyncResult:
        return SyncResult(self.upserted + other.upserted, self.deleted + other.deleted)


def keys_payload(keys: Iterable[str]) -> str:
    """A jsonb array of keys from their JSON texts, without duplicates."""
    unique = dict.fromkeys(keys)
    return "[" + ", ".join(unique) + "]"


async def sync_keys(
    conn: asyncpg.Connection,
    mapping: CompiledMapping,
    keys: Sequence[str],
) -> SyncResult:
    """Copy the current source state of ``keys`` (JSON texts) to the target."""
    if not keys:
        return SyncResult(0, 0)
    payload = keys_payload(keys)
    await conn.fetchval(_ADVISORY_LOCKS, mapping.name, payload, LOCK_CLASS)
    other_phase = other_phase_sql(mapping, "$1::jsonb")
    if other_phase is not None and await conn.fetchval(other_phase, payload) is not None:
        # Applying it would drop it (the row is not this mapping's under this config), and a
        # staged cutover's move would lose a write: refuse it, so the applier dead-letters it.
        assert mapping.cutover is not None
        raise asyncpg.exceptions.RaiseError(
            OTHER_PHASE.format(
                mapping=mapping.name, tenants=", ".join(mapping.cutover.tenants) or "none"
            )
        )
    if mapping.mode.key_sync_locks_rows:
        await conn.execute(lock_source_rows_sql(mapping, "$1::jsonb"), payload)
        locked = await conn.fetch(lock_target_rows_sql(mapping, "$1::jsonb"), payload)
        locked_payload = keys_payload(str(r["__dw_key"]) for r in locked)
        row = await conn.fetchrow(
            apply_keys_sql(mapping, "$1::jsonb", "$2::jsonb"), payload, locked_payload
        )
    else:
        row = await conn.fetchrow(apply_keys_sql(mapping, "$1::jsonb", None), payload)
    assert row is not None
    return SyncResult(int(row["upserted"]), int(row["deleted"]))


async def sync_keys_across(
    source: asyncpg.Connection,
    target: asyncpg.Connection,
    mapping: CompiledMapping,
    keys: Sequence[str],
) -> SyncResult:
    """sync_keys for a target in another database (``target_dsn``).

    The advisory lock is taken in the target database, where every writer of the target
    meets; the source is read after it, with a fresh snapshot. The caller commits the target
    transaction before the source one (which holds the outbox claim), so a crash in between
    leaves the keys queued and they are simply applied again.
    """
    if not keys:
        return SyncResult(0, 0)
    payload = keys_payload(keys)
    await target.fetchval(_ADVISORY_LOCKS, mapping.name, payload, LOCK_CLASS)
    rows = await source.fetchval(source_rows_json_sql(mapping, "$1::jsonb"), payload)
    row = await target.fetchrow(apply_rows_sql(mapping, "$1::jsonb", "$2::jsonb"), rows, payload)
    assert row is not None
    return SyncResult(int(row["upserted"]), int(row["deleted"]))
