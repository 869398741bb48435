"""Mirroring cost: TPC-B and bulk writes unmirrored, by a PL/pgSQL trigger, and by the proxy."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from bench import common
from bench.common import BenchError, Server, Target, Workload
from bench.measure import (
    BackendCpu,
    Cell,
    PgbenchRun,
    box_cpu,
    failed_transactions,
    paired_ratio,
    per_transaction_us,
    plan_cells,
    postmaster_children,
    spread,
    widest_spread,
)

#: none: straight to PostgreSQL, nothing mirrored; trigger: straight to PostgreSQL with a
#: PL/pgSQL AFTER ... FOR EACH ROW trigger per mapping; sync/outbox: through `dualwrite run`
#: with the mappings in that mode; wal/both (opt-in, need wal_level = logical): through
#: `dualwrite run` with outbox mappings captured from the WAL, or by statement and audited by
#: the WAL; relay (opt-in): through `dualwrite run` with no mappings
MODES = ("none", "trigger", "sync", "outbox", "wal", "waldirect", "both", "relay")
DEFAULT_MODES = ("none", "trigger", "sync", "outbox")
MIRRORING = frozenset({"trigger", "sync", "outbox", "wal", "waldirect", "both"})
#: sidecars started once, for the whole benchmark
SIDECAR_MODES = ("sync", "outbox", "relay")
#: sidecars started for each of their runs, with their replication slot: a slot that lived
#: through the other modes' runs would decode (and its reader queue) their writes too
WAL_MODES = ("wal", "waldirect", "both")
#: capture: wal needs no proxy at all: waldirect is the wal sidecar reading the WAL while
#: pgbench connects straight to PostgreSQL
DIRECT_CLIENT_MODES = frozenset({"none", "trigger", "waldirect"})
#: modes whose keys an applier drains after the run (their e2e figures include the drain)
QUEUE_MODES = ("outbox", "wal", "waldirect", "both")
#: issue 12's goals for capture: wal, as ratios to the trigger: PostgreSQL CPU per TPC-B
#: transaction (at most), bulk rows/s end to end (at least)
WAL_GOALS = {"tpcb": ("pg", 0.9), "bulk": ("e2e", 1.5)}
WORKLOAD_NAMES = ("tpcb", "bulk")
#: what issue 3 asks of each proxy mode, as a ratio to the trigger (TPS for TPC-B, rows/s bulk)
GOALS = {"tpcb": 0.85, "bulk": 1.5}
DEFAULT_SECONDS, QUICK_SECONDS = 15, 5
DEFAULT_WARMUP, QUICK_WARMUP = 3, 1
DEFAULT_ROUNDS, QUICK_ROUNDS = 3, 1
MONITOR_APP = "dwbench-monitor"
TRIGGER_NAME = "dwbench_mirror"


# --------------------------------------------------------------------------- the mappings


@dataclass(frozen=True)
class MappingSpec:
    """One mapping as the sidecar config declares it, and as the trigger and the check do it."""

    name: str
    workload: str
    source: str
    target: str
    key: str
    #: source column the key is taken from (the trigger deletes by OLD.<it>)
    source_key: str
    #: target column -> SQL over the source row: the mapping (config, backfill, check)
    columns: dict[str, str]
    #: target column -> the same over NEW, hand-written for the trigger (its fastest form)
    trigger_values: dict[str, str]

    def sidecar_name(self, mode: str) -> str:
        """Each sidecar gets its own mapping names: outbox rows never meet the wrong applier."""
        return f"{self.name}_{mode}"

    def config(self, mode: str) -> dict[str, Any]:
        wal = mode in WAL_MODES
        capture = "wal" if mode == "waldirect" else mode
        return {
            "name": self.sidecar_name(mode),
            "source": self.source,
            "target": self.target,
            "key": [self.key],
            "columns": dict(self.columns),
            "mode": "outbox" if wal else mode,
            "capture": capture if wal else "statement",
            # an unmirrorable statement fails the run instead of silently diverging
            "unsupported": "reject",
        }

    def expected_sql(self) -> str:
        """The target rows the mapping makes of the source table, as it is now."""
        select = ", ".join(f"{expr} AS {col}" for col, expr in self.columns.items())
        return f"SELECT {select} FROM {self.source} AS src"

    def actual_sql(self) -> str:
        return f"SELECT {', '.join(self.columns)} FROM {self.target}"

    def check_sql(self) -> str:
        """One statement: both counts, and the rows each side has that the other lacks."""
        return (
            f"WITH expected AS ({self.expected_sql()}), actual AS ({self.actual_sql()}) "
            "SELECT (SELECT count(*) FROM expected), (SELECT count(*) FROM actual), "
            "(SELECT count(*) FROM (SELECT * FROM expected EXCEPT SELECT * FROM actual) AS m), "
            "(SELECT count(*) FROM (SELECT * FROM actual EXCEPT SELECT * FROM expected) AS x)"
        )

    def backfill_sql(self) -> str:
        return f"INSERT INTO {self.target} ({', '.join(self.columns)}) {self.expected_sql()}"

    def trigger_function(self) -> str:
        """AFTER INSERT/UPDATE/DELETE FOR EACH ROW: upsert the mapped row, or delete it."""
        others = [c for c in self.columns if c != self.key]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in others)
        return f"""
CREATE OR REPLACE FUNCTION public.dwbench_mirror_{self.name}() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM {self.target} WHERE {self.key} = OLD.{self.source_key};
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF OLD.{self.source_key} IS DISTINCT FROM NEW.{self.source_key} THEN
            DELETE FROM {self.target} WHERE {self.key} = OLD.{self.source_key};
        END IF;
    END IF;
    INSERT INTO {self.target} ({", ".join(self.columns)})
    VALUES ({", ".join(self.trigger_values[c] for c in self.columns)})
    ON CONFLICT ({self.key}) DO UPDATE SET {sets};
    RETURN NULL;
