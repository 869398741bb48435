"""Capture from the WAL (issue 12), end to end on a cluster with wal_level = logical.

Every path that writes the audited table: through the sidecar (plain statements, a function, a
DO block, a trigger on another table, COPY) and around it (a direct connection). With
``capture: wal`` all of them reach the target and the proxy rewrites none; with ``both``
statement capture works as before and the reader counts, records and queues exactly the
changes it missed. Then TRUNCATE, replica identity, teardown.
"""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest
from support import needs_tools, pos, wait_until, wal

from core.config import parse_config
from core.errors import WalNotReady
from dualwrite.service import check_live, teardown, validated_mappings
from mirror.wal import slot as wal_slot
from mirror.wal.reader import WalReader


def _start(logical_db, logical_sidecar, capture: str, **wal_settings):
    slot = logical_db.name
    config = wal.migration(capture, slot, **wal_settings)
    lines = wal.prepare(logical_db, config)
    handle = logical_sidecar(config)
    return handle, slot, lines


@pytest.mark.parametrize("transport", ["stream", "poll"])
def test_capture_wal_mirrors_every_path_and_rewrites_nothing(
    logical_db, logical_sidecar, transport
):
    handle, slot, lines = _start(logical_db, logical_sidecar, "wal", transport=transport)
    assert f"publication {slot}: created on public.audit_log" in lines
    assert f"replication slot {slot}: created" in lines
    rewritten = pos.scrape(
        "dualwrite_statements_rewritten_total", mapping=wal.MAPPING, operation="insert"
    )
    writes = wal.Writes()
    proxy_dsn = handle.dsn(user=pos.APP_ROLE)
    wal.run_concurrently(
        lambda i: [
            wal.write_every_way(proxy_dsn, logical_db.dsn, writes, tenant=1 + i % 3)
            for _ in range(5)
        ],
        threads=4,
    )
    wal.wait_applied(logical_db, slot)
    assert pos.divergence(logical_db, [wal.MAPPING]) == {}
    assert pos.target_count(logical_db, wal.MAPPING) == logical_db.scalar(
        "SELECT count(*) FROM audit_log"
    ) > 0
    # the proxy relayed the writes untouched: nothing rewritten, nothing counted as unmirrored
    assert pos.scrape(
        "dualwrite_statements_rewritten_total", mapping=wal.MAPPING, operation="insert"
    ) == rewritten
    assert wal.uncaptured_rows(logical_db) == 0


def test_capture_both_counts_exactly_the_writes_statement_capture_missed(
    logical_db, logical_sidecar
):
    handle, slot, _ = _start(logical_db, logical_sidecar, "both")
    before = pos.scrape("dualwrite_uncaptured_changes_total", mapping=wal.MAPPING)
    writes = wal.Writes()
    proxy_dsn = handle.dsn(user=pos.APP_ROLE)
    wal.run_concurrently(
        lambda i: [
            wal.write_every_way(proxy_dsn, logical_db.dsn, writes, tenant=1 + i % 3)
            for _ in range(5)
        ],
        threads=4,
    )
    wal.wait_applied(logical_db, slot)
    assert pos.divergence(logical_db, [wal.MAPPING]) == {}
    assert writes.rows["statement"] > 0
    assert wal.uncaptured_rows(logical_db) == writes.bypassing
    assert (
        pos.scrape("dualwrite_uncaptured_changes_total", mapping=wal.MAPPING) - before
        == writes.bypassing
    )
    by_operation = dict(
        logical_db.sql(
            "SELECT operation, count(*) FROM dualwrite.uncaptured_changes GROUP BY 1"
        )
    )
    assert by_operation == {
        "insert": writes.bypassing - 2 * 20,  # 20 rounds, each with a direct UPDATE and DELETE
        "update": 20,
        "delete": 20,
    }
    # each one recorded with its transaction and commit time
    assert logical_db.scalar(
        "SELECT count(*) FROM dualwrite.uncaptured_changes "
        "WHERE xid > 0 AND commit_time <= now() AND jsonb_array_length(key) = 1"
    ) == writes.bypassing


def test_a_quiet_mapping_never_pins_the_wal_other_tables_write(logical_db, logical_sidecar):
    _, slot, _ = _start(logical_db, logical_sidecar, "wal")
    logical_db.sql(
        "CREATE TABLE busy (id int, pad text);"
        "INSERT INTO busy SELECT i, repeat(md5(i::text), 20) FROM generate_series(1, 5000) i"
    )
    wal.wait_confirmed(logical_db, slot)  # confirmed past all of it, with no mapped change
    assert logical_db.scalar("SELECT coalesce(sum(changes), 0) FROM dualwrite.wal_progress") == 0
    assert pos.outbox_depth(logical_db) == 0


