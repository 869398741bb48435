"""dualwrite lint speed: a generated 5,000-statement migration file, linted statically (pglast
parse, statement facts, dualwrite's rules, squawk), best of N rounds, per stage and in total
(the total is the command's own path, squawk running beside the parse)."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core.config import TrafficConfig
from lint import squawk
from lint.facts import facts_of
from lint.rules import check
from lint.run import Options, known_rule_ids, lint_files
from lint.script import read_script
from proxy.traffic import TrafficRecorder

HEADER = """-- description: benchmark: a long generated migration
-- strategy: expand
-- rollback: DROP TABLE IF EXISTS v2.bench_0 (and the others);
\\set ON_ERROR_STOP on
SET lock_timeout = '2s';
SET statement_timeout = '60s';
"""

#: one round of statement shapes a real expand script has (a table, its index, a column, a
#: constraint added NOT VALID and validated, a batched backfill, a DO validation)
SHAPES = (
    "CREATE TABLE IF NOT EXISTS v2.bench_{i} (id bigint PRIMARY KEY, tenant_id bigint NOT NULL, "
    "note text, created_at timestamptz NOT NULL DEFAULT now());",
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS bench_{i}_tenant ON public.users (tenant_id, id);",
    "ALTER TABLE public.users ADD COLUMN IF NOT EXISTS extra_{i} text;",
    "ALTER TABLE public.users ADD CONSTRAINT users_extra_{i}_len CHECK "
    "(char_length(extra_{i}) < 100) NOT VALID;",
    "ALTER TABLE public.users VALIDATE CONSTRAINT users_extra_{i}_len;",
    "UPDATE public.users SET extra_{i} = lower(email) WHERE id > {i} * 5000 "
    "AND id <= ({i} + 1) * 5000;",
    "COMMENT ON TABLE v2.bench_{i} IS 'generated table {i}';",
    "DO $$\nBEGIN\n    IF to_regclass('v2.bench_{i}') IS NULL THEN\n"
    "        RAISE EXCEPTION 'bench_{i} is missing';\n    END IF;\nEND $$;",
)


def generate(statements: int) -> str:
    lines = [HEADER]
    for n in range(statements):
        lines.append(SHAPES[n % len(SHAPES)].format(i=n // len(SHAPES)))
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench lint", description=__doc__)
    parser.add_argument("--statements", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dwbench-lint-") as tmp:
        path = Path(tmp) / "long.sql"
        path.write_text(generate(args.statements))
        binary = squawk.squawk_binary()
        options = Options()
        stages: dict[str, list[float]] = {"parse": [], "rules": [], "squawk": [], "total": []}
        findings = 0
        for _ in range(args.rounds):
            start = time.perf_counter()
            script = read_script(path)
            parsed = time.perf_counter()
            facts = [facts_of(s) for s in script.statements]
            check(script, facts, known_rule_ids())
            ruled = time.perf_counter()
            squawk.run_squawk(binary, str(path), script.sql, pg_version=15)
            squawked = time.perf_counter()
            stages["parse"].append(parsed - start)
            stages["rules"].append(ruled - parsed)
            stages["squawk"].append(squawked - ruled)
            start = time.perf_counter()
            (result,) = lint_files([str(path)], options)
            stages["total"].append(time.perf_counter() - start)
            findings = len(result.findings)
        top = sum(1 for s in script.statements if not s.inner)
        print(f"- Command: `.venv/bin/python -m bench lint --statements {args.statements}`")
        print(
            f"- Machine: {os.cpu_count()} CPUs, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}; squawk {squawk.version(binary)}"
        )
        print(
            f"- File: {top:,} top-level statements ({len(script.statements) - top:,} more inside "
            f"DO blocks), {path.stat().st_size / 1024:.0f} kB; {findings} findings; best and "
            f"median of {args.rounds} rounds"
        )
        print()
        print("| stage | best s | median s |")
        print("| --- | ---: | ---: |")
        for stage, times in stages.items():
            print(f"| {stage} | {min(times):.3f} | {statistics.median(times):.3f} |")
        best = min(stages["total"])
        print()
        print(f"total: {best:.3f} s for {top:,} statements ({top / best:,.0f} statements/s)")
        print()
        recorder_costs()
        return 0 if best < 1.0 else 1


def recorder_costs(n: int = 20_000) -> None:
    """What the sidecar's traffic recorder costs: on the relay's path, and in the background."""
    config = TrafficConfig(queue_size=n, cache_size=n)
    repeat = b"UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2"
    variants = [f"SELECT abalance FROM pgbench_accounts WHERE aid = {i}".encode() for i in range(n)]
    shapes = [f"SELECT c{i} FROM pgbench_accounts WHERE aid = $1".encode() for i in range(2000)]
    recorder = TrafficRecorder(config, "bench")
    connection = recorder.connection()
    connection.query(repeat)
    hot_repeat = _per_call(lambda: [connection.query(repeat) for _ in range(n)], n)
    hot_new = _per_call(lambda: [connection.query(v) for v in variants], n)
    background_variant = _per_call(lambda: recorder.analyse_pending(limit=n), n)
    for text in shapes:
        connection.query(text)
    background_shape = _per_call(lambda: recorder.analyse_pending(limit=n), len(shapes))
    print("| traffic recorder | µs per statement text |")
    print("| --- | ---: |")
    print(f"| relay path, a repeated text | {hot_repeat:.2f} |")
    print(f"| relay path, a new text (queued) | {hot_new:.2f} |")
    print(f"| background, a new text of a known shape (fingerprint) | {background_variant:.1f} |")
    print(f"| background, a new shape (parse, references) | {background_shape:.1f} |")


def _per_call(run: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) / calls * 1e6


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
