"""Reconcile speed: a clean dualwrite pass against reladiff, same- and cross-database, rows/s."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import common
from bench.common import BenchError, Server
from bench.measure import BackendCpu, box_cpu, paired_ratio, postmaster_children, spread
from core.config import ReconcileConfig

DEFAULT_ROWS, QUICK_ROWS = 10_000_000, 1_000_000
DEFAULT_ROUNDS = 3
VERIFY_ROWS = 100_000
#: what issue 4 asks of a clean same-database pass
GOAL_RATIO, GOAL_ROWS_PER_SECOND = 2.0, 1_000_000
#: the table layout; bump it when the layout or the generated values change (tables rebuild)
LAYOUT = "v1"
COLUMNS = ("id", "qty", "amount", "note", "created_at", "ref")
TABLE_DDL = (
    "(id bigint NOT NULL, qty integer, amount numeric(12,2), note text, "
    "created_at timestamptz, ref uuid)"
)
#: deterministic rows, so the cross-database target is generated, not copied; every 97th note
#: is NULL (both tools must treat NULL = NULL as equal)
ROWS_SQL = (
    "SELECT g, (g % 1000)::integer, round((g % 100000) / 7.0, 2), "
    "CASE WHEN g % 97 = 0 THEN NULL ELSE 'item ' || (g % 9973) || ' ' || left(md5(g::text), 12) "
    "END, timestamptz '2020-01-01 00:00:00+00' + g * interval '1 second' "
    "+ (g % 1000) * interval '1 microsecond', md5(g::text)::uuid "
    "FROM generate_series(1, {rows}) AS g"
)
#: per-session setting of the build's own psql sessions only (index builds); documented
BUILD_SETTINGS = "SET maintenance_work_mem = '512MB'"
#: the server settings that matter to a scan-heavy comparison, shown in the header
PG_SETTINGS = (
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "max_parallel_workers_per_gather",
    "max_parallel_workers",
    "jit",
    "random_page_cost",
    "autovacuum",
)


# --------------------------------------------------------------------------- the tables


@dataclass(frozen=True)
class Pair:
    """A source table and its target, which lives in the source's database or another one."""

    name: str
    source: str
    target: str
    cross: bool

    @property
    def label(self) -> str:
        return "cross-DB" if self.cross else "same-DB"


SAME = Pair("same", "cmp_source", "cmp_target", cross=False)
CROSS = Pair("cross", "cmp_source", "cmp_target", cross=True)
VERIFY_SAME = Pair("verify_same", "cmpv_source", "cmpv_target", cross=False)
VERIFY_CROSS = Pair("verify_cross", "cmpv_source", "cmpv_target", cross=True)


def marker(rows: int) -> str:
    return f"dwbench compare {LAYOUT} rows={rows}"


def table_marker(server: Server, table: str) -> str | None:
    found = common.query_value(
        server, f"SELECT coalesce(obj_description(to_regclass('{table}'), 'pg_class'), '')"
    )
    return found or None


def tables_ready(source_db: Server, target_db: Server, rows: int) -> bool:
    """Whether all three big tables exist, finished (their comment is set last) at ``rows``."""
    wanted = marker(rows)
    found = [
        table_marker(source_db, SAME.source),
        table_marker(source_db, SAME.target),
        table_marker(target_db, CROSS.target),
    ]
    return all(f == wanted for f in found)


def run_statements(server: Server, statements: Sequence[str]) -> None:
    """Each statement in its own psql (so none runs into psql's 600 s per call)."""
    for statement in statements:
        common.psql(server, statement)


def fill_table(table: str, rows_sql: str) -> list[str]:
    """Statements creating ``table`` with the rows of ``rows_sql``, key and statistics."""
    return [
        f"DROP TABLE IF EXISTS {table}",
        f"CREATE TABLE {table} {TABLE_DDL}",
        f"INSERT INTO {table} {rows_sql}",
        f"{BUILD_SETTINGS}; ALTER TABLE {table} ADD PRIMARY KEY (id)",
        # autovacuum may be off (it is here): VACUUM sets the visibility map the key walks'
        # index-only scans need and the hint bits, ANALYZE the statistics
        f"VACUUM (ANALYZE) {table}",
    ]


def generate_table(table: str, rows: int) -> list[str]:
    """``table`` with ``rows`` generated rows."""
    return fill_table(table, ROWS_SQL.format(rows=rows))


def copy_table(source: str, table: str) -> list[str]:
    """``table`` with a copy of ``source``'s rows."""
    return fill_table(table, f"SELECT * FROM {source}")


def mark(table: str, rows: int) -> str:
    return f"COMMENT ON TABLE {table} IS '{marker(rows)}'"


