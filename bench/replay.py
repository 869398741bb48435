"""The proxy's own Python per transaction: pgbench's TPC-B replayed in process, no sockets."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import yaml
from prometheus_client import REGISTRY

from bench import common, mirror
from bench.common import BenchError, Server
from core.config import Config, parse_config
from core.control import ActivityRecorder, MappingStates
from dualwrite.service import validated_mappings
from proxy.host import MirrorContext
from proxy.relay import State
from proxy.rewrite import Rewriter
from proxy.server import ProxyServer
from proxy.session import Session
from proxy.traffic import TrafficRecorder
from proxy.wire import messages as m
from proxy.wire.frames import frame

MODES = ("relay", "sync", "outbox")
PROTOCOLS = ("simple", "prepared")
#: pgbench's built-in TPC-B, one transaction: (statement, parameters, is it a mapped write)
TPCB: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("BEGIN", (), False),
    (
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        ("-1234", "56789"),
        True,
    ),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = $1", ("56789",), False),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2", ("-1234", "42"), False),
    ("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2", ("-1234", "5"), False),
    (
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) "
        "VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
        ("42", "5", "56789", "-1234"),
        True,
    ),
    ("END", (), False),
)


class _Transport:
    """Takes what the session writes and drops it (the replay measures the session only)."""

    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Capture(_Transport):
    """Keeps what the session writes (to answer it while the replay learns its steps)."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data


def _answer(sent: bytes, rows: bytes, status: bytes) -> bytes:
    """What PostgreSQL answers to the frames ``sent``, ``rows`` being the statement's result
    (RowDescription if any, DataRows, CommandComplete) and ``status`` its transaction status."""
    out = []
    pos = 0
    while pos < len(sent):
        typ = sent[pos : pos + 1]
        end = pos + 1 + int.from_bytes(sent[pos + 1 : pos + 5], "big")
        if typ == b"Q":
            out.append(rows + m.ready_for_query(status))
        elif typ == b"P":
            out.append(frame(b"1", b""))
        elif typ == b"B":
            out.append(frame(b"2", b""))
        elif typ == b"C":
            out.append(frame(b"3", b""))
        elif typ == b"D":
            out.append(_split_rows(rows)[0] or frame(b"n", b""))
        elif typ == b"E":
            out.append(_split_rows(rows)[1])
        elif typ == b"S":
            out.append(m.ready_for_query(status))
        pos = end
    return b"".join(out)


def _split_rows(rows: bytes) -> tuple[bytes, bytes]:
    """(RowDescription or b"", the rest)."""
    if not rows.startswith(b"T"):
        return b"", rows
    end = 1 + int.from_bytes(rows[1:5], "big")
    return rows[:end], rows[end:]


def _cstr(text: bytes) -> bytes:
    return text + b"\0"


