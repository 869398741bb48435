"""Shadow reads: pgbench select-only through dualwrite with the shadow off, sampling 0.1 and 1.0."""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from bench import common
from bench.common import BenchError, Server, Target
from bench.measure import Cell, paired_ratio, per_transaction_us, plan_cells, spread, widest_spread

DEFAULT_SECONDS, QUICK_SECONDS = 15, 5
#: target name -> shadow.sample_rate (0: the shadow is off)
TARGETS = {"off": 0.0, "sample 0.1": 0.1, "sample 1.0": 1.0}
VIEW_SCHEMA = "dwshadow"
_SAMPLE = re.compile(r'^dualwrite_shadow_statements_total\{outcome="(\w+)"\} (\S+)$', re.M)


@dataclass(frozen=True)
class Run:
    cell: str
    round: int
    target: str
    tps: float
    latency_ms: float
    transactions: int
    failed: int
    cpu_seconds: float | None
    cpu_us_per_txn: float | None
    #: shadow outcomes counted during the run (dropped included)
    outcomes: dict[str, float]
    #: the sidecar's own process (the relay), without the shadow's worker process
    relay_cpu_us_per_txn: float | None = None

    @property
    def contender(self) -> str:
        return self.target

    @property
    def replayed(self) -> float:
        return sum(v for k, v in self.outcomes.items() if k != "dropped")


@dataclass(frozen=True)
class ShadowTarget:
    target: Target
    admin_port: int

    @property
    def name(self) -> str:
        return self.target.name

    def outcomes(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {outcome: float(value) for outcome, value in _SAMPLE.findall(text)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench shadow",
        description=(
            "pgbench select-only through `dualwrite run` with shadow reads off, sampling 0.1 "
            "and 1.0 (a compatibility view over pgbench_accounts), interleaved round by round; "
            "prints a Markdown table and writes bench/results/shadow-<timestamp>.json."
        ),
    )
    common.add_dsn_option(p)
    p.add_argument("--database", default="dwbench", help="database for the pgbench tables")
    common.add_pgbench_options(p, DEFAULT_SECONDS)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_SECONDS} s per run")
    p.add_argument(
        "--replay-rate",
        type=float,
        default=5.0,
        help="shadow.max_replays_per_second of the sampling sidecars (default 5, the config's)",
    )
    p.add_argument(
        "--relay-native",
        choices=("auto", "off"),
        default="auto",
        help="relay.native of every target (default auto: the native loop where it is built)",
    )
    common.add_protocols_option(p)
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if min(args.duration, args.rounds, args.clients, args.jobs, args.scale) < 1:
        raise BenchError("--duration, --rounds, --clients, --jobs and --scale must be positive")
    return args


def prepare(server: Server) -> None:
    """The compatibility view the shadow compares against, and the control schema."""
    common.psql(
        server,
        f"CREATE SCHEMA IF NOT EXISTS {VIEW_SCHEMA}",
        f"CREATE OR REPLACE VIEW {VIEW_SCHEMA}.pgbench_accounts AS "
        "SELECT aid, bid, abalance, filler FROM pgbench_accounts",
    )


def start_targets(
    stack: contextlib.ExitStack, server: Server, args: argparse.Namespace
) -> list[ShadowTarget]:
    workdir = common.temp_dir(stack, "dwbench-shadow-")
    config_path = workdir / "setup.yaml"
    config_path.write_text(yaml.safe_dump(common.sidecar_config(server, common.free_port())))
    common.dualwrite_setup(config_path, server)
    targets = []
    for name, rate in TARGETS.items():
        admin = common.free_port()
        extra: dict[str, Any] = {
            "admin": {"host": "127.0.0.1", "port": admin},
            "relay": {"native": args.relay_native},
        }
        if rate:
            extra["shadow"] = {
                "sample_rate": rate,
                "max_replays_per_second": args.replay_rate,
                "views": {"public.pgbench_accounts": f"{VIEW_SCHEMA}.pgbench_accounts"},
            }
        common.progress(f"starting dualwrite run ({name})")
        target = common.start_sidecar(stack, server, extra, name=name)
        targets.append(ShadowTarget(target, admin))
    return targets