def build_pairs(source_db: Server, target_db: Server, rows: int) -> float:
    """Build the source, the same-DB target and (concurrently) the cross-DB target; seconds."""
    started = time.monotonic()
    source_side = [
        *generate_table(SAME.source, rows),
        *copy_table(SAME.source, SAME.target),
        mark(SAME.source, rows),
        mark(SAME.target, rows),
    ]
    target_side = [*generate_table(CROSS.target, rows), mark(CROSS.target, rows)]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(run_statements, source_db, source_side),
            pool.submit(run_statements, target_db, target_side),
        ]
        for job in jobs:
            job.result()
    return time.monotonic() - started


#: the divergences seeded into the verification targets: key -> what was done to it
SEEDED: dict[str, list[tuple[int, str]]] = {
    "missing": [
        (1, "deleted (first key)"),
        (50_000, "deleted"),
        (VERIFY_ROWS, "deleted (last key)"),
    ],
    "extra": [(VERIFY_ROWS + 5, "inserted past the end"), (25_000_000, "inserted far past")],
    "changed": [
        (7, "qty + 1"),
        (20_001, "amount + 0.01"),
        (30_003, "note set to NULL"),
        (40_004, "created_at + 1 µs"),
        (60_006, "ref replaced"),
    ],
}
SEED_SQL = [
    "DELETE FROM {t} WHERE id IN (1, 50000, {n})",
    "INSERT INTO {t} SELECT g + 0, 1, 1.00, 'extra', now(), md5('x' || g)::uuid "
    "FROM unnest(ARRAY[{n} + 5, 25000000]::bigint[]) AS g",
    "UPDATE {t} SET qty = qty + 1 WHERE id = 7",
    "UPDATE {t} SET amount = amount + 0.01 WHERE id = 20001",
    "UPDATE {t} SET note = NULL WHERE id = 30003",
    "UPDATE {t} SET created_at = created_at + interval '1 microsecond' WHERE id = 40004",
    "UPDATE {t} SET ref = md5('changed')::uuid WHERE id = 60006",
]


def expected_counts() -> dict[str, int]:
    return {cls: len(keys) for cls, keys in SEEDED.items()}


def build_verify_pairs(source_db: Server, target_db: Server) -> None:
    """A small pair in each layout, rebuilt every run, with ``SEEDED``'s divergences."""
    n = VERIFY_ROWS
    seed = [s.format(t=VERIFY_SAME.target, n=n) for s in SEED_SQL]
    source_side = [
        *generate_table(VERIFY_SAME.source, n),
        *copy_table(VERIFY_SAME.source, VERIFY_SAME.target),
        *seed,
        f"VACUUM (ANALYZE) {VERIFY_SAME.target}",
    ]
    seed = [s.format(t=VERIFY_CROSS.target, n=n) for s in SEED_SQL]
    target_side = [
        *generate_table(VERIFY_CROSS.target, n),
        *seed,
        f"VACUUM (ANALYZE) {VERIFY_CROSS.target}",
    ]
    run_statements(source_db, source_side)
    run_statements(target_db, target_side)


def warm_cache(source_db: Server, target_db: Server) -> None:
    """Read every heap and key index once, so round 1 does not pay for cold pages alone."""
    for server, table in (
        (source_db, SAME.source),
        (source_db, SAME.target),
        (target_db, CROSS.target),
    ):
        common.psql(
            server,
            f"SELECT count(*) FROM {table}",
            "SET enable_seqscan = off; SET max_parallel_workers_per_gather = 0; "
            f"SELECT count(*) FROM {table} WHERE id > 0",
        )


def table_sizes(source_db: Server, target_db: Server) -> dict[str, str]:
    size = "pg_size_pretty(pg_table_size('{t}'))"
    index = "pg_size_pretty(pg_indexes_size('{t}'))"
    return {
        f"{db.dbname}.{t}": common.query_value(
            db, f"SELECT {size.format(t=t)} || ' heap, ' || {index.format(t=t)} || ' index'"
        )
        for db, t in ((source_db, SAME.source), (source_db, SAME.target), (target_db, CROSS.target))
    }


# --------------------------------------------------------------------------- the tools


@dataclass(frozen=True)
class Tool:
    """One way of comparing one pair: a column of the interleaved rounds."""

    name: str
    program: str  # dualwrite | reladiff
    pair: Pair
    #: reladiff's --algorithm; dualwrite's differ is chosen by the mapping (same/cross)
    algorithm: str


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("dualwrite-same", "dualwrite", SAME, "same_database"),
        Tool("reladiff-joindiff", "reladiff", SAME, "joindiff"),
        Tool("reladiff-hashdiff-same", "reladiff", SAME, "hashdiff"),
        Tool("dualwrite-cross", "dualwrite", CROSS, "cross_database"),
        Tool("reladiff-hashdiff-cross", "reladiff", CROSS, "hashdiff"),
    )
}
#: (numerator, denominator) of the ratios reported
RATIOS = (
    ("dualwrite-same", "reladiff-joindiff"),
    ("dualwrite-same", "reladiff-hashdiff-same"),
    ("dualwrite-cross", "reladiff-hashdiff-cross"),
)


