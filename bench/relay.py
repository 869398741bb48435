"""Relay overhead: pgbench direct, through pgbouncer, a bare uvloop forwarder and dualwrite."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from bench import common
from bench.common import BenchError, Server, Target, Workload

TARGETS = ("direct", "pgbouncer", "bare", "dualwrite")
DEFAULT_SECONDS, QUICK_SECONDS = 15, 5
DEFAULT_WARMUP, QUICK_WARMUP = 5, 2


@dataclass(frozen=True)
class Cell:
    """One workload in one query protocol: a row of the report."""

    workload: Workload
    protocol: str

    @property
    def label(self) -> str:
        return f"{self.workload.name}/{self.protocol}"


@dataclass(frozen=True)
class Run:
    """One pgbench run against one target."""

    cell: str
    target: str
    round: int
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    cpu_seconds: float | None
    cpu_us_per_txn: float | None


# --------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench relay",
        description=(
            "pgbench against direct PostgreSQL, pgbouncer (session pooling) and `dualwrite run` "
            "as a plain relay, interleaved round by round; prints a Markdown table and writes "
            "bench/results/relay-<timestamp>.json."
        ),
    )
    p.add_argument("--dsn", help=f"server to benchmark (default ${common.DSN_ENV}, then local)")
    p.add_argument("--database", default="dwbench", help="database for the pgbench tables")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale (default 10)")
    p.add_argument("--reinit", action="store_true", help="re-create the pgbench tables")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (default 8)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--duration", type=int, help=f"seconds per run (default {DEFAULT_SECONDS})")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--warmup", type=int, help=f"seconds of warm-up per target (default {DEFAULT_WARMUP})"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SECONDS} s per run, {QUICK_WARMUP} s warm-up",
    )
    p.add_argument(
        "--workloads",
        type=common.csv_choices(list(common.WORKLOADS)),
        default=["select", "tpcb"],
        help="comma-separated: select,tpcb (default both)",
    )
    p.add_argument(
        "--protocols",
        type=common.csv_choices(common.PROTOCOLS),
        default=["simple", "prepared"],
        help="comma-separated pgbench -M modes: simple,extended,prepared (default simple,prepared)",
    )
    p.add_argument(
        "--targets",
        type=common.csv_choices(TARGETS),
        default=list(TARGETS),
        help=(
            "comma-separated: direct,pgbouncer,bare,dualwrite (default all; bare is a "
            "uvloop TCP forwarder that parses nothing, the floor for any Python relay)"
        ),
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if min(args.duration, args.rounds, args.clients, args.jobs, args.scale) < 1:
        raise BenchError("--duration, --rounds, --clients, --jobs and --scale must be positive")
    args.targets = [name for name in TARGETS if name in args.targets]  # keep the fixed order
    return args


def plan_cells(args: argparse.Namespace) -> list[Cell]:
    return [
        Cell(common.WORKLOADS[workload], protocol)
        for workload in args.workloads
        for protocol in args.protocols
    ]


# --------------------------------------------------------------------------- running


def start_targets(
    stack: contextlib.ExitStack, server: Server, names: Sequence[str]
) -> list[Target]:
    targets = []
    for name in names:
        if name == "direct":
            targets.append(Target("direct", server))
        elif name == "pgbouncer":
            common.progress("starting pgbouncer")
            targets.append(common.start_pgbouncer(stack, server))
        elif name == "bare":
            common.progress("starting the bare uvloop forwarder (bench/bare_relay.py)")
            targets.append(start_bare_relay(stack, server))
        else:
            common.progress("starting dualwrite run (plain relay, no mappings)")
            targets.append(common.start_sidecar(stack, server))
    for target in targets:
        pid = f", pid {target.process.pid}" if target.process else ""
        common.progress(f"  {target.name}: {target.server.host}:{target.server.port}{pid}")
    return targets


def start_bare_relay(stack: contextlib.ExitStack, server: Server) -> Target:
    """bench/bare_relay.py on a free port, forwarding to ``server``."""
    workdir = common.temp_dir(stack, "dwbench-bare-")
    port = common.free_port()
    argv = [sys.executable, "-m", "bench.bare_relay", str(port), server.host, str(server.port)]
    process = common.start_process(stack, "bare", argv, workdir / "bare.log", cwd=common.REPO_ROOT)
    common.wait_for_port(process, "127.0.0.1", port)
    target = Target("bare", server.at("127.0.0.1", port), process)
    common.wait_until_answers(target.server, "bare")
    return target


def measure(
    target: Target, cell: Cell, round_: int, args: argparse.Namespace, direct: Server
) -> Run:
    """One pgbench run, with the target's CPU time read around it."""
    common.reset_pgbench_tables(direct, checkpoint=cell.workload.writes)
    before = target.cpu_seconds()
    try:
        result = common.run_pgbench(
            target.server,
            cell.workload,
            cell.protocol,
            clients=args.clients,
            jobs=args.jobs,
            seconds=args.duration,
        )
    finally:
        common.check_alive(target)
    after = target.cpu_seconds()
    cpu = None if before is None or after is None else after - before
    per_txn = cpu / result.transactions * 1e6 if cpu is not None and result.transactions else None
    return Run(
        cell=cell.label,
        target=target.name,
        round=round_,
        tps=result.tps,
        latency_ms=result.latency_ms,
        transactions=result.transactions,
        failed=result.failed,
        cpu_seconds=cpu,
        cpu_us_per_txn=per_txn,
    )