def _row_description(column: bytes) -> bytes:
    fields = _cstr(column) + (0).to_bytes(4, "big") + (0).to_bytes(2, "big")
    fields += (20).to_bytes(4, "big") + (8).to_bytes(2, "big", signed=True)
    fields += (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")
    return frame(b"T", (1).to_bytes(2, "big") + fields)


def _data_row(value: bytes) -> bytes:
    return frame(b"D", (1).to_bytes(2, "big") + len(value).to_bytes(4, "big") + value)


def _tag(sql: str) -> bytes:
    word = sql.split(maxsplit=1)[0]
    return {
        "BEGIN": b"BEGIN",
        "END": b"COMMIT",
        "SELECT": b"SELECT 1",
        "INSERT": b"INSERT 0 1",
    }.get(word, b"UPDATE 1")


def _literal(sql: str, params: Sequence[str]) -> str:
    for index in range(len(params), 0, -1):  # $10 before $1
        sql = sql.replace(f"${index}", params[index - 1])
    return sql


class Replay:
    """One session and the byte streams of one TPC-B transaction in one protocol."""

    def __init__(self, session: Session, protocol: str, mirrored: bool) -> None:
        self.session = session
        self.steps: list[tuple[bytes, bytes]] = []
        #: per simple step: the statement's result and the status after it
        self.results: list[tuple[bytes, bytes]] = []
        for number, (sql, params, write) in enumerate(TPCB):
            rewritten = mirrored and write
            last = number == len(TPCB) - 1
            ready = m.ready_for_query(b"I" if last else b"T")
            if rewritten:  # the rewritten statement answers with its count(*) row
                rows = (
                    _row_description(b"count") + _data_row(b"1") + m.command_complete(b"SELECT 1")
                )
            elif sql.startswith("SELECT"):
                rows = (
                    _row_description(b"abalance")
                    + _data_row(b"1234")
                    + m.command_complete(b"SELECT 1")
                )
            else:
                rows = m.command_complete(_tag(sql))
            if protocol == "simple":
                self.steps.append((m.build_query(_literal(sql, params).encode()), rows + ready))
                self.results.append((rows, ready[5:6]))
                continue
            name = f"P0_{number}".encode()
            session._client_data(m.build_parse(name, sql.encode(), ()) + m.SYNC_MESSAGE)
            session._upstream_data(frame(b"1", b"") + m.ready_for_query(b"I"))
            values = b"".join(len(v).to_bytes(4, "big") + v.encode() for v in params)
            bind = frame(
                b"B",
                _cstr(b"")
                + _cstr(name)
                + b"\0\0"
                + len(params).to_bytes(2, "big")
                + values
                + b"\0\0",
            )
            client = bind + frame(b"D", b"P\0") + m.build_execute(b"") + m.SYNC_MESSAGE
            if not rows.startswith(b"T"):
                rows = frame(b"n", b"") + rows
            self.steps.append((client, frame(b"2", b"") + rows + ready))

    def learn(self, transactions: int = 3) -> None:
        """Simple protocol: answer what the session really sends upstream (it may prepare
        mirrored writes: Parse at rest, then Bind/Describe/Execute/Sync), until that is the
        same every transaction; the timed loop then replays the last transaction's answers."""
        if not self.results:
            return
        capture = _Capture()
        transport = self.session.upstream.transport
        self.session.upstream.transport = capture  # type: ignore[assignment]
        try:
            for _ in range(transactions):
                learned = []
                for (client, _), (rows, status) in zip(self.steps, self.results, strict=True):
                    self.session._client_data(client)
                    sent = bytes(capture.written)
                    capture.written.clear()
                    reply = _answer(sent, rows, status)
                    self.session._upstream_data(reply)
                    learned.append((client, reply))
                self.steps = learned
        finally:
            self.session.upstream.transport = transport

    def transaction(self) -> None:
        session = self.session
        for client, server in self.steps:
            session._client_data(client)
            session._upstream_data(server)


async def _session(config: Config, mirrored: bool, traffic: bool) -> Session:
    mirror_context = None
    if mirrored:
        conn = await asyncpg.connect(config.effective_service_dsn())
        try:
            mappings = await validated_mappings(conn, config)
        finally:
            await conn.close()
        rewriter = Rewriter(mappings, states=MappingStates())
        recorder = TrafficRecorder(config.traffic, "bench-replay") if traffic else None
        mirror_context = MirrorContext(rewriter, ActivityRecorder("bench-replay"), recorder)
    session = Session(ProxyServer(config, mirror_context), 1)
    session.client.transport = _Transport()  # type: ignore[assignment]
    session.upstream.transport = _Transport()  # type: ignore[assignment]
    session.relay.state = State.READY
    return session


def _rewritten() -> float:
    """dualwrite_statements_rewritten_total, summed over its series."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "dualwrite_statements_rewritten"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def _check(session: Session, mode: str, transactions: int, rewritten: float) -> None:
    """The replay is a conversation the session understood: every reply matched, nothing
    owed after a transaction, and (when mirroring) the two mapped writes of each rewritten."""
    tracker = session.tracker
    if tracker.unexpected or not tracker.idle:
        raise BenchError(f"{mode}: the session did not follow the replay ({tracker!r})")
    expected = 0 if mode == "relay" else 2 * transactions
    if rewritten != expected:
        raise BenchError(f"{mode}: {rewritten:.0f} statements rewritten, expected {expected}")


def _time(run: Callable[[], None], transactions: int) -> float:
    """CPU µs per transaction (this process's CPU time: on a busy machine wall time would
    count other processes' turns; the replay does no I/O, so idle it is the same)."""
    started = time.process_time()
    for _ in range(transactions):
        run()
    return (time.process_time() - started) / transactions * 1e6


async def _measure(server: Server, args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for mode in MODES:
        extra = (
            {}
            if mode == "relay"
            else {"mappings": [s.config(mode) for s in mirror.specs_of("tpcb")]}
        )
        data = {**common.sidecar_config(server, 0, extra), "applier": {"enabled": False}}
        if args.prepared_writes is not None:
            data["limits"] = {"prepared_writes_per_connection": args.prepared_writes}
        config = parse_config(data)
        for protocol in PROTOCOLS:
            session = await _session(config, mode != "relay", args.traffic)
            replay = Replay(session, protocol, mode != "relay")
            replay.learn()
            before, warm = _rewritten(), args.transactions // 10
            for _ in range(warm):  # warm the caches
                replay.transaction()
            _check(replay.session, mode, warm, _rewritten() - before)
            best = min(_time(replay.transaction, args.transactions) for _ in range(args.rounds))
            results.append({"mode": mode, "protocol": protocol, "us_per_txn": best})
            common.progress(f"{mode:7} {protocol:9} {best:7.1f} µs/txn")
    return results


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench replay",
        description=(
            "pgbench's TPC-B transaction (prepared: Bind/Describe/Execute/Sync; simple: Query), "
            "with the replies PostgreSQL sends, fed through a real proxy Session whose sockets "
            "are replaced by no-op transports: the Python cost of relaying and of mirroring, "
            "with no kernel, network or PostgreSQL time in it. Mappings as in `bench mirror` "
            "(accounts and history), validated against its database."
        ),
    )
    parser.add_argument("--dsn", help=f"server (default ${common.DSN_ENV}, then local)")
    parser.add_argument("--database", default="dwbench_mirror", help="bench mirror's database")
    parser.add_argument("--transactions", type=int, default=20_000, help="per round")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many rounds")
    parser.add_argument(
        "--traffic", action="store_true",
        help="mirroring sessions also note statement texts for lint's traffic evidence (the "
        "hot-path part only: the analysis runs in a background task, not in the replay)",
    )
    parser.add_argument(
        "--prepared-writes",
        type=int,
        help="limits.prepared_writes_per_connection (default: config's; 0 replays simple-"
        "protocol mirrored writes as simple Queries, as before prepared writes)",
    )
    args = parser.parse_args(list(argv))
    with contextlib.ExitStack() as stack:
        try:
            root, _ = common.resolve_server(stack, args.dsn)
            server = common.ensure_database(root, args.database)
            common.init_pgbench(server, 10)
            common.psql(server, *mirror.SCHEMA_SQL)
            workdir = common.temp_dir(stack, "dwbench-replay-")
            for mode in ("sync", "outbox"):
                path = workdir / f"{mode}.yaml"
                extra = {"mappings": [s.config(mode) for s in mirror.specs_of("tpcb")]}
                path.write_text(yaml.safe_dump(common.sidecar_config(server, 0, extra)))
                common.dualwrite_setup(path, server)
            results = asyncio.run(_measure(server, args))
            machine = common.machine_info(server)
        except BenchError as exc:
            print(f"bench replay: {exc}", file=sys.stderr)
            return 1
    relay = {r["protocol"]: r["us_per_txn"] for r in results if r["mode"] == "relay"}
    rows = [
        [
            r["mode"],
            r["protocol"],
            common.fmt(r["us_per_txn"], ".1f"),
            common.fmt(common.ratio(r["us_per_txn"], relay[r["protocol"]]), ".1f", "x"),
        ]
        for r in results
    ]
    print("### The proxy's Python per TPC-B transaction, in process")
    print()
    print(f"- Command: `{common.command_line('replay', argv)}`")
    print(f"- Machine: {common.machine_line(machine)}; dualwrite {machine['dualwrite_commit']}")
    print(f"- {args.transactions:,} transactions a round, best of {args.rounds}")
    print()
    print(common.markdown_table(["mode", "-M", "µs/txn", "vs relay"], rows))
    return 0