def mapping_name(pair: Pair) -> str:
    return f"cmp_{pair.name}"


def dualwrite_config(
    source_db: Server, target_db: Server, args: argparse.Namespace
) -> dict[str, Any]:
    """An identity mapping per pair (same column names, expression = column)."""
    mappings = []
    for pair in (SAME, CROSS, VERIFY_SAME, VERIFY_CROSS):
        mapping: dict[str, Any] = {
            "name": mapping_name(pair),
            "source": f"public.{pair.source}",
            "target": f"public.{pair.target}",
            "key": ["id"],
            "columns": {c: c for c in COLUMNS},
            "mode": "outbox",
        }
        if pair.cross:
            mapping["target_dsn"] = target_db.dsn()
        mappings.append(mapping)
    config: dict[str, Any] = {
        "service_dsn": source_db.dsn(),
        "logging": {"level": "info", "format": "json"},
        "mappings": mappings,
    }
    reconcile: dict[str, Any] = {}
    if args.chunk_rows:
        reconcile["chunk_rows"] = args.chunk_rows
    if args.workers:
        reconcile["workers"] = args.workers
    if reconcile:
        config["reconcile"] = reconcile
    return config


@dataclass(frozen=True)
class Code:
    """Which dualwrite the benchmark runs: the work tree, or a read-only export of HEAD."""

    argv: tuple[str, ...]
    cwd: Path
    label: str


