"""WAL transport: polling pg_logical_slot_peek_binary_changes against streaming.

The same committed changes are decoded through pgoutput three ways: by the SQL function the
WAL reader's ``poll`` transport calls (a plain connection), by the reader's own ``stream``
transport (START_REPLICATION through libpq, every message decoded by mirror/wal/pgoutput.py),
and by pg_recvlogical over the same replication protocol (a walsender, output discarded).
For each: wall time and changes per second, and the decoding backend's CPU. Also what
polling costs when nothing changed (an idle poll), and the reader's own Python decode per
change. Needs wal_level = logical (``--dsn``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from bench import common
from bench.common import BenchError, Server

PUBLICATION = "dwbench_wal"
TABLE = "dwbench_wal_t"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench wal", description=__doc__)
    common.add_dsn_option(p)
    p.add_argument("--database", default="dwbench_wal")
    p.add_argument("--transactions", type=int, default=200, help="transactions (default 200)")
    p.add_argument("--rows", type=int, default=1000, help="rows inserted per transaction")
    p.add_argument("--trials", type=int, default=3, help="decodes per transport (default 3)")
    p.add_argument("--idle-polls", type=int, default=500, help="idle polls timed (default 500)")
    return p.parse_args(argv)


def _slot(name: str) -> str:
    return f"dwbench_{name}"


def _backend_cpu(pid: int) -> float:
    return common.cpu_seconds(pid)


async def _poll_trials(server: Server, args: argparse.Namespace, total: int) -> dict[str, Any]:
    """Decode everything through the SQL function (peek: the slot keeps its position)."""
    conn = await asyncpg.connect(server.dsn())
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        walls, cpus, pys = [], [], []
        for _ in range(args.trials):
            cpu0, t0 = _backend_cpu(pid), time.perf_counter()
            rows = await conn.fetch(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, "
                "'proto_version', '1', 'publication_names', $2)",
                _slot("poll"),
                PUBLICATION,
            )
            walls.append(time.perf_counter() - t0)
            cpus.append(_backend_cpu(pid) - cpu0)
            pys.append(_python_decode_seconds(rows))
        # an idle poll after the slot was confirmed past everything, but its restart_lsn still
        # before all of it (as between two running-transactions records): every poll re-reads
        await conn.execute(
            "SELECT pg_replication_slot_advance($1, pg_current_wal_flush_lsn())", _slot("idle")
        )
        behind = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = $1", _slot("idle")
        )
        idle_behind = await _idle_poll_us(conn, max(args.idle_polls // 10, 5))
        # then with restart_lsn caught up (what the reader's nudge does on PostgreSQL 16+)
        if int(await conn.fetchval("SHOW server_version_num")) >= 160000:
            await conn.execute("SELECT pg_log_standby_snapshot()")
        for _ in range(2):
            await conn.execute(
                "SELECT pg_replication_slot_advance($1, pg_current_wal_flush_lsn())",
                _slot("idle"),
            )
        caught_up = await conn.fetchval(
            "SELECT pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = $1", _slot("idle")
        )
        idle = await _idle_poll_us(conn, args.idle_polls)
    finally:
        await conn.close()
    wall = common.median(walls) or 0.0
    return {
        "transport": "poll (pg_logical_slot_peek_binary_changes)",
        "wall_s": wall,
        "changes_per_s": total / wall if wall else None,
        "server_cpu_us_per_change": (common.median(cpus) or 0.0) * 1e6 / total,
        "python_decode_us_per_change": (common.median(pys) or 0.0) * 1e6 / total,
        "idle_poll_us": idle,
        "idle_poll_restart_behind_bytes": caught_up,
        "idle_poll_rereading_us": idle_behind,
        "rereading_bytes": behind,
    }


def _python_decode_seconds(rows: Sequence[asyncpg.Record]) -> float:
    from mirror.wal import pgoutput  # noqa: PLC0415

    started = time.perf_counter()
    assembler = pgoutput.TransactionAssembler()
    for _ in assembler.feed_all(pgoutput.decode(bytes(r["data"])) for r in rows):
        pass
    return time.perf_counter() - started


async def _idle_poll_us(conn: asyncpg.Connection, polls: int) -> float:
    """What the reader sends per poll when nothing changed: the flushed position, a peek."""
    started = time.perf_counter()
    for _ in range(polls):
        upto = await conn.fetchval("SELECT pg_current_wal_flush_lsn()")
        await conn.fetch(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::pg_lsn, 10000, "
            "'proto_version', '1', 'publication_names', $3)",
            _slot("idle"),
            upto,
            PUBLICATION,
        )
    return (time.perf_counter() - started) * 1e6 / polls


def _stream_trial(server: Server, slot: str, end_lsn: str, total: int) -> dict[str, float]:
    recv = shutil.which("pg_recvlogical")
    if recv is None:
        raise BenchError("pg_recvlogical is not on PATH")
    argv = [
        recv, "-h", server.host, "-p", str(server.port), "-U", server.user, "-d", server.dbname,
        "--slot", slot, "--start", "-E", end_lsn, "-f", "/dev/null", "--no-loop",
        "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
    ]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=server.env(), capture_output=True, text=True, timeout=600,
                          check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchError(f"pg_recvlogical failed: {done.stderr}")
    return {"wall_s": wall, "changes_per_s": total / wall}


async def _reader_stream_trial(server: Server, slot: str, total: int) -> dict[str, float]:
    """The WAL reader's stream transport: read and decode until ``total`` changes arrived, as
    the reader does (its fast path, only the key column ``id`` decoded)."""
    from mirror.wal import pgoutput  # noqa: PLC0415
    from mirror.wal import stream as wal_stream  # noqa: PLC0415

    t0 = time.perf_counter()
    stream = await wal_stream.ReplicationStream.start(server.dsn(), slot, [PUBLICATION])
    try:
        pid = stream.backend_pid
        cpu0, py0 = _backend_cpu(pid), time.process_time()
        assembler = pgoutput.TransactionAssembler(
            lambda relation: frozenset({"id"}) if relation.name == TABLE else None
        )
        changes = 0
        while changes < total:
            frame = await stream.read(60)
            if frame is None:
                raise BenchError(f"the stream went quiet after {changes} of {total} changes")
            if frame[0] == ord("w"):
                txn = assembler.feed_bytes(frame, wal_stream.XLOGDATA_PAYLOAD)
                if txn is not None:
                    changes += len(txn.changes)
        wall = time.perf_counter() - t0
        cpu, py = _backend_cpu(pid) - cpu0, time.process_time() - py0
    finally:
        await stream.close()
    return {
        "wall_s": wall, "changes_per_s": total / wall, "server_cpu_s": cpu, "python_cpu_s": py
    }


def benchmark(stack: contextlib.ExitStack, args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = common.utc_now()
    server, origin = common.resolve_server(stack, args.dsn)
    db = common.ensure_database(server, args.database)
    if common.query_value(db, "SHOW wal_level") != "logical":
        raise BenchError("the server's wal_level is not logical; pass --dsn of one that is")
    slots = (
        ["poll", "idle"]
        + [f"stream{i}" for i in range(args.trials)]
        + [f"reader{i}" for i in range(args.trials)]
    )
    common.psql(
        db,
        *(f"SELECT pg_drop_replication_slot('{_slot(s)}') FROM pg_replication_slots "
          f"WHERE slot_name = '{_slot(s)}'" for s in slots),
        f"DROP PUBLICATION IF EXISTS {PUBLICATION}",
        f"DROP TABLE IF EXISTS {TABLE}",
        f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, n int NOT NULL, pad text NOT NULL)",
        f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}",
        *(f"SELECT pg_create_logical_replication_slot('{_slot(s)}', 'pgoutput')" for s in slots),
    )
    stack.callback(
        common.psql,
        db,
        *(f"SELECT pg_drop_replication_slot('{_slot(s)}') FROM pg_replication_slots "
          f"WHERE slot_name = '{_slot(s)}'" for s in slots),
        check=False,
    )
    common.progress(f"writing {args.transactions} transactions of {args.rows} rows")
    common.psql(
        db,
        *(f"INSERT INTO {TABLE} (n, pad) SELECT g, md5(g::text) FROM generate_series(1, "
          f"{args.rows}) AS g" for _ in range(args.transactions)),
    )
    total = args.transactions * args.rows
    end_lsn = common.query_value(db, "SELECT pg_current_wal_flush_lsn()")
    common.progress("polling")
    poll = asyncio.run(_poll_trials(db, args, total))
    common.progress("streaming")
    streams = [_stream_trial(db, _slot(f"stream{i}"), end_lsn, total) for i in range(args.trials)]
    stream_wall = common.median(s["wall_s"] for s in streams) or 0.0
    common.progress("streaming (the reader's transport)")
    readers = [
        asyncio.run(_reader_stream_trial(db, _slot(f"reader{i}"), total))
        for i in range(args.trials)
    ]
    reader_wall = common.median(r["wall_s"] for r in readers) or 0.0
    reader_cpu = common.median(r["server_cpu_s"] for r in readers) or 0.0
    reader_py = common.median(r["python_cpu_s"] for r in readers) or 0.0
    rows = [
        [poll["transport"], common.fmt(poll["wall_s"], ".2f"), common.fmt(poll["changes_per_s"]),
         common.fmt(poll["server_cpu_us_per_change"], ".2f")],
        ["stream (the reader's: START_REPLICATION via libpq, key column decoded in Python)",
         common.fmt(reader_wall, ".2f"), common.fmt(total / reader_wall if reader_wall else None),
         common.fmt(reader_cpu * 1e6 / total, ".2f")],
        ["stream (pg_recvlogical, replication protocol, to /dev/null)",
         common.fmt(stream_wall, ".2f"), common.fmt(total / stream_wall if stream_wall else None),
         "-"],
    ]
    meta = common.run_meta("wal", started, argv, origin, common.machine_info(db))
    print(f"### WAL transport: `{meta['command']}`\n")
    print(f"- Date: {meta['date']}; {common.machine_line(meta['machine'])}")
    print(f"- {total:,} inserted rows in {args.transactions} transactions, decoded through "
          f"pgoutput (proto 1, text values), median of {args.trials}\n")
    print(common.markdown_table(["transport", "wall s", "changes/s", "server CPU µs/change"],
                                rows))
    print(f"\nIdle poll (flushed position + an empty peek), restart_lsn "
          f"{poll['idle_poll_restart_behind_bytes']:,} bytes behind: "
          f"{poll['idle_poll_us']:,.0f} µs; with restart_lsn {poll['rereading_bytes']:,} bytes "
          f"behind (all of the above re-read, no output): {poll['idle_poll_rereading_us']:,.0f} "
          f"µs. Python decode of whole rows: {poll['python_decode_us_per_change']:.2f} "
          f"µs/change; the reader's stream loop (its fast path, key column only, including "
          f"libpq reads): {reader_py * 1e6 / total:.2f} µs/change of Python CPU.")
    data = {**meta, "poll": poll, "streams": streams, "reader_streams": readers, "changes": total}
    common.progress(f"results written to {common.write_json('wal', started, data)}")
    return 0


def main(argv: Sequence[str]) -> int:
    return common.run_main("wal", argv, parse_args, benchmark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