def test_truncate_of_the_source_marks_the_mapping_for_resync_and_is_counted(
    logical_db, logical_sidecar
):
    _, slot, _ = _start(logical_db, logical_sidecar, "wal")
    before = pos.scrape("dualwrite_wal_truncates_total", mapping=wal.MAPPING)
    logical_db.sql("INSERT INTO audit_log (tenant_id, action, entity) VALUES (1, 'a', 'b')")
    logical_db.sql("TRUNCATE audit_log")
    logical_db.sql("TRUNCATE audit_log")
    wal.wait_confirmed(logical_db, slot)
    assert logical_db.sql("SELECT mapping, reason, events FROM dualwrite.resync_needed") == [
        (wal.MAPPING, "TRUNCATE of the source", 2)
    ]
    assert pos.scrape("dualwrite_wal_truncates_total", mapping=wal.MAPPING) - before == 2
    assert pos.scrape("dualwrite_resync_needed", mapping=wal.MAPPING) == 1


def test_teardown_drops_the_slot_and_publications_and_says_so(logical_db):
    slot = logical_db.name
    config = wal.migration("both", slot)
    lines = wal.prepare(logical_db, config)
    assert f"publication {slot}_outbox: created on dualwrite.outbox" in lines
    again = pos.run_setup(logical_db, config)
    for line in (
        f"publication {slot}: already current",
        f"publication {slot}_outbox: already current",
        f"replication slot {slot}: already present",
    ):
        assert line in again
    parsed = parse_config(pos.service_config(logical_db, config))
    removed = asyncio.run(teardown(parsed))
    assert removed[0].startswith(f"replication slot {slot}: dropped (it retained ")
    assert removed[1:] == [f"publication {slot}: dropped", f"publication {slot}_outbox: dropped"]
    assert logical_db.scalar("SELECT count(*) FROM pg_replication_slots") == 0
    assert logical_db.scalar("SELECT count(*) FROM pg_publication") == 0
    assert asyncio.run(teardown(parsed)) == [
        f"replication slot {slot}: not present",
        f"publication {slot}: not present",
        f"publication {slot}_outbox: not present",
    ]


def test_past_max_retained_bytes_the_slot_is_dropped_loudly_and_the_mapping_needs_resync(
    logical_db,
):
    slot = logical_db.name
    config = wal.migration("wal", slot, max_retained_bytes=1 << 20)
    wal.prepare(logical_db, config)
    # no reader runs: the slot holds back everything written from now on
    logical_db.sql(
        "CREATE TABLE busy (id int, pad text);"
        "INSERT INTO busy SELECT i, repeat(md5(i::text), 20) FROM generate_series(1, 5000) i"
    )
    dropped = pos.scrape("dualwrite_wal_slot_dropped_total", slot=slot)
    parsed = parse_config(pos.service_config(logical_db, config))

    async def one_poll() -> None:
        conn = await asyncpg.connect(logical_db.dsn)
        try:
            mappings = await validated_mappings(conn, parsed)
        finally:
            await conn.close()
        reader = WalReader(
            lambda: asyncpg.connect(logical_db.dsn), mappings, parsed.wal, reader_id="test"
        )
        assert await reader.lead()
        await reader.poll()
        await reader.stop()

    asyncio.run(one_poll())
    assert pos.scrape("dualwrite_wal_slot_dropped_total", slot=slot) - dropped == 1
    ((mapping, reason),) = logical_db.sql("SELECT mapping, reason FROM dualwrite.resync_needed")
    assert mapping == wal.MAPPING
    assert f"slot {slot} retained " in reason
    assert "(> wal.max_retained_bytes 1048576) and was dropped" in reason
    # a new slot reads on from now (the resync covers the gap)
    assert logical_db.scalar(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) < 1048576 "
        "FROM pg_replication_slots WHERE slot_name = %s",
        slot,
    )