def dualwrite_code(stack: contextlib.ExitStack, which: str) -> Code:
    """``tree``: the checked-out files as they are (other engineers' edits included);
    ``head``: ``git archive HEAD`` unpacked into a temporary directory and run from there
    with ``python -m dualwrite`` (it comes first on sys.path), so edits made to the tree
    during the run cannot change or break what is measured. Neither changes git state."""
    if which == "tree":
        return Code(tuple(common.dualwrite_command()), common.REPO_ROOT, common.git_revision())
    head = common.tool_version(["git", "-C", str(common.REPO_ROOT), "rev-parse", "--short", "HEAD"])
    where = common.temp_dir(stack, "dwbench-compare-head-")
    archive = subprocess.run(
        ["git", "-C", str(common.REPO_ROOT), "archive", "--format=tar", "HEAD"],
        capture_output=True,
        check=False,
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive HEAD failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return Code((sys.executable, "-m", "dualwrite"), where, f"{head} (HEAD, exported)")


def reladiff_binary(install: bool) -> str:
    """The venv's reladiff, pip-installing ``reladiff[postgresql]`` first if it is missing."""
    found = Path(sys.executable).with_name("reladiff")
    if found.exists():
        return str(found)
    if not install:
        raise BenchError("reladiff is not installed: pip install 'reladiff[postgresql]'")
    common.progress("installing reladiff (pip install 'reladiff[postgresql]')")
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "reladiff[postgresql]"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not found.exists():
        raise BenchError(f"pip install reladiff failed:\n{done.stderr}")
    return str(found)


def dualwrite_argv(code: Code, tool: Tool, config_path: Path) -> list[str]:
    return [
        *code.argv,
        "reconcile",
        "--config",
        str(config_path),
        "--mapping",
        mapping_name(tool.pair),
    ]


def reladiff_argv(
    binary: str,
    algorithm: str,
    pair: Pair,
    source_db: Server,
    target_db: Server,
    threads: int | None,
) -> list[str]:
    where = [source_db.dsn(), pair.source]
    where += [target_db.dsn(), pair.target] if pair.cross else [pair.target]
    argv = [binary, *where, "-k", "id"]
    for column in COLUMNS[1:]:
        argv += ["-c", column]
    argv += ["-a", algorithm, "--stats", "--json"]
    if algorithm == "hashdiff":
        # reladiff 0.6.0's hashdiff sorts the differing rows, values included, and dies
        # ("'<' not supported between 'str' and 'NoneType'") when one holds a NULL
        argv.append("--skip-sort-results")
    if threads:
        argv += ["-j", str(threads)]
    return argv


# --------------------------------------------------------------------------- measuring


def local_postmaster(server: Server) -> int | None:
    """The postmaster's pid when the server runs on this machine and /proc shows it."""
    done = common.psql(
        server, "SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)", check=False
    )
    try:
        pid = int(done.stdout.strip())
        postmaster_children(pid)
    except (ValueError, OSError):
        return None
    return pid


@dataclass
class Run:
    """One tool's pass over one pair."""

    tool: str
    round: int
    rows: int
    seconds: float
    rows_per_second: float
    #: the tool's own report: compared rows and divergence counts
    compared: int | None
    counts: dict[str, int]
    exit_code: int
    client_cpu_seconds: float
    backend_cpu_seconds: float | None
    box_busy_percent: float
    load: float
    #: dualwrite only: the pass's own seconds (without process start and validation)
    pass_seconds: float | None = None
    problems: list[str] = field(default_factory=list)
    #: oddities that do not make the run wrong
    notes: list[str] = field(default_factory=list)

    @property
    def contender(self) -> str:
        return self.tool


@dataclass
class Context:
    args: argparse.Namespace
    source_db: Server
    target_db: Server
    config_path: Path
    reladiff: str
    postmaster: int | None
    workdir: Path
    code: Code

    def argv(self, tool: Tool) -> list[str]:
        if tool.program == "dualwrite":
            return dualwrite_argv(self.code, tool, self.config_path)
        return reladiff_argv(
            self.reladiff,
            tool.algorithm,
            tool.pair,
            self.source_db,
            self.target_db,
            self.args.reladiff_threads,
        )


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(
    ctx: Context, argv: Sequence[str]
) -> tuple[subprocess.CompletedProcess[str], float, float, float | None, float]:
    """Run ``argv``; (result, wall seconds, client CPU, backend CPU, box busy %)."""
    env = dict(ctx.source_db.env(), COLUMNS="100000")  # rich must not wrap reladiff's JSON
    sampler = (
        BackendCpu(ctx.postmaster, {ctx.source_db.dbname, ctx.target_db.dbname})
        if ctx.postmaster
        else None
    )
    busy0, total0 = box_cpu()
    cpu0 = children_cpu()
    with sampler or contextlib.nullcontext():
        started = time.perf_counter()
        done = subprocess.run(
            list(argv),
            env=env,
            cwd=ctx.code.cwd,
            capture_output=True,
            text=True,
            timeout=ctx.args.timeout,
            check=False,
        )
        seconds = time.perf_counter() - started
    cpu = children_cpu() - cpu0
    busy1, total1 = box_cpu()
    box = 100.0 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
    return done, seconds, cpu, sampler.seconds if sampler else None, box


_COUNT_KEYS = ("missing", "extra", "changed")


def parse_dualwrite(
    done: subprocess.CompletedProcess[str],
) -> tuple[int | None, dict[str, int], float | None]:
    """(compared, counts, pass seconds) from the ``reconcile_finished`` log event."""
    for line in reversed(done.stderr.splitlines()):
        if "reconcile_finished" not in line:
            continue
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            counts = {k: int(event.get(k, 0)) for k in _COUNT_KEYS}
            return int(event["compared"]), counts, float(event["seconds"])
    return None, {}, None


def parse_reladiff(done: subprocess.CompletedProcess[str]) -> tuple[int | None, dict[str, int]]:
    """(rows of table A, counts) from ``--stats --json``."""
    text = done.stdout
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        return None, {}
    try:
        stats = json.loads(text[start : end + 1])
    except ValueError:
        return None, {}
    counts = {
        "missing": int(stats["exclusive_A"]),
        "extra": int(stats["exclusive_B"]),
        "changed": int(stats["updated"]),
    }
    return int(stats["rows_A"]), counts


def measure(ctx: Context, tool: Tool, round_: int, rows: int, expect: dict[str, int]) -> Run:
    """One pass; its problems list says where it disagrees with what is in the tables."""
    load = common.load_average()
    done, seconds, cpu, backend, box = timed(ctx, ctx.argv(tool))
    pass_seconds = None
    if tool.program == "dualwrite":
        compared, counts, pass_seconds = parse_dualwrite(done)
        ok_codes = (0,) if not any(expect.values()) else (1,)
    else:
        compared, counts = parse_reladiff(done)
        ok_codes = (0,)
    run = Run(
        tool=tool.name,
        round=round_,
        rows=rows,
        seconds=seconds,
        rows_per_second=rows / seconds,
        compared=compared,
        counts=counts,
        exit_code=done.returncode,
        client_cpu_seconds=cpu,
        backend_cpu_seconds=backend,
        box_busy_percent=box,
        load=load,
        pass_seconds=pass_seconds,
    )
    if done.returncode not in ok_codes:
        run.problems.append(f"exit code {done.returncode}")
    if counts != expect:
        run.problems.append(f"found {counts or 'nothing readable'}, expected {expect}")
    if compared is not None and compared < rows:
        short = f"reported {compared:,} rows compared of {rows:,}"
        if tool.program == "dualwrite":
            run.problems.append(short)  # a pass that skipped rows
        else:
            # reladiff's --stats rows_A is read from its info tree, not counted; 0.6.0 has
            # been seen one short while its diff was right: worth showing, not a failed pass
            run.notes.append(short)
    if run.problems or run.notes:
        log = ctx.workdir / f"{tool.name}-round{round_}.log"
        log.write_text(f"$ {shlex.join(ctx.argv(tool))}\n{done.stdout}\n--- stderr\n{done.stderr}")
        # relative: the note is pasted into README tables, which name no path outside the repo
        shown = log.relative_to(common.REPO_ROOT)
        (run.problems or run.notes).append(f"output kept in {shown}")
    return run


def describe(run: Run) -> str:
    backend = common.fmt(run.backend_cpu_seconds, ".1f", " s PG CPU")
    own = f"  (pass {run.pass_seconds:.2f} s)" if run.pass_seconds is not None else ""
    warn = f"  PROBLEM: {'; '.join(run.problems)}" if run.problems else ""
    warn += f"  note: {'; '.join(run.notes)}" if run.notes else ""
    return (
        f"{run.tool:<24} {run.seconds:7.2f} s {run.rows_per_second:12,.0f} rows/s  "
        f"client {run.client_cpu_seconds:5.1f} s CPU  {backend}  box {run.box_busy_percent:3.0f}% "
        f"load {run.load:.2f}{own}{warn}"
    )


def measure_rounds(ctx: Context, tools: Sequence[Tool]) -> list[Run]:
    """Every round runs every tool, in alternating order, so drift hits them all alike."""
    runs = []
    clean = dict.fromkeys(_COUNT_KEYS, 0)
    for round_ in range(1, ctx.args.rounds + 1):
        order = tools if round_ % 2 else list(reversed(tools))
        for tool in order:
            run = measure(ctx, tool, round_, ctx.args.rows, clean)
            runs.append(run)
            common.progress(f"round {round_}/{ctx.args.rounds}  {describe(run)}")
    return runs


def verify(ctx: Context, tools: Sequence[Tool]) -> list[Run]:
    """Every tool on the small pairs with seeded divergences: the counts must match."""
    expect = expected_counts()
    runs = []
    for tool in tools:
        pair = VERIFY_CROSS if tool.pair.cross else VERIFY_SAME
        swapped = Tool(tool.name, tool.program, pair, tool.algorithm)
        run = measure(ctx, swapped, 0, VERIFY_ROWS, expect)
        runs.append(run)
        common.progress(f"verify  {describe(run)}")
    return runs


# --------------------------------------------------------------------------- results


def summarise(runs: Sequence[Run], tools: Sequence[Tool]) -> dict[str, Any]:
    per_tool: dict[str, Any] = {}
    for tool in tools:
        every = [r for r in runs if r.tool == tool.name]
        mine = [r for r in every if not r.problems]  # a pass that failed or erred is no speed
        rates = [r.rows_per_second for r in mine]
        per_tool[tool.name] = {
            "pair": tool.pair.label,
            "program": tool.program,
            "algorithm": tool.algorithm,
            "median_seconds": common.median(r.seconds for r in mine),
            "median_rows_per_second": common.median(rates),
            "median_pass_seconds": common.median(r.pass_seconds for r in mine),
            "median_client_cpu_seconds": common.median(r.client_cpu_seconds for r in mine),
            "median_backend_cpu_seconds": common.median(r.backend_cpu_seconds for r in mine),
            # rows per CPU second of the tool and its backends: steadier than wall time when
            # other work shares the CPUs (it ignores waiting for a CPU)
            "median_rows_per_cpu_second": common.median(
                r.rows / (r.client_cpu_seconds + r.backend_cpu_seconds)
                for r in mine
                if r.backend_cpu_seconds is not None
            ),
            "spread": spread(rates),
            "runs": len(every),
            "failed_runs": len(every) - len(mine),
            "problems": [p for r in every for p in r.problems],
        }
    ratios = {
        f"{a} / {b}": paired_rate_ratio(runs, a, b)
        for a, b in RATIOS
        if a in per_tool and b in per_tool
    }
    return {"tools": per_tool, "ratios": ratios, "goals": goals(per_tool, ratios)}


def paired_rate_ratio(runs: Sequence[Run], numerator: str, denominator: str) -> float | None:
    """Median over rounds of the rows/s ratio within a round (neighbours share the drift); a
    pass with problems is no speed."""
    ok = (run for run in runs if not run.problems)
    return paired_ratio(ok, numerator, denominator, lambda run: run.rows_per_second)


def goals(per_tool: dict[str, Any], ratios: dict[str, float | None]) -> dict[str, Any]:
    """Issue 4's targets for the same-database pass: vs the faster reladiff, and absolute."""
    ours = per_tool.get("dualwrite-same", {}).get("median_rows_per_second")
    rivals = {
        name: ratios.get(f"dualwrite-same / {name}")
        for name in ("reladiff-joindiff", "reladiff-hashdiff-same")
        if f"dualwrite-same / {name}" in ratios
    }
    worst = min((v for v in rivals.values() if v is not None), default=None)
    return {
        "same_db_rows_per_second": ours,
        "same_db_rows_per_second_goal": GOAL_ROWS_PER_SECOND,
        "same_db_rows_per_second_met": None if ours is None else ours >= GOAL_ROWS_PER_SECOND,
        "same_db_ratio_vs_fastest_reladiff": worst,
        "same_db_ratio_goal": GOAL_RATIO,
        "same_db_ratio_met": None if worst is None else worst >= GOAL_RATIO,
    }


def met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("met" if flag else "**MISSED**")


def results_table(summary: dict[str, Any], tools: Sequence[Tool]) -> str:
    headers = [
        "pair",
        "tool",
        "algorithm",
        "seconds",
        "rows/s",
        "dualwrite / this",
        "client CPU s",
        "PG backend CPU s",
        "rows per CPU s",
        "spread",
        "runs ok",
    ]
    ratio_of = {b: summary["ratios"].get(f"{a} / {b}") for a, b in RATIOS}
    rows = []
    for tool in tools:
        s = summary["tools"][tool.name]
        seconds = common.fmt(s["median_seconds"], ".2f")
        if s["median_pass_seconds"] is not None:
            seconds += f" ({s['median_pass_seconds']:.2f})"
        rows.append(
            [
                tool.pair.label,
                tool.program,
                tool.algorithm,
                seconds,
                common.fmt(s["median_rows_per_second"]),
                common.fmt(ratio_of.get(tool.name), ".2f", "x")
                if tool.program != "dualwrite"
                else "",
                common.fmt(s["median_client_cpu_seconds"], ".1f"),
                common.fmt(s["median_backend_cpu_seconds"], ".1f"),
                common.fmt(s["median_rows_per_cpu_second"]),
                common.fmt(s["spread"], ".0%") if s["spread"] is not None else "n/a",
                f"{s['runs'] - s['failed_runs']}/{s['runs']}",
            ]
        )
    return common.markdown_table(headers, rows)


def verify_table(runs: Sequence[Run]) -> str:
    expect = expected_counts()
    headers = ["pair", "tool", "missing", "extra", "changed", "expected", "same as seeded"]
    rows = []
    for run in runs:
        tool = TOOLS[run.tool]
        got = [str(run.counts.get(k, "?")) for k in _COUNT_KEYS]
        rows.append(
            [
                tool.pair.label,
                f"{tool.program} {tool.algorithm}",
                *got,
                "/".join(str(expect[k]) for k in _COUNT_KEYS),
                ("yes" if not run.problems else "**NO**: " + "; ".join(run.problems))
                + ("" if not run.notes else " (note: " + "; ".join(run.notes) + ")"),
            ]
        )
    return common.markdown_table(headers, rows)


def report(
    meta: dict[str, Any],
    summary: dict[str, Any],
    tools: Sequence[Tool],
    checks: Sequence[Run],
    args: argparse.Namespace,
) -> str:
    machine = meta["machine"]
    pg = ", ".join(f"{k}={v}" for k, v in meta["pg_settings"].items())
    g = summary["goals"]
    loads = [r["load"] for r in meta["runs"]]
    busy = [r["box_busy_percent"] for r in meta["runs"]]
    lines = [
        "### Reconcile speed: a clean pass, dualwrite and reladiff",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {common.machine_line(machine)}; reladiff {meta['reladiff_version']}",
        f"- dualwrite measured: {machine['dualwrite_measured']}",
        f"- PostgreSQL settings (server defaults, nothing SET for the measured sessions): {pg}",
        f"- Tables: {args.rows:,} rows each (id bigint primary key, qty int, amount numeric(12,2), "
        "note text (every 97th NULL), created_at timestamptz, ref uuid); target = same columns, "
        f"mapping = identity; {'; '.join(f'{k}: {v}' for k, v in meta['table_sizes'].items())}; "
        f"{meta['build']}",
        f"- Runs: {args.rounds} interleaved rounds (order reversed every other round), medians; "
        "every run a fresh process (`dualwrite reconcile --mapping`, `reladiff --stats --json`); "
        f"dualwrite reconcile.chunk_rows={meta['chunk_rows']}, "
        f"reconcile.workers={meta['workers']} (same-DB), reladiff "
        f"{'-j ' + str(args.reladiff_threads) if args.reladiff_threads else 'defaults (-j 1)'}",
        f"- Load average (1 min) at start / end: {meta['load_start']:.2f} / "
        f"{meta['load_end']:.2f}; before each run {min(loads):.2f} to {max(loads):.2f}; "
        f"whole-box CPU busy during runs {min(busy):.0f} to {max(busy):.0f}% "
        "(2 CPUs shared with other engineers' tests)",
        "",
        results_table(summary, tools),
        "",
        "seconds: wall time of the whole command (process start, validation, the pass; "
        "dualwrite's own pass time in brackets); rows/s = table rows / wall seconds; "
        "dualwrite / this: median of each round's own rows/s ratio against the dualwrite run of "
        "the same pair; client CPU: the command's user+sys time; PG backend CPU: the bench "
        "databases' backends and their parallel workers, sampled from /proc every 0.1 s; "
        "rows per CPU s: rows / (client + backend CPU), which waiting for a busy CPU does "
        "not change; "
        "spread: (max - min) / median rows/s over the rounds.",
        "",
        f"Goals (issue 4, same-DB): ≥ {GOAL_ROWS_PER_SECOND:,} rows/s: "
        f"{common.fmt(g['same_db_rows_per_second'])} rows/s, "
        f"{met(g['same_db_rows_per_second_met'])}; "
        f"≥ {GOAL_RATIO:.0f}x the faster reladiff: "
        f"{common.fmt(g['same_db_ratio_vs_fastest_reladiff'], '.2f', 'x')}, "
        f"{met(g['same_db_ratio_met'])}.",
    ]
    if checks:
        lines += [
            "",
            f"Correctness, same run: each tool on a {VERIFY_ROWS:,}-row pair per layout with "
            "3 missing (first, middle, last key), 2 extra (past the end) and 5 changed rows "
            "(int, numeric +0.01, text -> NULL, timestamptz +1 µs, uuid) seeded into the target:",
            "",
            verify_table(checks),
        ]
    problems = [p for t in summary["tools"].values() for p in t["problems"]]
    if problems:
        lines += ["", "**Problems in the clean passes:** " + "; ".join(problems)]
    notes = [f"{r['tool']} round {r['round']}: {n}" for r in meta["runs"] for n in r["notes"]]
    if notes:
        lines += ["", "Notes on the clean passes: " + "; ".join(notes)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- options, main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench compare",
        description=(
            "A clean reconcile pass over a mapped pair of big tables: `dualwrite reconcile` "
            "same- and cross-database against reladiff (joindiff and hashdiff), interleaved "
            "round by round, plus a correctness check on a small pair with seeded divergence; "
            "prints a Markdown table and writes bench/results/compare-<timestamp>.json."
        ),
    )
    common.add_dsn_option(p)
    p.add_argument("--database", default="dwbench_compare", help="source database")
    p.add_argument(
        "--target-database", default="dwbench_compare_tgt", help="the cross-DB target's database"
    )
    p.add_argument("--rows", type=int, help=f"rows per table (default {DEFAULT_ROWS:,})")
    p.add_argument("--quick", action="store_true", help=f"{QUICK_ROWS:,} rows")
    p.add_argument("--rebuild", action="store_true", help="re-create the tables even if present")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="interleaved rounds")
    p.add_argument(
        "--tools",
        type=common.csv_choices(list(TOOLS)),
        default=list(TOOLS),
        help=f"comma-separated, from {','.join(TOOLS)} (default all)",
    )
    p.add_argument(
        "--chunk-rows", type=int, help="dualwrite reconcile.chunk_rows (default: the config's)"
    )
    p.add_argument("--reladiff-threads", type=int, help="reladiff -j (default: reladiff's own, 1)")
    p.add_argument(
        "--workers",
        type=int,
        help="dualwrite reconcile.workers, same-database sessions side by side (default: config's)",
    )
    p.add_argument(
        "--code",
        choices=("tree", "head"),
        default="tree",
        help="dualwrite to run: the work tree as it is (default), or an export of HEAD that "
        "edits made during the run cannot touch",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the seeded-divergence check")
    p.add_argument("--no-install", action="store_true", help="do not pip-install reladiff")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one pass may take")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.rows is None:
        args.rows = QUICK_ROWS if args.quick else DEFAULT_ROWS
    if args.rows < 1 or args.rounds < 1:
        raise BenchError("--rows and --rounds must be positive")
    args.tools = [name for name in TOOLS if name in args.tools]  # keep the fixed order
    return args


def pg_settings(server: Server) -> dict[str, str]:
    names = ", ".join(f"'{n}'" for n in PG_SETTINGS)
    out = common.query_value(
        server,
        "SELECT string_agg(name || '=' || setting || ' ' || coalesce(unit, ''), '|' ORDER BY name) "
        f"FROM pg_settings WHERE name IN ({names})",
    )
    pairs = dict(item.split("=", 1) for item in out.split("|"))
    return {name: _human(pairs.get(name, "?")) for name in PG_SETTINGS}


def _human(value: str) -> str:
    """``16384 8kB`` -> ``128MB``; ``4096 kB`` -> ``4MB``; ``on `` -> ``on``."""
    found = re.fullmatch(r"(\d+) (8kB|kB)", value)
    if not found:
        return value.strip()
    kb = int(found.group(1)) * (8 if found.group(2) == "8kB" else 1)
    return f"{kb // 1024}MB" if kb % 1024 == 0 else f"{kb}kB"


def prepare(
    stack: contextlib.ExitStack, args: argparse.Namespace
) -> tuple[Server, Server, str, str]:
    server, origin = common.resolve_server(stack, args.dsn)
    common.progress(f"server: {server.dsn()} ({origin})")
    source_db = common.ensure_database(server, args.database)
    target_db = common.ensure_database(server, args.target_database)
    if not args.rebuild and tables_ready(source_db, target_db, args.rows):
        build = "tables reused from an earlier run"
        common.progress(build)
    else:
        common.progress(
            f"building the {args.rows:,}-row pairs (source, same-DB and cross-DB target)"
        )
        build = f"tables built in {build_pairs(source_db, target_db, args.rows):.0f} s"
        common.progress(build)
    return source_db, target_db, origin, build


def benchmark(stack: contextlib.ExitStack, args: argparse.Namespace, argv: Sequence[str]) -> int:
    started = common.utc_now()
    source_db, target_db, origin, build = prepare(stack, args)
    reladiff = reladiff_binary(install=not args.no_install)
    workdir = common.temp_dir(stack, "dwbench-compare-")
    logs = Path(common.RESULTS_DIR) / f"compare-{started.strftime('%Y%m%dT%H%M%SZ')}-logs"
    config_path = workdir / "dualwrite.yaml"
    config = dualwrite_config(source_db, target_db, args)
    config_path.write_text(yaml.safe_dump(config))
    tools = [TOOLS[name] for name in args.tools]
    if not args.no_verify:
        common.progress(f"building the {VERIFY_ROWS:,}-row verification pairs")
        build_verify_pairs(source_db, target_db)
    common.progress("dualwrite setup (control schema, mapping validation)")
    code = dualwrite_code(stack, args.code)
    common.progress(f"dualwrite: {code.label}, run from {code.cwd}")
    for line in common.dualwrite_setup(config_path, source_db, command=code.argv, cwd=code.cwd):
        common.progress(f"  {line}")
    logs.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        args, source_db, target_db, config_path, reladiff, local_postmaster(source_db), logs, code
    )
    machine = {**common.machine_info(source_db), "dualwrite_measured": code.label}
    meta: dict[str, Any] = {
        **common.run_meta("compare", started, argv, origin, machine),
        "reladiff_version": common.tool_version([reladiff, "--version"]),
        "pg_settings": pg_settings(source_db),
        "session_settings": {"build only": BUILD_SETTINGS, "measured sessions": "none"},
        "chunk_rows": args.chunk_rows or ReconcileConfig().chunk_rows,
        "workers": args.workers or ReconcileConfig().workers,
        "table_sizes": table_sizes(source_db, target_db),
        "build": build,
        "dualwrite_config": config,
        "commands": {t.name: shlex.join(ctx.argv(t)) for t in tools},
    }
    checks = verify(ctx, tools) if not args.no_verify else []
    common.progress("warming the cache (a read of every heap and key index)")
    warm_cache(source_db, target_db)
    runs = measure_rounds(ctx, tools)
    meta["load_end"] = common.load_average()
    meta["runs"] = [asdict(r) for r in runs]
    summary = summarise(runs, tools)
    print(report(meta, summary, tools, checks, args))
    data = {**meta, "settings": settings(args), "summary": summary}
    data["verify"] = [asdict(r) for r in checks]
    common.progress(f"results written to {common.write_json('compare', started, data)}")
    if not any(logs.iterdir()):
        logs.rmdir()
    wrong = [r for r in checks if r.problems] + [r for r in runs if r.problems]
    for run in wrong:
        common.progress(f"warning: {run.tool} round {run.round}: {'; '.join(run.problems)}")
    return 1 if wrong else 0


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "rows",
        "rounds",
        "tools",
        "chunk_rows",
        "workers",
        "reladiff_threads",
        "database",
        "code",
    )
    return {key: getattr(args, key) for key in (*keys, "target_database", "rebuild")}


def main(argv: Sequence[str]) -> int:
    return common.run_main("compare", argv, parse_args, benchmark)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