def measure(target: ShadowTarget, cell: Cell, round_: int, args: argparse.Namespace) -> Run:
    before_cpu, before = target.target.cpu_seconds(), target.outcomes()
    before_own = target.target.own_cpu_seconds()
    result = common.pgbench_against(
        target.target,
        common.WORKLOADS["select"],
        cell.protocol,
        clients=args.clients,
        jobs=args.jobs,
        seconds=args.duration,
    )
    after_cpu, after = target.target.cpu_seconds(), target.outcomes()
    after_own = target.target.own_cpu_seconds()
    cpu = None if before_cpu is None or after_cpu is None else after_cpu - before_cpu
    own = None if before_own is None or after_own is None else after_own - before_own
    return Run(
        cell=cell.label,
        round=round_,
        target=target.name,
        tps=result.tps,
        latency_ms=result.latency_ms,
        transactions=result.transactions,
        failed=result.failed,
        cpu_seconds=cpu,
        cpu_us_per_txn=per_transaction_us(cpu, result.transactions),
        outcomes={k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
        relay_cpu_us_per_txn=per_transaction_us(own, result.transactions),
    )


def summarise(cell: Cell, runs: Sequence[Run], args: argparse.Namespace) -> dict[str, Any]:
    per_target: dict[str, Any] = {}
    for name in TARGETS:
        mine = [run for run in runs if run.target == name]
        per_target[name] = {
            "median_tps": common.median(run.tps for run in mine),
            "tps_spread": spread([run.tps for run in mine]),
            "median_cpu_us_per_txn": common.median(run.cpu_us_per_txn for run in mine),
            "median_relay_cpu_us_per_txn": common.median(
                run.relay_cpu_us_per_txn for run in mine
            ),
            "replays_per_second": common.median(run.replayed / args.duration for run in mine),
            "dropped_per_second": common.median(
                run.outcomes.get("dropped", 0.0) / args.duration for run in mine
            ),
            "mismatched": sum(run.outcomes.get("mismatch", 0.0) for run in mine),
            "failed": sum(run.failed for run in mine),
        }
    off_cpu = per_target["off"]["median_cpu_us_per_txn"]
    for name in TARGETS:
        if name == "off":
            continue
        extra = [
            (run.cpu_seconds - off_cpu * run.transactions / 1e6) / run.replayed * 1e6
            for run in runs
            if run.target == name and run.replayed and run.cpu_seconds is not None and off_cpu
        ]
        per_target[name]["cpu_us_per_replay"] = common.median(extra)
        per_target[name]["vs_off"] = paired_ratio(runs, name, "off", lambda run: run.tps)
    return {"workload": "select", "protocol": cell.protocol, "targets": per_target}


def table(summaries: Sequence[dict[str, Any]]) -> str:
    headers = ["-M", *(f"{n} TPS" for n in TARGETS), "0.1 / off", "1.0 / off"]
    headers += [f"{n} CPU µs/txn" for n in TARGETS]
    headers += [f"{n} relay CPU µs/txn" for n in TARGETS]
    headers += ["replays/s (0.1)", "replays/s (1.0)", "dropped/s (1.0)", "CPU µs/replay (1.0)"]
    rows = []
    for s in summaries:
        t = s["targets"]
        rows.append(
            [
                s["protocol"],
                *(common.fmt(t[n]["median_tps"]) for n in TARGETS),
                common.fmt(t["sample 0.1"]["vs_off"], ".3f", "x"),
                common.fmt(t["sample 1.0"]["vs_off"], ".3f", "x"),
                *(common.fmt(t[n]["median_cpu_us_per_txn"], ".1f") for n in TARGETS),
                *(common.fmt(t[n]["median_relay_cpu_us_per_txn"], ".1f") for n in TARGETS),
                common.fmt(t["sample 0.1"]["replays_per_second"], ".1f"),
                common.fmt(t["sample 1.0"]["replays_per_second"], ".1f"),
                common.fmt(t["sample 1.0"]["dropped_per_second"], ",.0f"),
                common.fmt(t["sample 1.0"]["cpu_us_per_replay"], ",.0f"),
            ]
        )
    return common.markdown_table(headers, rows)


def benchmark(stack: contextlib.ExitStack, args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = common.utc_now()
    server, origin = common.resolve_server(stack, args.dsn)
    bench_db = common.ensure_database(server, args.database)
    # the view depends on pgbench_accounts: pgbench -i at another scale must be able to drop it
    common.psql(bench_db, f"DROP VIEW IF EXISTS {VIEW_SCHEMA}.pgbench_accounts")
    common.init_pgbench(bench_db, args.scale, force=args.reinit)
    prepare(bench_db)
    targets = start_targets(stack, bench_db, args)
    meta = common.run_meta("shadow", started, argv, origin, common.machine_info(bench_db))
    runs: list[Run] = []
    summaries = []
    for cell in plan_cells(["select"], args.protocols):
        cell_runs = []
        for round_ in range(1, args.rounds + 1):
            # each round starts with another target: on a busy box the first run of a round
            # was measured 12-15% faster than identical sidecars after it
            shift = (round_ - 1) % len(targets)
            for target in targets[shift:] + targets[:shift]:
                run = measure(target, cell, round_, args)
                cell_runs.append(run)
                common.progress(
                    f"{cell.label:<16} round {round_}/{args.rounds}  {run.target:<11} "
                    f"{run.tps:10,.0f} tps  replayed {run.replayed:,.0f}  "
                    f"dropped {run.outcomes.get('dropped', 0):,.0f}"
                )
        runs += cell_runs
        summaries.append(summarise(cell, cell_runs, args))
    meta["load_end"] = common.load_average()
    machine = meta["machine"]
    print(
        "\n".join(
            [
                "### Shadow reads: pgbench select-only through dualwrite, shadow off / 0.1 / 1.0",
                "",
                f"- Command: `{meta['command']}`",
                f"- Date: {meta['date']}",
                f"- Machine: {common.machine_line(machine)}",
                f"- Setup: pgbench {machine['pgbench']}, scale {args.scale}, {args.clients} "
                f"clients, -j {args.jobs}, {args.duration} s per run, {args.rounds} interleaved "
                f"rounds (the order rotated each round), medians shown; "
                f"shadow.max_replays_per_second {args.replay_rate:g}; "
                f"view {VIEW_SCHEMA}.pgbench_accounts over pgbench_accounts",
                f"- Load average (1 min) at start / end: {meta['load_start']:.2f} / "
                f"{meta['load_end']:.2f}",
                "",
                table(summaries),
                "",
                "Ratios are the median of each round's own TPS ratio. CPU µs/txn is the "
                "sidecar's with its shadow worker process; relay CPU µs/txn is the relay "
                "process's alone. CPU µs/replay is the sidecar's CPU beyond the shadow-off "
                "sidecar's per-transaction cost, divided by the replays. Widest TPS spread "
                "across rounds: "
                f"{widest_spread(summaries, 'targets')}.",
            ]
        )
    )
    data = {**meta, "summaries": summaries, "runs": [asdict(run) for run in runs]}
    common.progress(f"results written to {common.write_json('shadow', started, data)}")
    return 0


def main(argv: Sequence[str]) -> int:
    return common.run_main("shadow", argv, parse_args, benchmark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
