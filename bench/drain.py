"""Applier drain rate: keys/s of `dualwrite apply` emptying a filled outbox, by batch size."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import yaml

from bench import common
from bench.common import BenchError, Server
from bench.mirror import ITEMS

DATABASE = "dwbench_drain"
DEFAULT_KEYS, QUICK_KEYS = 200_000, 50_000
MAPPING = "drain_items"
SCHEMA_SQL = (
    "CREATE SCHEMA IF NOT EXISTS v2",
    "CREATE TABLE IF NOT EXISTS public.items (id bigint PRIMARY KEY, sku text NOT NULL, "
    "qty integer NOT NULL, price numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL)",
    "CREATE TABLE IF NOT EXISTS v2.items (id bigint PRIMARY KEY, sku text NOT NULL, "
    "quantity integer NOT NULL, price_cents bigint NOT NULL, updated_at timestamptz NOT NULL)",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench drain",
        description=(
            "Fill dualwrite.outbox with KEYS keys whose target rows are stale, then time "
            "`dualwrite apply` until the outbox is empty, for each batch size and worker "
            "count, interleaved round by round; every run is verified (target = mapping of "
            "the source). Timing starts at the first claimed key, so process start-up and "
            "mapping validation are not counted. Prints a Markdown table and writes "
            "bench/results/drain-<timestamp>.json."
        ),
    )
    common.add_dsn_option(parser)
    parser.add_argument("--keys", type=int, default=DEFAULT_KEYS, help="keys queued per run")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_KEYS:,} keys, 1 round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--batches",
        default="500,2000,5000",
        help="applier.batch_size values (default 500,2000,5000)",
    )
    parser.add_argument("--workers", default="1,2", help="applier.workers values (default 1,2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one drain may take")
    return parser


def prepare(server: Server, keys: int) -> None:
    """The source holds ``keys`` rows; the target has each of them, one version behind."""
    common.psql(server, *SCHEMA_SQL)
    have = int(common.query_value(server, "SELECT count(*) FROM public.items"))
    if have != keys:
        common.progress(f"building {keys:,} source rows")
        common.psql(
            server,
            "TRUNCATE public.items",
            "INSERT INTO public.items SELECT g, 'sku-' || g, g % 100, (g % 1000) * 0.25, "
            f"timestamptz '2024-01-01' + g * interval '1 second' FROM generate_series(1, {keys}) g",
            "VACUUM ANALYZE public.items",
        )


def reset(server: Server, keys: int, round_: int) -> None:
    """Stale target rows, and one queued key per source row (in key order)."""
    common.psql(
        server,
        "TRUNCATE v2.items",
        "INSERT INTO v2.items SELECT id, upper(sku), qty - 1, (price * 100)::bigint, updated_at "
        "FROM public.items",
        f"UPDATE public.items SET qty = qty + 1, updated_at = updated_at + interval '{round_} ms'",
        f"DELETE FROM dualwrite.outbox WHERE mapping = '{MAPPING}'",
        f"INSERT INTO dualwrite.outbox (mapping, key) SELECT '{MAPPING}', jsonb_build_array(id) "
        "FROM public.items ORDER BY id",
        "VACUUM ANALYZE public.items",
        "VACUUM ANALYZE v2.items",
        "VACUUM ANALYZE dualwrite.outbox",
    )


def config_for(server: Server, batch: int, workers: int) -> dict[str, Any]:
    return {
        "service_dsn": server.dsn(),
        "logging": {"level": "warning"},
        "applier": {"batch_size": batch, "workers": workers, "poll_interval_seconds": 0.05},
        "mappings": [
            {
                "name": MAPPING,
                "source": ITEMS.source,
                "target": ITEMS.target,
                "key": [ITEMS.key],
                "columns": dict(ITEMS.columns),
            }
        ],
    }


def queued(server: Server) -> int:
    return int(
        common.query_value(
            server, f"SELECT count(*) FROM dualwrite.outbox WHERE mapping = '{MAPPING}'"
        )
    )


def drain_once(
    stack: contextlib.ExitStack, server: Server, batch: int, workers: int, keys: int, timeout: float
) -> dict[str, Any]:
    workdir = common.temp_dir(stack, "dwbench-drain-")
    path = workdir / "dualwrite.yaml"
    path.write_text(yaml.safe_dump(config_for(server, batch, workers)))
    argv = [*common.dualwrite_command(), "apply", "--config", str(path)]
    with contextlib.ExitStack() as run:
        process = common.start_process(
            run,
            "dualwrite apply",
            argv,
            workdir / "apply.log",
            cwd=common.REPO_ROOT,
            env=server.env(),
        )
        deadline = time.monotonic() + timeout
        started = cpu_start = None
        while True:
            if process.exited():
                raise process.died()
            left = queued(server)
            now = time.monotonic()
            if started is None and left < keys:
                started, cpu_start = now, process.cpu_seconds()
            if left == 0:
                break
            if now > deadline:
                raise BenchError(f"the outbox still holds {left:,} keys after {timeout:.0f} s")
            time.sleep(0.02)
        seconds = now - (started or now)
        cpu = process.cpu_seconds() - (cpu_start or 0.0)
    # target = mapping of the source (bench mirror's items mapping), both directions
    counts = common.query_value(server, ITEMS.check_sql())
    expected, actual, missing, extra = (int(v) for v in counts.split("|"))
    if expected != actual or missing or extra:
        raise BenchError(
            f"batch {batch}, workers {workers}: {missing + extra} rows differ after the drain "
            f"({expected} expected, {actual} in the target)"
        )
    return {
        "batch": batch,
        "workers": workers,
        "seconds": seconds,
        "keys_per_second": keys / seconds if seconds else None,
        "applier_cpu_seconds": cpu,
    }


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    keys = QUICK_KEYS if args.quick else args.keys
    rounds = 1 if args.quick else args.rounds
    batches = [int(b) for b in args.batches.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    cells = [(b, w) for w in workers for b in batches]
    common.install_interrupt_handlers()
    started = common.utc_now()
    with contextlib.ExitStack() as stack:
        try:
            root, origin = common.resolve_server(stack, args.dsn)
            server = common.ensure_database(root, DATABASE)
            prepare(server, keys)
            setup = stack.enter_context(contextlib.ExitStack())
            workdir = common.temp_dir(setup, "dwbench-drain-setup-")
            (workdir / "setup.yaml").write_text(yaml.safe_dump(config_for(server, 500, 1)))
            common.dualwrite_setup(workdir / "setup.yaml", server)
            runs: list[dict[str, Any]] = []
            for round_ in range(1, rounds + 1):
                for batch, count in cells if round_ % 2 else reversed(cells):
                    reset(server, keys, round_)
                    run = drain_once(stack, server, batch, count, keys, args.timeout)
                    run["round"] = round_
                    runs.append(run)
                    common.progress(
                        f"round {round_}/{rounds}  batch {batch:>5}  workers {count}  "
                        f"{run['seconds']:6.2f} s  {run['keys_per_second']:>9,.0f} keys/s  "
                        f"applier CPU {run['applier_cpu_seconds']:.1f} s"
                    )
            machine = common.machine_info(server)
        except BenchError as exc:
            print(f"bench drain: {exc}", file=sys.stderr)
            return 1
    rows = []
    for batch, count in cells:
        mine = [r for r in runs if r["batch"] == batch and r["workers"] == count]
        rate = common.median(r["keys_per_second"] for r in mine)
        cpu = common.median(r["applier_cpu_seconds"] for r in mine)
        rows.append(
            [
                common.fmt(batch, ","),
                str(count),
                common.fmt(common.median(r["seconds"] for r in mine), ".2f"),
                common.fmt(rate),
                common.fmt(cpu * 1e6 / keys if cpu is not None else None, ".1f"),
            ]
        )
    table = common.markdown_table(
        ["batch_size", "workers", "seconds", "keys/s", "applier CPU µs/key"], rows
    )
    print(
        "\n".join(
            [
                "### Applier drain: `dualwrite apply` emptying a filled outbox",
                "",
                f"- Command: `{common.command_line('drain', argv)}`",
                f"- Date: {common.iso_date(started)}",
                f"- Machine: {common.machine_line(machine)}; server: {origin}",
                f"- {keys:,} queued keys per run, each a stale target row to update "
                f"(mapping: upper(sku), (price * 100)::bigint, …); {rounds} interleaved "
                f"round{'s' if rounds > 1 else ''}, medians; "
                f"dualwrite {machine['dualwrite_commit']}",
                "",
                table,
                "",
                "seconds: from the first claimed key to an empty outbox (start-up excluded); "
                "every run verified afterwards (target = mapping of the source, EXCEPT both ways).",
            ]
        )
    )
    path = common.write_json("drain", started, {"runs": runs, "machine": machine, "keys": keys})
    common.progress(f"results written to {path}")
    return 0
