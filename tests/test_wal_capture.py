"""Capture from the WAL (issue 12), end to end on a cluster with wal_level = logical.

Every path that writes the audited table: through the sidecar (plain statements, a function, a
DO block, a trigger on another table, COPY) and around it (a direct connection). With
``capture: wal`` all of them reach the target and the proxy rewrites none; with ``both``
statement capture works as before and the reader counts, records and queues exactly the
changes it missed. Then TRUNCATE, replica identity, teardown.
"""

from __future__ import annotations

import pytest
from support import pos, wal

pytestmark = pytest.mark.usefixtures("logical_db")


def _start(logical_db, logical_sidecar, capture: str, **wal_settings):
    slot = logical_db.name
    config = wal.migration(capture, slot, **wal_settings)
    lines = wal.prepare(logical_db, config)
    handle = logical_sidecar(config)
    return handle, slot, lines


def test_capture_wal_mirrors_every_path_and_rewrites_nothing(logical_db, logical_sidecar):
    handle, slot, lines = _start(logical_db, logical_sidecar, "wal")
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
