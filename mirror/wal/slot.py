"""The WAL reader's server-side objects: publications, the replication slot, what they need,
and the guard that drops a slot before it fills the primary's disk.

Two publications: ``<publication_name>`` on the source tables of every WAL-read mapping
(inserts, updates, deletes, truncates), and, when a mapping audits statement capture
(``capture: both``), ``<publication_name>_outbox`` on ``dualwrite.outbox`` publishing inserts
only: the outbox rows a rewritten statement wrote are how the reader knows which changes of
that transaction statement capture recorded. Every function here is idempotent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from core import metrics
from core.config import WalConfig
from core.errors import WalNotReady
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.sqltext import quote_ident

_log = get_logger("wal")

OUTBOX_TABLE = ("dualwrite", "outbox")

_IDENTITY = """
SELECT c.relreplident::text AS identity,
       coalesce((SELECT array_agg(a.attname ORDER BY a.attnum)
                 FROM pg_index i JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                 WHERE i.indrelid = c.oid
                   AND ((c.relreplident = 'd' AND i.indisprimary)
                        OR (c.relreplident = 'i' AND i.indisreplident))), '{}') AS columns
FROM pg_class c WHERE c.oid = $1::regclass
"""
_SLOT = """
SELECT slot_name, plugin, database, active_pid, confirmed_flush_lsn::text AS confirmed,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint AS retained
FROM pg_replication_slots WHERE slot_name = $1
"""
#: walsenders other than the one reading this slot (a restarted reader takes that one's place)
_OTHER_WALSENDERS = """
SELECT count(*) FROM pg_stat_replication r
WHERE r.pid IS DISTINCT FROM (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1)
"""
_PUBLICATION_TABLES = """
SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = $1
"""


def outbox_publication(config: WalConfig) -> str:
    return f"{config.publication_name}_outbox"


def wal_mappings(mappings: Sequence[CompiledMapping]) -> list[CompiledMapping]:
    """The mappings the WAL reader serves (same-database sources; ``capture`` wal or both)."""
    return [m for m in mappings if m.capture.reads_wal]


def publication_names(config: WalConfig, mappings: Sequence[CompiledMapping]) -> list[str]:
    """The publications the reader decodes through."""
    names = [config.publication_name]
    if any(m.capture.audits_statement_capture for m in mappings):
        names.append(outbox_publication(config))
    return names


# --- what the database must offer -----------------------------------------------------------


async def problems(
    conn: asyncpg.Connection, config: WalConfig, mappings: Sequence[CompiledMapping]
) -> list[str]:
    """What is missing before the WAL reader can run, each with what to change (empty: ok)."""
    found: list[str] = []
    if await conn.fetchval("SHOW wal_level") != "logical":
        found.append(
            "wal_level is not logical: set wal_level = logical (postgresql.conf, or your "
            "provider's parameter group) and restart PostgreSQL"
        )
    slot = await conn.fetchrow(_SLOT, config.slot_name)
    if slot is None:
        limit = int(await conn.fetchval("SHOW max_replication_slots"))
        used = int(await conn.fetchval("SELECT count(*) FROM pg_replication_slots"))
        if used >= limit:
            found.append(
                f"max_replication_slots = {limit} and {used} are used: raise it (restart "
                f"needed) or drop an unused slot"
            )
    if config.transport == "stream":
        senders = int(await conn.fetchval("SHOW max_wal_senders"))
        busy = int(await conn.fetchval(_OTHER_WALSENDERS, config.slot_name))
        if busy >= senders:
            found.append(
                f"max_wal_senders = {senders} and {busy} are used: raise it (restart needed), "
                f"or set wal.transport: poll (no replication connection)"
            )
    role = await conn.fetchrow(
        "SELECT rolname, rolreplication OR rolsuper AS ok FROM pg_roles "
        "WHERE rolname = current_user"
    )
    if not role["ok"]:
        found.append(
            f"role {role['rolname']} lacks the REPLICATION attribute: ALTER ROLE "
            f"{quote_ident(role['rolname'])} REPLICATION (on Supabase use the postgres role, "
            f"which has it; on RDS GRANT rds_replication)"
        )
    for mapping in mappings:
        problem = await identity_problem(conn, mapping)
        if problem is not None:
            found.append(problem)
    return found


async def identity_problem(conn: asyncpg.Connection, mapping: CompiledMapping) -> str | None:
    """Why a DELETE's WAL record would not carry this mapping's key (None: it would).

    A DELETE carries only the source's replica identity: the primary key by default, an index
    chosen with REPLICA IDENTITY USING INDEX, or the whole row with REPLICA IDENTITY FULL.
    """
    source, _, _ = mapping.binding()
    row = await conn.fetchrow(_IDENTITY, source.sql)
    identity, columns = row["identity"], set(row["columns"])
    if identity == "f":
        return None
    needed = sorted(mapping.key_mentioned)
    if identity != "n" and set(needed) <= columns:
        return None
    have = {
        "d": "the default (primary key)" if columns else "the default, and it has no primary key",
        "n": "NOTHING",
        "i": "an index on (" + ", ".join(sorted(columns)) + ")",
    }[identity]
    return (
        f"mapping {mapping.name}: the replica identity of {source} is {have}, so a DELETE's WAL "
        f"record does not carry the key columns ({', '.join(needed)}): ALTER TABLE {source.sql} "
        f"REPLICA IDENTITY FULL, or REPLICA IDENTITY USING INDEX <a unique index on "
        f"({', '.join(needed)})>"
    )


async def require_ready(
    conn: asyncpg.Connection, config: WalConfig, mappings: Sequence[CompiledMapping]
) -> None:
    """Raise WalNotReady listing every problem (nothing to do without WAL-read mappings)."""
    if not mappings:
        return
    found = await problems(conn, config, mappings)
    if found:
        raise WalNotReady(found)


# --- setup and teardown ---------------------------------------------------------------------


@dataclass(frozen=True)
class SlotInfo:
    name: str
    active_pid: int | None
    confirmed: str | None
    retained_bytes: int


async def slot_info(conn: asyncpg.Connection, slot: str) -> SlotInfo | None:
    row = await conn.fetchrow(_SLOT, slot)
    if row is None:
        return None
    return SlotInfo(row["slot_name"], row["active_pid"], row["confirmed"], int(row["retained"]))


async def ensure_publications(
    conn: asyncpg.Connection, config: WalConfig, mappings: Sequence[CompiledMapping]
) -> list[str]:
    """Create or align the publications with the WAL-read mappings; return what changed."""
    sources = sorted({m.binding().source for m in mappings}, key=str)
    lines = [
        await _ensure_publication(
            conn,
            config.publication_name,
            [(s.schema, s.name) for s in sources],
            "insert, update, delete, truncate",
        )
    ]
    if any(m.capture.audits_statement_capture for m in mappings):
        lines.append(
            await _ensure_publication(conn, outbox_publication(config), [OUTBOX_TABLE], "insert")
        )
    return lines


async def _ensure_publication(
    conn: asyncpg.Connection, name: str, tables: list[tuple[str, str]], publish: str
) -> str:
    listed = ", ".join(f"{quote_ident(s)}.{quote_ident(t)}" for s, t in tables)
    have = {(r["schemaname"], r["tablename"]) for r in await conn.fetch(_PUBLICATION_TABLES, name)}
    if not await _publication_exists(conn, name):
        await conn.execute(
            f"CREATE PUBLICATION {quote_ident(name)} FOR TABLE {listed} "
            f"WITH (publish = '{publish}')"
        )
        return f"publication {name}: created on {', '.join(f'{s}.{t}' for s, t in tables)}"
    if have == set(tables):
        return f"publication {name}: already current"
    await conn.execute(f"ALTER PUBLICATION {quote_ident(name)} SET TABLE {listed}")
    await conn.execute(f"ALTER PUBLICATION {quote_ident(name)} SET (publish = '{publish}')")
    return f"publication {name}: now on {', '.join(f'{s}.{t}' for s, t in tables)}"


async def _publication_exists(conn: asyncpg.Connection, name: str) -> bool:
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT FROM pg_publication WHERE pubname = $1)", name
    )
    return found


async def ensure_slot(conn: asyncpg.Connection, slot: str) -> bool:
    """Create the logical slot (pgoutput) unless it exists; True when it was created.

    Creating a slot waits for the transactions running at that moment to end (it needs a
    consistent starting point), so an idle-in-transaction session delays it.
    """
    if await slot_info(conn, slot) is not None:
        return False
    try:
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    except asyncpg.DuplicateObjectError:
        return False
    _log.info("wal_slot_created", slot=slot)
    return True


async def drop_slot(conn: asyncpg.Connection, info: SlotInfo) -> None:
    """Drop the slot, ending the walsender that reads it (a streaming reader's) first: the
    slot stays active until that backend has exited, so the drop is retried meanwhile."""
    if info.active_pid is not None:
        await conn.execute("SELECT pg_terminate_backend($1)", info.active_pid)
    for attempt in range(100):
        try:
            await conn.execute("SELECT pg_drop_replication_slot($1)", info.name)
            return
        except asyncpg.ObjectInUseError:
            if attempt == 99:
                raise
            pid = await conn.fetchval(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", info.name
            )
            if pid is not None:
                await conn.execute("SELECT pg_terminate_backend($1)", pid)
            await asyncio.sleep(0.05)


async def teardown(conn: asyncpg.Connection, config: WalConfig) -> list[str]:
    """Drop the slot and both publications; say what was removed (idempotent)."""
    lines = []
    info = await slot_info(conn, config.slot_name)
    if info is not None:
        await drop_slot(conn, info)
        lines.append(
            f"replication slot {config.slot_name}: dropped (it retained {info.retained_bytes} "
            f"bytes of WAL)"
        )
    else:
        lines.append(f"replication slot {config.slot_name}: not present")
    for name in (config.publication_name, outbox_publication(config)):
        if await _publication_exists(conn, name):
            await conn.execute(f"DROP PUBLICATION {quote_ident(name)}")
            lines.append(f"publication {name}: dropped")
        else:
            lines.append(f"publication {name}: not present")
    return lines


# --- the retained-WAL guard -----------------------------------------------------------------


async def mark_resync(
    conn: asyncpg.Connection, mappings: Sequence[str], reason: str, events: int = 1
) -> None:
    """Record that these mappings need a full resync (reconcile --repair or a backfill)."""
    await conn.execute(
        """
        INSERT INTO dualwrite.resync_needed AS r (mapping, reason, events)
        SELECT m, $2, $3 FROM unnest($1::text[]) AS m
        ON CONFLICT (mapping) DO UPDATE SET reason = EXCLUDED.reason,
            events = r.events + EXCLUDED.events, last_at = now()
        """,
        list(mappings),
        reason,
        events,
    )
    for mapping in mappings:
        metrics.RESYNC_NEEDED.labels(mapping=mapping).set(1)


async def export_resync(conn: asyncpg.Connection, mappings: Sequence[str]) -> None:
    """``dualwrite_resync_needed`` of these mappings from the control schema (whoever marked)."""
    marked = {r["mapping"] for r in await conn.fetch("SELECT mapping FROM dualwrite.resync_needed")}
    for mapping in mappings:
        metrics.RESYNC_NEEDED.labels(mapping=mapping).set(1 if mapping in marked else 0)


async def guard_retained(
    conn: asyncpg.Connection, config: WalConfig, mappings: Sequence[CompiledMapping]
) -> SlotInfo | None:
    """Export the slot's retained WAL; past ``max_retained_bytes`` drop the slot, loudly, and
    mark every WAL-read mapping for resync. Returns the slot (None when absent or dropped)."""
    info = await slot_info(conn, config.slot_name)
    if info is None:
        return None
    metrics.WAL_SLOT_RETAINED_BYTES.labels(slot=info.name).set(info.retained_bytes)
    if info.retained_bytes <= config.max_retained_bytes:
        return info
    names = [m.name for m in mappings]
    _log.error(
        "wal_slot_dropped",
        slot=info.name,
        retained_bytes=info.retained_bytes,
        max_retained_bytes=config.max_retained_bytes,
        mappings=names,
        action="the mappings need a full resync: dualwrite reconcile --repair",
    )
    async with conn.transaction():
        await mark_resync(
            conn,
            names,
            f"slot {info.name} retained {info.retained_bytes} bytes of WAL "
            f"(> wal.max_retained_bytes {config.max_retained_bytes}) and was dropped",
        )
        await conn.execute("DELETE FROM dualwrite.wal_progress WHERE slot = $1", info.name)
    await drop_slot(conn, info)
    metrics.WAL_SLOT_DROPPED.labels(slot=info.name).inc()
    metrics.WAL_SLOT_RETAINED_BYTES.labels(slot=info.name).set(0)
    return None