END
$fn$"""

    def create_trigger(self) -> str:
        return (
            f"CREATE TRIGGER {TRIGGER_NAME} AFTER INSERT OR UPDATE OR DELETE ON {self.source} "
            f"FOR EACH ROW EXECUTE FUNCTION public.dwbench_mirror_{self.name}()"
        )

    def drop_trigger(self) -> str:
        return f"DROP TRIGGER IF EXISTS {TRIGGER_NAME} ON {self.source}"


ACCOUNTS = MappingSpec(
    name="accounts",
    workload="tpcb",
    source="public.pgbench_accounts",
    target="v2.accounts",
    key="id",
    source_key="aid",
    columns={"id": "aid", "branch": "bid", "balance_cents": "abalance::bigint * 100"},
    trigger_values={
        "id": "NEW.aid",
        "branch": "NEW.bid",
        "balance_cents": "NEW.abalance::bigint * 100",
    },
)
HISTORY = MappingSpec(
    name="history",
    workload="tpcb",
    source="public.pgbench_history",
    target="v2.history",
    key="id",
    source_key="id",  # a bigserial column the setup adds: pgbench's history has no key
    columns={
        "id": "id",
        "account": "aid",
        "teller": "tid",
        "branch": "bid",
        "delta_cents": "delta::bigint * 100",
        "at": "mtime",
    },
    trigger_values={
        "id": "NEW.id",
        "account": "NEW.aid",
        "teller": "NEW.tid",
        "branch": "NEW.bid",
        "delta_cents": "NEW.delta::bigint * 100",
        "at": "NEW.mtime",
    },
)
ITEMS = MappingSpec(
    name="items",
    workload="bulk",
    source="public.items",
    target="v2.items",
    key="id",
    source_key="id",
    columns={
        "id": "id",
        "sku": "upper(sku)",
        "quantity": "qty",
        "price_cents": "(price * 100)::bigint",
        "updated_at": "updated_at",
    },
    trigger_values={
        "id": "NEW.id",
        "sku": "upper(NEW.sku)",
        "quantity": "NEW.qty",
        "price_cents": "(NEW.price * 100)::bigint",
        "updated_at": "NEW.updated_at",
    },
)
SPECS = (ACCOUNTS, HISTORY, ITEMS)

SCHEMA_SQL = (
    "CREATE SCHEMA IF NOT EXISTS v2",
    # pgbench's history has no primary key: give it one the mapping can use as its key
    "ALTER TABLE public.pgbench_history ADD COLUMN IF NOT EXISTS id bigserial PRIMARY KEY",
    "CREATE TABLE IF NOT EXISTS v2.accounts (id integer PRIMARY KEY, branch integer NOT NULL, "
    "balance_cents bigint NOT NULL)",
    "CREATE TABLE IF NOT EXISTS v2.history (id bigint PRIMARY KEY, account integer NOT NULL, "
    "teller integer NOT NULL, branch integer NOT NULL, delta_cents bigint NOT NULL, "
    "at timestamp)",
    "CREATE TABLE IF NOT EXISTS public.items (id bigserial PRIMARY KEY, sku text NOT NULL, "
    "qty integer NOT NULL, price numeric(12,2) NOT NULL, "
    "updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE IF NOT EXISTS v2.items (id bigint PRIMARY KEY, sku text NOT NULL, "
    "quantity integer NOT NULL, price_cents bigint NOT NULL, updated_at timestamptz NOT NULL)",
)


def specs_of(workload: str) -> list[MappingSpec]:
    return [spec for spec in SPECS if spec.workload == workload]


# --------------------------------------------------------------------------- the workloads


@dataclass(frozen=True)
class BenchWorkload:
    """A pgbench workload and how many rows of mapped tables one of its transactions writes."""

    workload: Workload
    rows_per_txn: int


def bulk_script(rows: int) -> str:
    """One transaction: a multi-row INSERT and a multi-row UPDATE of ``rows`` rows each."""
    last = rows - 1
    return "\n".join(
        [
            f"\\set a random(1, :maxid - {last})",
            "BEGIN;",
            "INSERT INTO items (sku, qty, price) SELECT 'new-' || g, g % 100, (g % 1000) * 0.25 "
            f"FROM generate_series(1, {rows}) AS g;",
            "UPDATE items SET qty = qty + 1, price = price + 0.01, updated_at = now() "
            f"WHERE id BETWEEN :a AND :a + {last};",
            "END;",
            "",
        ]
    )


def build_workloads(args: argparse.Namespace, workdir: Path) -> dict[str, BenchWorkload]:
    script = workdir / "bulk.sql"
    script.write_text(bulk_script(args.bulk_rows))
    bulk = Workload(
        "bulk",
        f"bulk ({args.bulk_rows}-row INSERT + UPDATE)",
        ("-f", str(script), "-D", f"maxid={args.bulk_preload}"),
        writes=True,
    )
    return {
        # per transaction: one pgbench_accounts UPDATE and one pgbench_history INSERT
        "tpcb": BenchWorkload(common.WORKLOADS["tpcb"], rows_per_txn=2),
        "bulk": BenchWorkload(bulk, rows_per_txn=2 * args.bulk_rows),
    }


@dataclass(frozen=True)
class Run(PgbenchRun):
    """One pgbench run in one mode."""

    mode: str
    rows: int
    seconds: float
    rows_per_s: float
    #: outbox: seconds from pgbench's end until the mapping's outbox was empty
    drain_tail_s: float | None
    #: rows over (pgbench's measured time + drain tail): what the target actually absorbed
    e2e_rows_per_s: float
    e2e_tps: float
    sidecar_cpu_us_per_txn: float | None
    pg_cpu_us_per_txn: float | None
    box_cpu_us_per_txn: float | None
    box_busy: float | None
    load_1min: float
    idle_sidecars_cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def contender(self) -> str:
        return self.mode


# --------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench mirror",
        description=(
            "pgbench TPC-B (pgbench_accounts and pgbench_history mapped to v2.accounts and "
            "v2.history) and a bulk-write workload (multi-row INSERT and UPDATE on a mapped "
            "table), each with no mirror, with a PL/pgSQL trigger doing the same mapping, and "
            "through `dualwrite run` in sync and outbox mode (outbox timed until the applier "
            "has drained it), interleaved round by round. Every mirrored run is verified "
            "(target = mapping of source). Prints a Markdown table and writes "
            "bench/results/mirror-<timestamp>.json."
        ),
    )
    common.add_dsn_option(p)
    p.add_argument(
        "--database",
        default="dwbench_mirror",
        help="database for the tables (default "
        "dwbench_mirror; its pgbench_history gets an id column)",
    )
    common.add_pgbench_options(p, DEFAULT_SECONDS)
    p.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds (default {DEFAULT_ROUNDS}, quick {QUICK_ROUNDS})",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help=f"seconds of warm-up per mode and workload (default {DEFAULT_WARMUP})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_SECONDS} s per run, {QUICK_WARMUP} s warm-up, {QUICK_ROUNDS} round",
    )
    p.add_argument(
        "--workloads",
        type=common.csv_choices(WORKLOAD_NAMES),
        default=list(WORKLOAD_NAMES),
        help="comma-separated: tpcb,bulk (default both)",
    )
    p.add_argument(
        "--modes",
        type=common.csv_choices(MODES),
        default=list(DEFAULT_MODES),
        help="comma-separated: none,trigger,sync,outbox,wal,waldirect,both,relay (default none,"
        "trigger,sync,outbox; wal, waldirect and both capture from the WAL and need wal_level = "
        "logical, waldirect with pgbench straight to PostgreSQL; relay is the sidecar with no "
        "mappings, to separate the hop from the mirror)",
    )
    common.add_protocols_option(p)
    p.add_argument(
        "--bulk-rows", type=int, default=500, help="rows per bulk INSERT and UPDATE (default 500)"
    )
    p.add_argument(
        "--bulk-preload",
        type=int,
        default=200_000,
        help="rows in items at the start of each bulk run; the UPDATEs hit these (default 200000)",
    )
    p.add_argument(
        "--applier-workers", type=int, help="outbox sidecar applier.workers (default: config's)"
    )
    p.add_argument(
        "--prepared-writes",
        type=int,
        help="the sidecars' limits.prepared_writes_per_connection (default: config's; 0 runs "
        "simple-protocol mirrored writes as simple Queries, as before prepared writes)",
    )
    p.add_argument(
        "--applier-batch-size",
        type=int,
        help="outbox sidecar applier.batch_size (default: config's)",
    )
    p.add_argument(
        "--wal-transport",
        choices=("stream", "poll"),
        default="stream",
        help="wal.transport of the wal/waldirect/both sidecars (default stream)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the outbox to drain after a run (default 600)",
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_SECONDS if args.quick else DEFAULT_SECONDS
    if args.warmup is None:
        args.warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else DEFAULT_ROUNDS
    numbers = (args.duration, args.rounds, args.clients, args.jobs, args.scale, args.bulk_rows)
    if min(numbers) < 1:
        raise BenchError("--duration, --rounds, --clients, --jobs, --scale, --bulk-rows must be >0")
    if args.bulk_preload < args.bulk_rows:
        raise BenchError("--bulk-preload must be at least --bulk-rows")
    args.modes = [mode for mode in MODES if mode in args.modes]  # fixed order
    args.workloads = [name for name in WORKLOAD_NAMES if name in args.workloads]
    return args


# --------------------------------------------------------------------------- measuring CPU


class Monitor:
    """A long-lived connection for what the benchmark asks the server while measuring."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._runner = asyncio.Runner()
        self._conn: asyncpg.Connection = self._runner.run(
            asyncpg.connect(
                host=server.host,
                port=server.port,
                user=server.user,
                password=server.password,
                database=server.dbname,
                server_settings={"application_name": MONITOR_APP},
            )
        )
        self.pid = int(self.value("SELECT pg_backend_pid()"))
        self.postmaster = self._local_postmaster()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._runner.run(self._conn.close())
        self._runner.close()

    def value(self, sql: str, *params: Any) -> Any:
        return self._runner.run(self._conn.fetchval(sql, *params))

    def _local_postmaster(self) -> int | None:
        """The postmaster's pid when the server runs on this machine and /proc shows it."""
        try:
            pid = int(self.value("SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)"))
            if self.pid not in postmaster_children(pid):
                return None
        except (asyncpg.PostgresError, OSError, ValueError):
            return None
        return pid

    def sampler(self) -> BackendCpu | None:
        if self.postmaster is None:
            return None
        return BackendCpu(self.postmaster, {self.server.dbname}, exclude={self.pid})

    def wait_sessions_gone(self, timeout: float = 10.0) -> None:
        """Wait until pgbench's backends (application_name dwbench) have exited."""
        deadline = time.monotonic() + timeout
        sql = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'dwbench'"
        )
        while self.value(sql) and time.monotonic() < deadline:
            time.sleep(0.02)

    def outbox_depth(self, names: Sequence[str]) -> int:
        return int(
            self.value("SELECT count(*) FROM dualwrite.outbox WHERE mapping = ANY($1)", names)
        )

    def outbox_empty(self, names: Sequence[str]) -> bool:
        """Cheap (an index probe), unlike count(*) over a queue of millions of keys."""
        return not self.value(
            "SELECT EXISTS (SELECT 1 FROM dualwrite.outbox WHERE mapping = ANY($1))", names
        )

    def dead_letters(self, names: Sequence[str]) -> int:
        return int(
            self.value("SELECT count(*) FROM dualwrite.dead_letters WHERE mapping = ANY($1)", names)
        )

    def wait_wal_read(self, slot: str, target: Target, timeout: float) -> None:
        """Until the slot's reader confirmed every commit made so far (so its keys are queued).

        A transactional logical message from this session, committed synchronously, flushes
        every earlier commit: the flushed position then covers all of pgbench's."""
        self.value("SET synchronous_commit = on")
        self.value("SELECT pg_logical_emit_message(true, 'dwbench', 'flush')")
        lsn = self.value("SELECT pg_current_wal_flush_lsn()")
        deadline = time.monotonic() + timeout
        sql = "SELECT confirmed_flush_lsn >= $2 FROM pg_replication_slots WHERE slot_name = $1"
        while not self.value(sql, slot, lsn):
            common.check_alive(target)
            if time.monotonic() > deadline:
                raise BenchError(f"slot {slot} not confirmed to {lsn} {timeout:.0f} s after a run")
            time.sleep(0.02)

    def wait_drained(self, names: Sequence[str], target: Target, timeout: float) -> float:
        """Poll until the outbox holds no key of these mappings; the monotonic time it did."""
        deadline = time.monotonic() + timeout
        while True:
            if self.outbox_empty(names):
                return time.monotonic()
            common.check_alive(target)
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the outbox of {', '.join(names)} still holds {self.outbox_depth(names)} "
                    f"keys {timeout:.0f} s after the run; is the applier of {target.name} "
                    f"running? Its output:\n"
                    f"{target.process.log_tail() if target.process else ''}"
                )
            time.sleep(0.1)