def describe(run: Run) -> str:
    cpu = f"  {run.cpu_us_per_txn:6.1f} µs/txn" if run.cpu_us_per_txn is not None else ""
    return f"{run.target:<10} {run.tps:10,.0f} tps {run.latency_ms:7.3f} ms{cpu}"


def measure_cell(
    cell: Cell, targets: Sequence[Target], args: argparse.Namespace, direct: Server
) -> list[Run]:
    """Every round runs every target in turn, so drift over time hits them all alike."""
    runs = []
    for round_ in range(1, args.rounds + 1):
        for target in targets:
            run = measure(target, cell, round_, args, direct)
            runs.append(run)
            common.progress(f"{cell.label:<16} round {round_}/{args.rounds}  {describe(run)}")
    return runs


def warm_up(targets: Sequence[Target], args: argparse.Namespace) -> None:
    """A short select-only run per target: caches, connections and the relay's code paths."""
    if args.warmup <= 0:
        return
    common.progress(f"warming up, {args.warmup} s per target")
    for target in targets:
        try:
            common.run_pgbench(
                target.server,
                common.WORKLOADS["select"],
                "prepared",
                clients=args.clients,
                jobs=args.jobs,
                seconds=args.warmup,
            )
        finally:
            common.check_alive(target)


# --------------------------------------------------------------------------- results


def summarise(cell: Cell, runs: Sequence[Run], names: Sequence[str]) -> dict[str, Any]:
    """Medians per target, the dualwrite ratios, and the spread of TPS across rounds."""
    per_target: dict[str, Any] = {}
    for name in names:
        mine = [run for run in runs if run.target == name]
        tps = [run.tps for run in mine]
        middle = common.median(tps)
        per_target[name] = {
            "median_tps": middle,
            "median_latency_ms": common.median(run.latency_ms for run in mine),
            "median_cpu_us_per_txn": common.median(run.cpu_us_per_txn for run in mine),
            "tps_spread": (max(tps) - min(tps)) / middle if middle and len(tps) > 1 else None,
            "failed": sum(run.failed for run in mine),
        }
    tps_of = {name: per_target[name]["median_tps"] for name in names}
    return {
        "workload": cell.workload.name,
        "protocol": cell.protocol,
        "targets": per_target,
        "dualwrite_vs_pgbouncer": common.ratio(tps_of.get("dualwrite"), tps_of.get("pgbouncer")),
        "dualwrite_vs_direct": common.ratio(tps_of.get("dualwrite"), tps_of.get("direct")),
        "dualwrite_vs_pgbouncer_paired": paired_ratio(runs, "dualwrite", "pgbouncer"),
        "dualwrite_vs_direct_paired": paired_ratio(runs, "dualwrite", "direct"),
        "bare_vs_pgbouncer_paired": paired_ratio(runs, "bare", "pgbouncer"),
        "dualwrite_vs_bare_paired": paired_ratio(runs, "dualwrite", "bare"),
    }