def test_check_explains_what_the_wal_reader_is_missing(logical_db, db, pg):
    # the CI server: wal_level = replica
    config = wal.migration("wal", db.name)
    with pytest.raises(WalNotReady, match="wal_level is not logical: set wal_level = logical"):
        wal.prepare(db, config)
    with pytest.raises(WalNotReady, match="wal_level is not logical"):
        asyncio.run(check_live(parse_config({
            **pos.service_config(db, config), "upstream": {"host": pg.host, "port": pg.port}
        })))
    # the logical cluster: a role without REPLICATION, a source whose deletes carry no key
    slot = logical_db.name
    config = wal.migration("wal", slot)
    wal.prepare(logical_db, config)
    logical_db.sql("ALTER TABLE audit_log REPLICA IDENTITY NOTHING")
    logical_db.sql(
        "DO $$ BEGIN CREATE ROLE wal_nobody LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; "
        "END $$"
    )
    parsed = parse_config(pos.service_config(logical_db, config))

    async def problems() -> list[str]:
        conn = await asyncpg.connect(logical_db.dsn)
        try:
            mappings = await validated_mappings(conn, parsed)
        finally:
            await conn.close()
        conn = await asyncpg.connect(logical_db.dsn_as("wal_nobody"))
        try:
            return await wal_slot.problems(conn, parsed.wal, mappings)
        finally:
            await conn.close()

    found = asyncio.run(problems())
    assert found == [
        'role wal_nobody lacks the REPLICATION attribute: ALTER ROLE "wal_nobody" REPLICATION (on '
        "Supabase use the postgres role, which has it; on RDS GRANT rds_replication)",
        "mapping audit_events: the replica identity of public.audit_log is NOTHING, so a "
        "DELETE's WAL record does not carry the key columns (id): ALTER TABLE "
        '"public"."audit_log" REPLICA IDENTITY FULL, or REPLICA IDENTITY USING INDEX <a unique '
        "index on (id)>",
    ]
    logical_db.sql("ALTER TABLE audit_log REPLICA IDENTITY FULL")
    logical_db.sql("ALTER ROLE wal_nobody REPLICATION")
    assert asyncio.run(problems()) == []


def test_a_key_the_target_refuses_goes_through_the_outbox_to_the_dead_letters(
    logical_db, logical_sidecar
):
    _, slot, _ = _start(logical_db, logical_sidecar, "wal")
    logical_db.sql(
        "ALTER TABLE v2.audit_events ADD CONSTRAINT no_forbidden CHECK (action <> 'forbidden')"
    )
    bad = logical_db.scalar(
        "INSERT INTO audit_log (tenant_id, action, entity) VALUES (1, 'forbidden', 'x') "
        "RETURNING id"
    )
    good = logical_db.scalar(
        "INSERT INTO audit_log (tenant_id, action, entity) VALUES (1, 'fine', 'x') RETURNING id"
    )
    wal.wait_confirmed(logical_db, slot)
    wait_until(
        lambda: logical_db.sql("SELECT mapping, key::text, sqlstate FROM dualwrite.dead_letters"),
        what="the refused key to be dead-lettered",
    )
    assert logical_db.sql("SELECT mapping, key::text, sqlstate FROM dualwrite.dead_letters") == [
        (wal.MAPPING, f"[{bad}]", "23514")
    ]
    assert logical_db.sql("SELECT id FROM v2.audit_events") == [(good,)]