@dataclass
class Snapshot:
    """CPU counters read around one run."""

    sidecars: dict[str, float]
    box_busy: float
    box_total: float


def snapshot(sidecars: Sequence[Target]) -> Snapshot:
    busy, total = box_cpu()
    return Snapshot({t.name: t.cpu_seconds() or 0.0 for t in sidecars}, busy, total)


# --------------------------------------------------------------------------- setup


def prepare_database(server: Server, args: argparse.Namespace) -> None:
    """pgbench tables (history with a key), the items table, the v2 targets, the triggers'
    functions; then drop any trigger a previous interrupted run left behind."""
    if args.reinit:
        common.psql(server, "DROP TABLE IF EXISTS v2.accounts, v2.history")
    common.init_pgbench(server, args.scale, force=args.reinit)
    common.psql(server, *SCHEMA_SQL)
    common.psql(server, *(spec.trigger_function() for spec in SPECS))
    common.psql(server, *(spec.drop_trigger() for spec in SPECS))


def sidecar_extra(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """The part of a sidecar's config that differs by mode (mappings and applier)."""
    if mode == "relay":
        return {}
    applier: dict[str, Any] = {"enabled": mode in QUEUE_MODES}
    if mode in QUEUE_MODES:
        if args.applier_workers is not None:
            applier["workers"] = args.applier_workers
        if args.applier_batch_size is not None:
            applier["batch_size"] = args.applier_batch_size
    extra: dict[str, Any] = {
        "mappings": [spec.config(mode) for spec in SPECS if spec.workload in args.workloads],
        "applier": applier,
    }
    if mode in WAL_MODES:
        extra["wal"] = {
            "slot_name": wal_slot(mode),
            "publication_name": wal_slot(mode),
            "transport": args.wal_transport,
        }
    if args.prepared_writes is not None:
        extra["limits"] = {"prepared_writes_per_connection": args.prepared_writes}
    return extra


def wal_slot(mode: str) -> str:
    return f"dwbench_{mode}"


@contextlib.contextmanager
def wal_sidecar(ctx: Context, mode: str) -> Iterator[Target]:
    """A sidecar of a WAL mode for one run: ``dualwrite setup`` creates its publication and slot,
    and on exit the sidecar stops and ``dualwrite teardown`` drops them."""
    extra = sidecar_extra(ctx.args, mode)
    path = ctx.workdir / f"setup-{mode}.yaml"
    path.write_text(yaml.safe_dump(common.sidecar_config(ctx.server, 0, extra)))
    with contextlib.ExitStack() as stack:
        common.dualwrite_setup(path, ctx.server, what=f"dualwrite setup ({mode})")
        stack.callback(dualwrite_teardown, path, ctx.server)
        target = common.start_sidecar(stack, ctx.server, extra, name=f"dualwrite-{mode}")
        yield target


def dualwrite_teardown(config_path: Path, server: Server) -> None:
    argv = [*common.dualwrite_command(), "teardown", "--config", str(config_path)]
    done = subprocess.run(
        argv, env=server.env(), cwd=common.REPO_ROOT, capture_output=True, text=True,
        timeout=120, check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"dualwrite teardown failed: {done.stdout}{done.stderr}")


def dualwrite_setup(server: Server, extra: dict[str, Any], workdir: Path, mode: str) -> None:
    """``dualwrite setup --config``: installs the control schema and validates the mappings."""
    path = workdir / f"setup-{mode}.yaml"
    path.write_text(yaml.safe_dump(common.sidecar_config(server, 0, extra)))
    for line in common.dualwrite_setup(path, server, what=f"dualwrite setup ({mode})"):
        common.progress(f"  setup {mode}: {line}")


def start_sidecars(
    stack: contextlib.ExitStack, server: Server, args: argparse.Namespace, workdir: Path
) -> dict[str, Target]:
    """One `dualwrite run` per proxy mode (a mapping's mode is per config)."""
    sidecars: dict[str, Target] = {}
    for mode in SIDECAR_MODES:
        if mode not in args.modes:
            continue
        extra = sidecar_extra(args, mode)
        if extra:
            dualwrite_setup(server, extra, workdir, mode)
        common.progress(f"starting dualwrite run ({mode})")
        target = common.start_sidecar(stack, server, extra, name=f"dualwrite-{mode}")
        assert target.process is not None
        common.progress(
            f"  {target.name}: {target.server.host}:{target.server.port}, pid {target.process.pid}"
        )
        sidecars[mode] = target
    for mode in WAL_MODES:
        if mode in args.modes:
            # the control schema and the mappings checked now; the slot lives only during runs
            dualwrite_setup(server, sidecar_extra(args, mode), workdir, mode)
            dualwrite_teardown(workdir / f"setup-{mode}.yaml", server)
    return sidecars


# --------------------------------------------------------------------------- a run


def all_sidecar_names() -> list[str]:
    return [spec.sidecar_name(mode) for spec in SPECS for mode in ("sync", *QUEUE_MODES)]


def reset(server: Server, monitor: Monitor, workload: str, args: argparse.Namespace) -> None:
    """Put the workload's source and target tables back to the same starting state."""
    leftover = monitor.outbox_depth(all_sidecar_names())
    if leftover:
        raise BenchError(f"{leftover} keys left in dualwrite.outbox before a reset")
    statements = [spec.drop_trigger() for spec in specs_of(workload)]
    if workload == "tpcb":
        # pgbench's own reset (history emptied) plus a fresh copy of the accounts' mapping
        statements += [
            "TRUNCATE pgbench_history, v2.history, v2.accounts RESTART IDENTITY",
            ACCOUNTS.backfill_sql(),
            "VACUUM ANALYZE pgbench_branches, pgbench_tellers, pgbench_accounts, "
            "pgbench_history, v2.accounts, v2.history",
        ]
    else:
        statements += [
            "TRUNCATE items, v2.items RESTART IDENTITY",
            "INSERT INTO items (sku, qty, price, updated_at) SELECT 'sku-' || g, g % 100, "
            f"(g % 1000) * 0.25, now() FROM generate_series(1, {args.bulk_preload}) AS g",
            ITEMS.backfill_sql(),
            "VACUUM ANALYZE items, v2.items",
        ]
    # the outbox is a queue: without a vacuum its index keeps every claimed key, and each
    # claim walks them (autovacuum may be off, and is slower than the churn anyway)
    statements.append("VACUUM dualwrite.outbox")
    common.psql(server, *statements)
    # start every run at the same point of the checkpoint cycle
    common.psql(server, "CHECKPOINT", check=False)


def verify(server: Server, workload: str, mode: str, cell: Cell, round_: int) -> None:
    """Fail loudly unless each target equals its mapping applied to the source."""
    for spec in specs_of(workload):
        out = common.query_value(server, spec.check_sql())
        expected, actual, missing, extra = (int(v) for v in out.split("|"))
        if expected != actual or missing or extra:
            raise BenchError(
                f"MIRROR IS WRONG after {cell.label} {mode} round {round_}: {spec.target} "
                f"has {actual} rows, the mapping of {spec.source} gives {expected}; "
                f"{missing} expected rows missing or different, {extra} target rows not "
                f"expected. Tables left as they are for inspection."
            )


@dataclass
class Context:
    """What every run needs."""

    args: argparse.Namespace
    server: Server
    monitor: Monitor
    workloads: dict[str, BenchWorkload]
    targets: dict[str, Target]
    sidecars: list[Target]
    workdir: Path


def measure(ctx: Context, cell: Cell, mode: str, round_: int) -> Run:
    """Reset, run pgbench (and wait for the outbox to drain), read CPU, verify."""
    if mode not in WAL_MODES:
        return measure_with(ctx, cell, mode, round_, ctx.targets[mode], ctx.sidecars)
    reset(ctx.server, ctx.monitor, cell.workload, ctx.args)  # before the slot exists
    with wal_sidecar(ctx, mode) as sidecar:
        ctx.targets[mode] = sidecar
        client = Target("direct", ctx.server) if mode in DIRECT_CLIENT_MODES else sidecar
        return measure_with(
            ctx, cell, mode, round_, sidecar, [*ctx.sidecars, sidecar], reset_=False, client=client
        )


def measure_with(
    ctx: Context,
    cell: Cell,
    mode: str,
    round_: int,
    target: Target,
    sidecars: list[Target],
    *,
    reset_: bool = True,
    client: Target | None = None,
) -> Run:
    args, server, monitor = ctx.args, ctx.server, ctx.monitor
    bench_workload = ctx.workloads[cell.workload]
    specs = specs_of(cell.workload)
    if reset_:
        reset(server, monitor, cell.workload, args)
    if mode == "trigger":
        common.psql(server, *(spec.create_trigger() for spec in specs))
    sampler = monitor.sampler()
    try:
        before = snapshot(sidecars)
        if sampler is not None:
            sampler.start()
        result = common.run_pgbench(
            (client or target).server,
            bench_workload.workload,
            cell.protocol,
            clients=args.clients,
            jobs=args.jobs,
            seconds=args.duration,
        )
        ended = time.monotonic()
        tail = None
        if mode in WAL_MODES:
            monitor.wait_wal_read(wal_slot(mode), target, args.drain_timeout)
        if mode in QUEUE_MODES:
            names = [spec.sidecar_name(mode) for spec in specs]
            tail = monitor.wait_drained(names, target, args.drain_timeout) - ended
            dead = monitor.dead_letters(names)
            if dead:
                raise BenchError(f"{dead} keys dead-lettered in {cell.label} outbox")
        monitor.wait_sessions_gone()
        after = snapshot(sidecars)
    finally:
        pg_cpu = sampler.stop() if sampler is not None else None
        common.check_alive(target)
        if mode == "trigger":
            common.psql(server, *(spec.drop_trigger() for spec in specs))
    if mode in MIRRORING:
        verify(server, cell.workload, mode, cell, round_)
    return make_run(ctx, cell, mode, round_, result, tail, before, after, pg_cpu)


def make_run(
    ctx: Context,
    cell: Cell,
    mode: str,
    round_: int,
    result: common.PgbenchResult,
    tail: float | None,
    before: Snapshot,
    after: Snapshot,
    pg_cpu: float | None,
) -> Run:
    txns = result.transactions
    rows = txns * ctx.workloads[cell.workload].rows_per_txn
    seconds = txns / result.tps if result.tps else 0.0
    e2e_seconds = seconds + (tail or 0.0)

    def per_txn(cpu: float | None) -> float | None:
        return per_transaction_us(cpu, txns)

    mine = ctx.targets[mode].name
    sidecar_cpu = after.sidecars[mine] - before.sidecars[mine] if mine in after.sidecars else None
    idle = {
        name: round(after.sidecars[name] - before.sidecars[name], 3)
        for name in after.sidecars
        if name != mine
    }
    box_busy = after.box_busy - before.box_busy
    box_total = after.box_total - before.box_total
    return Run(
        cell=cell.label,
        round=round_,
        **asdict(result),
        mode=mode,
        rows=rows,
        seconds=seconds,
        rows_per_s=rows / seconds if seconds else 0.0,
        drain_tail_s=tail,
        e2e_rows_per_s=rows / e2e_seconds if e2e_seconds else 0.0,
        e2e_tps=txns / e2e_seconds if e2e_seconds else 0.0,
        sidecar_cpu_us_per_txn=per_txn(sidecar_cpu),
        pg_cpu_us_per_txn=per_txn(pg_cpu),
        box_cpu_us_per_txn=per_txn(box_busy),
        box_busy=box_busy / box_total if box_total else None,
        load_1min=common.load_average(),
        idle_sidecars_cpu_s=idle,
    )


def describe(run: Run) -> str:
    parts = [f"{run.mode:<8} {run.tps:9,.1f} tps {run.rows_per_s:10,.0f} rows/s"]
    if run.drain_tail_s is not None:
        parts.append(f"(e2e {run.e2e_rows_per_s:,.0f} rows/s, drain +{run.drain_tail_s:.2f} s)")
    if run.sidecar_cpu_us_per_txn is not None:
        parts.append(f"sidecar {run.sidecar_cpu_us_per_txn:,.0f} µs/txn")
    if run.pg_cpu_us_per_txn is not None:
        parts.append(f"pg {run.pg_cpu_us_per_txn:,.0f} µs/txn")
    parts.append(f"load {run.load_1min:.2f}")
    return "  ".join(parts)


def warm_up(ctx: Context) -> None:
    """A short run of each workload per mode's target: caches, connections, code paths."""
    args = ctx.args
    if args.warmup <= 0:
        return
    common.progress(f"warming up, {args.warmup} s per mode and workload")
    seen: set[str] = set()
    for mode in args.modes:
        target = ctx.targets[mode]
        if target.name in seen:
            continue
        seen.add(target.name)
        for workload in args.workloads:
            reset(ctx.server, ctx.monitor, workload, args)
            with contextlib.ExitStack() as stack:
                client = target
                if mode in WAL_MODES:
                    target = stack.enter_context(wal_sidecar(ctx, mode))
                    direct = mode in DIRECT_CLIENT_MODES
                    client = Target("direct", ctx.server) if direct else target
                common.pgbench_against(
                    client,
                    ctx.workloads[workload].workload,
                    args.protocols[-1],
                    clients=args.clients,
                    jobs=args.jobs,
                    seconds=args.warmup,
                )
                if mode in WAL_MODES:
                    ctx.monitor.wait_wal_read(wal_slot(mode), target, args.drain_timeout)
                if mode in QUEUE_MODES:
                    names = [spec.sidecar_name(mode) for spec in specs_of(workload)]
                    ctx.monitor.wait_drained(names, target, args.drain_timeout)


def measure_cell(ctx: Context, cell: Cell) -> list[Run]:
    """Every round runs every mode in turn, so drift over time hits them all alike."""
    runs = []
    for round_ in range(1, ctx.args.rounds + 1):
        for mode in ctx.args.modes:
            run = measure(ctx, cell, mode, round_)
            runs.append(run)
            common.progress(f"{cell.label:<14} round {round_}/{ctx.args.rounds}  {describe(run)}")
    return runs


# --------------------------------------------------------------------------- results


def vs_trigger(runs: Sequence[Run], mode: str, key: str) -> float | None:
    """Median over rounds of mode's ``key`` over the trigger's in the same round (the trigger
    has no drain tail: its e2e rows/s is its rows/s)."""
    return paired_ratio(runs, mode, "trigger", lambda run: float(getattr(run, key)))


def summarise(cell: Cell, runs: Sequence[Run], modes: Sequence[str]) -> dict[str, Any]:
    per_mode: dict[str, Any] = {}
    for mode in modes:
        mine = [run for run in runs if run.mode == mode]
        tps = [run.tps for run in mine]
        goal = GOALS[cell.workload]
        client = vs_trigger(runs, mode, "rows_per_s") if mode != "trigger" else 1.0
        e2e = vs_trigger(runs, mode, "e2e_rows_per_s") if mode != "trigger" else 1.0
        pg = vs_trigger(runs, mode, "pg_cpu_us_per_txn") if mode != "trigger" else 1.0
        per_mode[mode] = {
            "median_tps": common.median(tps),
            "median_rows_per_s": common.median(run.rows_per_s for run in mine),
            "median_e2e_rows_per_s": common.median(run.e2e_rows_per_s for run in mine),
            "median_e2e_tps": common.median(run.e2e_tps for run in mine),
            "median_latency_ms": common.median(run.latency_ms for run in mine),
            "median_drain_tail_s": common.median(run.drain_tail_s for run in mine),
            "median_sidecar_cpu_us_per_txn": common.median(
                run.sidecar_cpu_us_per_txn for run in mine
            ),
            "median_pg_cpu_us_per_txn": common.median(run.pg_cpu_us_per_txn for run in mine),
            "median_box_cpu_us_per_txn": common.median(run.box_cpu_us_per_txn for run in mine),
            "median_box_busy": common.median(run.box_busy for run in mine),
            "tps_spread": spread(tps),
            "failed": sum(run.failed for run in mine),
            "vs_trigger_client": client,
            "vs_trigger_e2e": e2e,
            "vs_trigger_pg_cpu": pg,
            "wal_goal": wal_goal(cell.workload, mode, pg, e2e),
            "goal": goal if mode in ("sync", "outbox") else None,
            "goal_met_client": None
            if mode not in ("sync", "outbox") or client is None
            else client >= goal,
            "goal_met_e2e": None if mode not in ("sync", "outbox") or e2e is None else e2e >= goal,
        }
    return {"workload": cell.workload, "protocol": cell.protocol, "modes": per_mode}


def wal_goal(workload: str, mode: str, pg: float | None, e2e: float | None) -> str | None:
    """Issue 12's goal for this workload, judged (capture modes only)."""
    if mode not in WAL_MODES:
        return None
    what, bound = WAL_GOALS[workload]
    if what == "pg":
        met = None if pg is None else pg <= bound
        text = f"PG CPU ≤{bound:.2f}x"
    else:
        met = None if e2e is None else e2e >= bound
        text = f"e2e ≥{bound:.2f}x"
    return f"{text}: {'n/a' if met is None else 'met' if met else 'MISS'}"


def verdict(entry: dict[str, Any], mode: str) -> str:
    if entry.get("wal_goal"):
        return str(entry["wal_goal"])
    if entry["goal"] is None:
        return ""
    goal = f"≥{entry['goal']:.2f}x"
    if entry["goal_met_client"] is None:
        return "n/a"
    if mode == "outbox":
        client = "met" if entry["goal_met_client"] else "MISS"
        e2e = "met" if entry["goal_met_e2e"] else "MISS"
        return f"{goal}: client {client}, e2e {e2e}"
    return f"{goal}: {'met' if entry['goal_met_e2e'] else 'MISS'}"


def table(summaries: Sequence[dict[str, Any]], workloads: dict[str, BenchWorkload]) -> str:
    headers = [
        "workload",
        "-M",
        "mode",
        "TPS",
        "rows/s",
        "e2e rows/s",
        "vs trigger",
        "vs trigger e2e",
        "goal",
        "ms",
        "drain tail s",
        "sidecar µs/txn",
        "PG µs/txn",
        "PG vs trigger",
    ]
    rows = []
    for s in summaries:
        for mode, e in s["modes"].items():
            rows.append(
                [
                    workloads[s["workload"]].workload.label,
                    s["protocol"],
                    mode,
                    common.fmt(e["median_tps"], ",.1f" if s["workload"] == "bulk" else ",.0f"),
                    common.fmt(e["median_rows_per_s"]),
                    common.fmt(e["median_e2e_rows_per_s"]),
                    common.fmt(e["vs_trigger_client"], ".2f", "x"),
                    common.fmt(e["vs_trigger_e2e"], ".2f", "x"),
                    verdict(e, mode),
                    common.fmt(e["median_latency_ms"], ".2f"),
                    common.fmt(e["median_drain_tail_s"], ".2f") if mode in QUEUE_MODES else "-",
                    common.fmt(e["median_sidecar_cpu_us_per_txn"], ",.0f")
                    if mode in SIDECAR_MODES or mode in WAL_MODES
                    else "-",
                    common.fmt(e["median_pg_cpu_us_per_txn"], ",.0f"),
                    common.fmt(e.get("vs_trigger_pg_cpu"), ".2f", "x"),
                ]
            )
    return common.markdown_table(headers, rows)


def load_range(runs: Iterable[Run]) -> str:
    loads = [run.load_1min for run in runs]
    return f"{min(loads):.2f} to {max(loads):.2f}" if loads else "n/a"


def report(
    summaries: Sequence[dict[str, Any]],
    runs: Sequence[Run],
    meta: dict[str, Any],
    args: argparse.Namespace,
    workloads: dict[str, BenchWorkload],
) -> str:
    machine = meta["machine"]
    order = " → ".join(args.modes)
    rounds = f"{args.rounds} interleaved round{'s' if args.rounds > 1 else ''}"
    applier = meta["applier"]
    lines = [
        "### Mirroring cost: no mirror, PL/pgSQL trigger, dualwrite sync and outbox",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {common.machine_line(machine)}",
        f"- Setup: pgbench {machine['pgbench']}, scale {args.scale}, {args.clients} clients, "
        f"-j {args.jobs}, {args.duration} s per run, {rounds} ({order}), medians shown; all "
        f"over TCP on 127.0.0.1; server: {meta['server_origin']}, fsync {meta['fsync']}, "
        f"synchronous_commit {meta['synchronous_commit']}; dualwrite "
        f"{machine['dualwrite_commit']}; outbox applier in the sidecar: {applier}; WAL "
        f"reader transport (wal modes): {args.wal_transport}",
        "- Mappings: pgbench_accounts → v2.accounts (id: aid, branch: bid, balance_cents: "
        "abalance::bigint * 100); pgbench_history (+ `id bigserial PRIMARY KEY` added by the "
        "setup) → v2.history (…, delta_cents: delta::bigint * 100); items → v2.items (sku: "
        "upper(sku), quantity: qty, price_cents: (price * 100)::bigint, …)",
        f"- Bulk: one transaction = INSERT … SELECT … generate_series(1, {args.bulk_rows}) + "
        f"UPDATE … WHERE id BETWEEN :a AND :a + {args.bulk_rows - 1} on {args.bulk_preload:,} "
        f"preloaded rows ({2 * args.bulk_rows} rows/txn); TPC-B: 2 mapped rows/txn",
        f"- Load average (1 min) at start / end: {meta['load_start']:.2f} / "
        f"{meta['load_end']:.2f}; after each run: {load_range(runs)}",
        "",
        table(summaries, workloads),
        "",
        "TPS excludes connection time. rows/s = rows written to mapped tables per second on the "
        "client side; e2e rows/s also waits for the mirror: for outbox, wal and both it is rows "
        "over (pgbench's time + the drain tail, until the WAL reader had confirmed every commit "
        "(wal, both) and `dualwrite.outbox` of the mappings was empty again with the sidecar's "
        "applier working), for the others it equals rows/s. wal/both sidecars are started with "
        "their replication slot for each of their runs and torn down after it, so no slot "
        "decodes the other modes' runs; pgbench goes through the sidecar for wal and both (with "
        "wal the proxy relays the writes untouched), and straight to PostgreSQL for waldirect "
        "(capture: wal needs no proxy; the sidecar only reads the WAL and applies). "
        "PG vs trigger = PG µs/txn over the trigger's, median of per-round ratios (issue 12's "
        "goals: ≤0.9x on TPC-B, and bulk e2e rows/s ≥1.5x). "
        "vs trigger = median over rounds of the run's rows/s (or e2e rows/s) over the trigger "
        "run's rows/s in the same round (= the TPS ratio). Goals (issue 3): TPC-B ≥ 0.85x the "
        "trigger, bulk ≥ 1.5x. sidecar µs/txn = the sidecar's user+system CPU over the run "
        "(outbox: until drained, so the applier's work is in it) per transaction; PG µs/txn = "
        "CPU of the bench database's PostgreSQL backends per transaction, sampled from /proc "
        "every 0.1 s (pgbench's or the proxy's sessions, the sidecar's pool with the applier; "
        "not other databases' backends, not the checkpointer or WAL writer). Every "
        "mirrored run was verified: target = mapping of the source (count and EXCEPT both ways)."
        f" Widest TPS spread across rounds: {widest_spread(summaries, 'modes')}.",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def describe_run(
    started: datetime, argv: Sequence[str], server: Server, origin: str, args: argparse.Namespace
) -> dict[str, Any]:
    from core.config import ApplierConfig  # noqa: PLC0415

    defaults = ApplierConfig()
    applier = {
        "workers": args.applier_workers or defaults.workers,
        "batch_size": args.applier_batch_size or defaults.batch_size,
        "poll_interval_seconds": defaults.poll_interval_seconds,
    }
    return {
        **common.run_meta("mirror", started, argv, origin, common.machine_info(server)),
        "fsync": common.query_value(server, "SHOW fsync"),
        "synchronous_commit": common.query_value(server, "SHOW synchronous_commit"),
        "applier": ", ".join(f"{k} {v}" for k, v in applier.items()),
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "scale",
        "clients",
        "jobs",
        "duration",
        "rounds",
        "warmup",
        "workloads",
        "protocols",
        "modes",
        "database",
        "bulk_rows",
        "bulk_preload",
        "applier_workers",
        "applier_batch_size",
        "prepared_writes",
    )
    return {key: getattr(args, key) for key in keys}


def benchmark(stack: contextlib.ExitStack, args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = common.utc_now()
    server, origin = common.resolve_server(stack, args.dsn)
    common.progress(f"server: {server.dsn()} ({origin})")
    bench_db = common.ensure_database(server, args.database)
    prepare_database(bench_db, args)
    workdir = common.temp_dir(stack, "dwbench-mirror-")
    workloads = build_workloads(args, workdir)
    sidecars = start_sidecars(stack, bench_db, args, workdir)
    monitor = Monitor(bench_db)
    stack.callback(monitor.close)
    if monitor.postmaster is None:
        common.progress("PostgreSQL is not local (or not readable): no PG CPU figures")
    direct = Target("direct", bench_db)
    targets = {mode: sidecars.get(mode, direct) for mode in args.modes}
    ctx = Context(args, bench_db, monitor, workloads, targets, list(sidecars.values()), workdir)
    meta = describe_run(started, argv, bench_db, origin, args)
    warm_up(ctx)
    runs: list[Run] = []
    summaries = []
    for cell in plan_cells(args.workloads, args.protocols):
        cell_runs = measure_cell(ctx, cell)
        runs += cell_runs
        summaries.append(summarise(cell, cell_runs, args.modes))
    meta["load_end"] = common.load_average()
    print(report(summaries, runs, meta, args, workloads))
    data = {**meta, "settings": settings(args), "summaries": summaries}
    data["runs"] = [asdict(run) for run in runs]
    common.progress(f"results written to {common.write_json('mirror', started, data)}")
    for problem in failed_transactions(summaries, "modes"):
        common.progress(f"warning: {problem}")
    return 0


def main(argv: Sequence[str]) -> int:
    return common.run_main("mirror", argv, parse_args, benchmark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