def paired_ratio(runs: Sequence[Run], numerator: str, denominator: str) -> float | None:
    """Median over rounds of the TPS ratio within a round (neighbours in time share the drift)."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.target] = run.tps
    return common.median(
        common.ratio(tps.get(numerator), tps.get(denominator)) for tps in by_round.values()
    )


def _column(summary: dict[str, Any], target: str, key: str) -> float | None:
    return summary["targets"].get(target, {}).get(key)


def table(summaries: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    headers = ["workload", "-M", *(f"{n} TPS" for n in names)]
    bare = "bare" in names
    headers += ["dualwrite / pgbouncer", "dualwrite / direct"]
    headers += ["bare / pgbouncer", "dualwrite / bare"] if bare else []
    headers += [f"{n} ms" for n in names]
    cpu_names = [n for n in names if n != "direct"]
    headers += [f"{n} CPU µs/txn" for n in cpu_names]
    rows = []
    for s in summaries:
        row = [common.WORKLOADS[s["workload"]].label, s["protocol"]]
        row += [common.fmt(_column(s, n, "median_tps")) for n in names]
        row += [common.fmt(s["dualwrite_vs_pgbouncer_paired"], ".2f", "x")]
        row += [common.fmt(s["dualwrite_vs_direct_paired"], ".2f", "x")]
        if bare:
            row += [common.fmt(s["bare_vs_pgbouncer_paired"], ".2f", "x")]
            row += [common.fmt(s["dualwrite_vs_bare_paired"], ".2f", "x")]
        row += [common.fmt(_column(s, n, "median_latency_ms"), ".3f") for n in names]
        row += [common.fmt(_column(s, n, "median_cpu_us_per_txn"), ".1f") for n in cpu_names]
        rows.append(row)
    return common.markdown_table(headers, rows)


def widest_spread(summaries: Sequence[dict[str, Any]]) -> str:
    spreads = [
        (t["tps_spread"], f"{s['workload']}/{s['protocol']} {name}")
        for s in summaries
        for name, t in s["targets"].items()
        if t["tps_spread"] is not None
    ]
    if not spreads:
        return "n/a"
    spread, where = max(spreads)
    return f"{spread:.1%} ({where})"


def report(
    summaries: Sequence[dict[str, Any]], meta: dict[str, Any], args: argparse.Namespace
) -> str:
    machine = meta["machine"]
    order = " → ".join(args.targets)
    rounds = f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''}"
    lines = [
        "### Relay overhead: direct PostgreSQL, pgbouncer, a bare Python relay, dualwrite",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {common.machine_line(machine)}",
        f"- Setup: pgbench {machine['pgbench']}, scale {args.scale}, {args.clients} clients, "
        f"-j {args.jobs}, {args.duration} s per run, {rounds} "
        f"({order}), medians shown; all over TCP on 127.0.0.1, server: {meta['server_origin']}",
        f"- Targets: pgbouncer {machine.get('pgbouncer', 'n/a')} in session pooling; "
        f"dualwrite {machine['dualwrite_commit']} as a plain relay (no mappings)"
        + (
            "; bare = `bench/bare_relay.py`, a uvloop TCP forwarder that parses nothing "
            "(the floor for any asyncio relay)"
            if "bare" in args.targets
            else ""
        ),
        f"- Load average (1 min) at start / end: {meta['load_start']:.2f} / {meta['load_end']:.2f}",
        "",
        table(summaries, args.targets),
        "",
        "TPS excludes connection time; ms is pgbench's average latency; the ratios are the "
        "median of each round's own TPS ratio (runs next to each other in time share the "
        "drift); CPU µs/txn is the process's user+system time (/proc/<pid>/stat) over the run "
        "divided by transactions, the steadiest measure of relay cost on a busy box. "
        f"Widest TPS spread across rounds: {widest_spread(summaries)}.",
    ]
    return "\n".join(lines)


def failures(summaries: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{s['workload']}/{s['protocol']} {name}: {t['failed']} failed transactions"
        for s in summaries
        for name, t in s["targets"].items()
        if t["failed"]
    ]


# --------------------------------------------------------------------------- main


def benchmark(stack: contextlib.ExitStack, args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = common.utc_now()
    server, origin = common.resolve_server(stack, args.dsn)
    common.progress(f"server: {server.dsn()} ({origin})")
    bench_db = common.ensure_database(server, args.database)
    common.init_pgbench(bench_db, args.scale, force=args.reinit)
    targets = start_targets(stack, bench_db, args.targets)
    meta = describe_run(started, argv, bench_db, origin, targets)
    warm_up(targets, args)
    runs: list[Run] = []
    summaries = []
    for cell in plan_cells(args):
        cell_runs = measure_cell(cell, targets, args, bench_db)
        runs += cell_runs
        summaries.append(summarise(cell, cell_runs, args.targets))
    meta["load_end"] = common.load_average()
    print(report(summaries, meta, args))
    data = {**meta, "settings": settings(args), "summaries": summaries}
    data["runs"] = [asdict(run) for run in runs]
    common.progress(f"results written to {common.write_json('relay', started, data)}")
    for problem in failures(summaries):
        common.progress(f"warning: {problem}")
    return 0


def describe_run(
    started: datetime, argv: Sequence[str], server: Server, origin: str, targets: Sequence[Target]
) -> dict[str, Any]:
    machine = common.machine_info(server)
    if any(target.name == "pgbouncer" for target in targets):
        machine["pgbouncer"] = common.pgbouncer_version()
    return {
        "benchmark": "relay",
        "command": common.command_line("relay", argv),
        "date": started.isoformat().replace("+00:00", "Z"),
        "server_origin": origin,
        "load_start": common.load_average(),
        "machine": machine,
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("scale", "clients", "jobs", "duration", "rounds", "warmup", "workloads", "protocols")
    return {key: getattr(args, key) for key in (*keys, "targets", "database")}


def main(argv: Sequence[str]) -> int:
    common.install_interrupt_handlers()
    try:
        args = parse_args(argv)
        with contextlib.ExitStack() as stack:
            return benchmark(stack, args, argv)
    except BenchError as exc:
        print(f"bench relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench relay: interrupted; stopped every process it started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