@needs_tools("pg_recvlogical")
def test_the_reader_streams_and_takes_its_slot_back_from_a_stray_client(
    logical_db, logical_sidecar
):
    """An operator's pg_recvlogical left running on the slot: the leader (it holds the lock,
    so no other sidecar reads) waits a moment, ends that walsender, streams, and loses nothing
    (pg_recvlogical never confirmed anything)."""
    slot = logical_db.name
    config = wal.migration("wal", slot)
    wal.prepare(logical_db, config)
    logical_db.sql("INSERT INTO audit_log (tenant_id, action, entity) VALUES (1, 'early', 'x')")
    server = logical_db.server
    stray = subprocess.Popen(
        [
            "pg_recvlogical", "-h", server.host, "-p", str(server.port), "-U", server.user,
            "-d", logical_db.name, "--slot", slot, "--start", "-f", "/dev/null", "--no-loop",
            "-o", "proto_version=1", "-o", f"publication_names={slot}", "-s", "3600", "-F", "0",
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: logical_db.scalar(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", slot
            ),
            what="pg_recvlogical to hold the slot",
        )
        logical_sidecar(config)
        logical_db.sql("INSERT INTO audit_log (tenant_id, action, entity) VALUES (1, 'late', 'x')")
        wal.wait_applied(logical_db, slot)
        assert stray.wait(timeout=30) != 0  # its walsender was terminated
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()
    assert logical_db.sql("SELECT action FROM v2.audit_events ORDER BY id") == [
        ("early",), ("late",)
    ]
    assert pos.divergence(logical_db, [wal.MAPPING]) == {}
    # the slot is read by the sidecar's own walsender now
    assert logical_db.sql(
        "SELECT r.application_name FROM pg_replication_slots s "
        "JOIN pg_stat_replication r ON r.pid = s.active_pid WHERE s.slot_name = %s",
        slot,
    ) == [("dualwrite-wal",)]


def test_a_streamed_slot_past_max_retained_bytes_is_dropped_and_streaming_starts_again(
    logical_db,
):
    """The ceiling holds while the slot is active: a transaction left open pins restart_lsn,
    other tables write past the ceiling, and the streaming reader ends its own walsender,
    drops the slot (marking the mapping for resync) and streams from a new one."""
    slot = logical_db.name
    config = wal.migration("wal", slot, max_retained_bytes=1 << 20)
    wal.prepare(logical_db, config)
    logical_db.sql("CREATE TABLE busy (id int, pad text)")
    parsed = parse_config(pos.service_config(logical_db, config))
    dropped = pos.scrape("dualwrite_wal_slot_dropped_total", slot=slot)

    async def run() -> None:
        conn = await asyncpg.connect(logical_db.dsn)
        try:
            mappings = await validated_mappings(conn, parsed)
        finally:
            await conn.close()
        reader = WalReader(
            lambda: asyncpg.connect(logical_db.dsn), mappings, parsed.wal, reader_id="test",
            dsn=logical_db.dsn,
        )
        holder = await asyncpg.connect(logical_db.dsn)
        try:
            assert await reader.lead()
            await reader.poll()
            first = await holder.fetchval(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", slot
            )
            assert first is not None  # streaming
            await holder.execute("BEGIN")
            await holder.execute("INSERT INTO busy VALUES (0, 'pin')")
            logical_db.sql(
                "INSERT INTO busy SELECT i, repeat(md5(i::text), 20) "
                "FROM generate_series(1, 5000) i"
            )
            await reader.poll()  # confirms past it: only restart_lsn is held back
            reader._guarded_at = -1e9  # the guard's turn now
            polling = asyncio.get_running_loop().create_task(reader.poll())
            for _ in range(600):
                if pos.scrape("dualwrite_wal_slot_dropped_total", slot=slot) > dropped:
                    break
                await asyncio.sleep(0.05)
            assert pos.scrape("dualwrite_wal_slot_dropped_total", slot=slot) - dropped == 1
            # a new slot waits for the transactions running when it is created
            await holder.execute("COMMIT")
            await polling
            await reader.poll()
            again = await holder.fetchval(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1", slot
            )
            assert again not in (None, first)
        finally:
            await reader.stop()
            await holder.close()

    asyncio.run(run())
    ((mapping, reason),) = logical_db.sql("SELECT mapping, reason FROM dualwrite.resync_needed")
    assert mapping == wal.MAPPING
    assert "(> wal.max_retained_bytes 1048576) and was dropped" in reason


def test_the_reader_decodes_only_key_columns_yet_a_not_null_domain_column_still_derives(
    logical_db,
):
    """The reader decodes only what key derivation needs of a mapped source's rows: the key
    columns, and the columns of a domain type (a record literal cannot leave those NULL when
    the domain refuses NULL). Rows inserted and updated within one batch reach the target
    exactly; the ones changed twice are derived once. (A DELETE's old row carries only the
    replica identity, so a NOT NULL domain column outside it still fails there, as before.)"""
    slot = logical_db.name
    config = wal.migration("wal", slot, poll_interval_seconds=1.0)
    wal.prepare(logical_db, config)
    logical_db.sql(
        "CREATE DOMAIN strict_action AS text NOT NULL CHECK (VALUE <> '');"
        "ALTER TABLE audit_log ALTER action TYPE strict_action"
    )
    parsed = parse_config(pos.service_config(logical_db, config))

    async def run() -> int:
        conn = await asyncpg.connect(logical_db.dsn)
        try:
            mappings = await validated_mappings(conn, parsed)
        finally:
            await conn.close()
        reader = WalReader(
            lambda: asyncpg.connect(logical_db.dsn), mappings, parsed.wal, reader_id="test",
            dsn=logical_db.dsn,
        )
        try:
            assert await reader.lead()
            await reader.poll()
            logical_db.sql(
                "INSERT INTO audit_log (tenant_id, action, entity, entity_id, details) "
                "SELECT 1, 'insert', 'bulk', i, jsonb_build_object('i', i, 'pad', md5(i::text)) "
                "FROM generate_series(1, 3000) AS i"
            )
            logical_db.sql("UPDATE audit_log SET action = 'touched' WHERE entity_id <= 1000")
            changes = 0
            for _ in range(100):
                changes += (await reader.poll()).changes
                if changes >= 4000:
                    break
            # the outbox is decoded whole (not in masks); audit_log only by id and action
            ((relid, mask),) = reader._assembler.masks.items()
            columns = reader._assembler.relations[relid].columns
            assert {c.name for c, keep in zip(columns, mask, strict=True) if keep} == {
                "id", "action"
            }
            return changes
        finally:
            await reader.stop()

    assert asyncio.run(run()) == 4000
    assert pos.divergence(logical_db, ["audit_events"]) == {}
    touched = "SELECT count(*) FROM v2.audit_events WHERE action = 'touched'"
    assert logical_db.scalar(touched) == 1000
