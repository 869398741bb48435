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
from bench.common import BenchError, Server, Target
from bench.measure import (
    Cell,
    PgbenchRun,
    failed_transactions,
    paired_ratio,
    per_transaction_us,
    plan_cells,
    spread,
    widest_spread,
)

TARGETS = ("direct", "pgbouncer", "bare", "dualwrite", "python")
DEFAULT_SECONDS, QUICK_SECONDS = 15, 5
DEFAULT_WARMUP, QUICK_WARMUP = 5, 2


@dataclass(frozen=True)
class Run(PgbenchRun):
    """One pgbench run against one target, with the target's CPU time over it."""

    target: str
    cpu_seconds: float | None
    cpu_us_per_txn: float | None

    @property
    def contender(self) -> str:
        return self.target


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
    common.add_dsn_option(p)
    p.add_argument("--database", default="dwbench", help="database for the pgbench tables")
    common.add_pgbench_options(p, DEFAULT_SECONDS)
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
        help=(
            "comma-separated: select,tpcb,latency (default select,tpcb; latency is select-only "
            "with one client, for the added µs per transaction)"
        ),
    )
    common.add_protocols_option(p)
    p.add_argument(
        "--targets",
        type=common.csv_choices(TARGETS),
        default=list(TARGETS),
        help=(
            "comma-separated: direct,pgbouncer,bare,dualwrite,python (default all; bare is a "
            "uvloop TCP forwarder that parses nothing, the floor for any Python relay; "
            "dualwrite relays with its native loop (relay.native: auto), python is the same "
            "sidecar with relay.native: off)"
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
        elif name == "python":
            common.progress("starting dualwrite run (plain relay, relay.native: off)")
            targets.append(
                common.start_sidecar(stack, server, {"relay": {"native": "off"}}, name="python")
            )
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
    workload = common.WORKLOADS[cell.workload]
    common.reset_pgbench_tables(direct, checkpoint=workload.writes)
    before = target.cpu_seconds()
    clients = workload.clients or args.clients
    result = common.pgbench_against(
        target,
        workload,
        cell.protocol,
        clients=clients,
        jobs=min(args.jobs, clients),
        seconds=args.duration,
    )
    after = target.cpu_seconds()
    cpu = None if before is None or after is None else after - before
    return Run(
        cell=cell.label,
        round=round_,
        **asdict(result),
        target=target.name,
        cpu_seconds=cpu,
        cpu_us_per_txn=per_transaction_us(cpu, result.transactions),
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
        common.pgbench_against(
            target,
            common.WORKLOADS["select"],
            "prepared",
            clients=args.clients,
            jobs=args.jobs,
            seconds=args.warmup,
        )


# --------------------------------------------------------------------------- results


def summarise(cell: Cell, runs: Sequence[Run], names: Sequence[str]) -> dict[str, Any]:
    """Medians per target, the dualwrite ratios, and the spread of TPS across rounds."""
    per_target: dict[str, Any] = {}
    for name in names:
        mine = [run for run in runs if run.target == name]
        tps = [run.tps for run in mine]
        per_target[name] = {
            "median_tps": common.median(tps),
            "median_latency_ms": common.median(run.latency_ms for run in mine),
            "median_cpu_us_per_txn": common.median(run.cpu_us_per_txn for run in mine),
            "tps_spread": spread(tps),
            "failed": sum(run.failed for run in mine),
        }
    tps_of = {name: per_target[name]["median_tps"] for name in names}
    return {
        "workload": cell.workload,
        "protocol": cell.protocol,
        "targets": per_target,
        "dualwrite_vs_pgbouncer": common.ratio(tps_of.get("dualwrite"), tps_of.get("pgbouncer")),
        "dualwrite_vs_direct": common.ratio(tps_of.get("dualwrite"), tps_of.get("direct")),
        "dualwrite_vs_pgbouncer_paired": paired_tps_ratio(runs, "dualwrite", "pgbouncer"),
        "dualwrite_vs_direct_paired": paired_tps_ratio(runs, "dualwrite", "direct"),
        "bare_vs_pgbouncer_paired": paired_tps_ratio(runs, "bare", "pgbouncer"),
        "dualwrite_vs_bare_paired": paired_tps_ratio(runs, "dualwrite", "bare"),
        "added_us_vs_direct": {
            name: added_latency_us(runs, name) for name in names if name != "direct"
        },
    }


def added_latency_us(runs: Sequence[Run], name: str) -> float | None:
    """Median over rounds of the target's average latency minus direct's in the same round,
    in µs per transaction: what the target adds to each round trip."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.target] = run.latency_ms
    return common.median(
        (values[name] - values["direct"]) * 1000.0
        for values in by_round.values()
        if name in values and "direct" in values
    )


def paired_tps_ratio(runs: Sequence[Run], numerator: str, denominator: str) -> float | None:
    """Median over rounds of the TPS ratio within a round (neighbours in time share the drift)."""
    return paired_ratio(runs, numerator, denominator, lambda run: run.tps)


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
    added_names = cpu_names if "direct" in names else []
    headers += [f"{n} +µs/txn" for n in added_names]
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
        row += [common.fmt(s["added_us_vs_direct"].get(n), ".0f") for n in added_names]
        rows.append(row)
    return common.markdown_table(headers, rows)


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
        f"-j {args.jobs} (the latency workload: 1 client, -j 1), {args.duration} s per run, "
        f"{rounds} "
        f"({order}), medians shown; all over TCP on 127.0.0.1, server: {meta['server_origin']}",
        f"- Targets: pgbouncer {machine.get('pgbouncer', 'n/a')} in session pooling; "
        f"dualwrite {machine['dualwrite_commit']} as a plain relay (no mappings; python: "
        "the same with relay.native: off, every read through the Python relay)"
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
        "divided by transactions, the steadiest measure of relay cost on a busy box; +µs/txn "
        "is the median over rounds of the target's average latency minus direct's (the "
        "latency row runs one client, so that is the time the relay adds to a round trip). "
        f"Widest TPS spread across rounds: {widest_spread(summaries, 'targets')}.",
    ]
    return "\n".join(lines)


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
    for cell in plan_cells(args.workloads, args.protocols):
        cell_runs = measure_cell(cell, targets, args, bench_db)
        runs += cell_runs
        summaries.append(summarise(cell, cell_runs, args.targets))
    meta["load_end"] = common.load_average()
    print(report(summaries, meta, args))
    data = {**meta, "settings": settings(args), "summaries": summaries}
    data["runs"] = [asdict(run) for run in runs]
    common.progress(f"results written to {common.write_json('relay', started, data)}")
    for problem in failed_transactions(summaries, "targets"):
        common.progress(f"warning: {problem}")
    return 0


def describe_run(
    started: datetime, argv: Sequence[str], server: Server, origin: str, targets: Sequence[Target]
) -> dict[str, Any]:
    machine = common.machine_info(server)
    if any(target.name == "pgbouncer" for target in targets):
        machine["pgbouncer"] = common.pgbouncer_version()
    return common.run_meta("relay", started, argv, origin, machine)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("scale", "clients", "jobs", "duration", "rounds", "warmup", "workloads", "protocols")
    return {key: getattr(args, key) for key in (*keys, "targets", "database")}


def main(argv: Sequence[str]) -> int:
    return common.run_main("relay", argv, parse_args, benchmark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
