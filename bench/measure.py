"""How the benchmarks measure: cells and runs in interleaved rounds, CPU from /proc, ratios."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bench import common

# --------------------------------------------------------------------------- cells and runs


@dataclass(frozen=True)
class Cell:
    """One workload in one query protocol: a row, or a group of rows, of a report."""

    workload: str
    protocol: str

    @property
    def label(self) -> str:
        return f"{self.workload}/{self.protocol}"


def plan_cells(workloads: Sequence[str], protocols: Sequence[str]) -> list[Cell]:
    """Every workload in every protocol, workload by workload."""
    return [Cell(workload, protocol) for workload in workloads for protocol in protocols]


@dataclass(frozen=True)
class PgbenchRun:
    """What every pgbench run records: its cell, its round and pgbench's own report
    (``**asdict(PgbenchResult)`` fills the last four). A benchmark's run adds who ran
    (its ``contender``: a target, a mode) and what else it measured."""

    cell: str
    round: int
    tps: float
    latency_ms: float
    transactions: int
    failed: int


class Contest(Protocol):
    """A run as the ratios see it: which round, and who ran (target, mode or tool)."""

    @property
    def round(self) -> int: ...

    @property
    def contender(self) -> str: ...


RunT = TypeVar("RunT", bound=Contest)


def paired_ratio(
    runs: Iterable[RunT], numerator: str, denominator: str, value: Callable[[RunT], float]
) -> float | None:
    """Median over rounds of the numerator's ``value`` over the denominator's in the same
    round: runs next to each other in time share the drift. A round without both is skipped."""
    by_round: dict[int, dict[str, float]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[run.contender] = value(run)
    return common.median(
        common.ratio(values.get(numerator), values.get(denominator)) for values in by_round.values()
    )


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median over the rounds; None for fewer than two values."""
    middle = common.median(values)
    return (max(values) - min(values)) / middle if middle and len(values) > 1 else None


def widest_spread(summaries: Sequence[Mapping[str, Any]], group: str) -> str:
    """The widest ``tps_spread`` among the contenders of each summary's ``group``, and where."""
    spreads = [
        (entry["tps_spread"], f"{s['workload']}/{s['protocol']} {name}")
        for s in summaries
        for name, entry in s[group].items()
        if entry["tps_spread"] is not None
    ]
    if not spreads:
        return "n/a"
    widest, where = max(spreads)
    return f"{widest:.1%} ({where})"


def failed_transactions(summaries: Sequence[Mapping[str, Any]], group: str) -> list[str]:
    """One line per contender of each summary's ``group`` whose pgbench runs had failures."""
    return [
        f"{s['workload']}/{s['protocol']} {name}: {entry['failed']} failed transactions"
        for s in summaries
        for name, entry in s[group].items()
        if entry["failed"]
    ]


def per_transaction_us(cpu_seconds: float | None, transactions: int) -> float | None:
    """CPU microseconds per transaction; None when there is no CPU figure or no transaction."""
    return cpu_seconds / transactions * 1e6 if cpu_seconds is not None and transactions else None


# --------------------------------------------------------------------------- CPU from /proc


def box_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all CPUs, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = fields[3] + fields[4]
    return (total - idle) / common.CLOCK_TICKS, total / common.CLOCK_TICKS


def postmaster_children(postmaster: int) -> list[int]:
    return [
        int(pid)
        for pid in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()
    ]


def process_title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


_PARALLEL = re.compile(r"parallel worker for PID (\d+)")


class BackendCpu:
    """CPU seconds the bench databases' backends spend during a run, sampled from /proc.

    Every ``interval`` the postmaster's children are listed; those whose process title names
    one of ``dbnames`` (client backends: pgbench's, the proxies' upstream sessions, the
    sidecars' pools with the applier, the compared tools' sessions; autovacuum workers), and
    the parallel workers of those, have their user+system time read. A backend's CPU counts
    from the first sample (0 if it was born during the run) to the last one before it exited,
    so at most one interval of an exiting backend is missed. Other databases' backends (other
    engineers' tests), the shared auxiliary processes (checkpointer, WAL writer) and the
    ``exclude``d pids (the benchmark's own monitor) are not counted.

    ``start()`` and ``stop()`` (which returns the seconds), or ``with`` and ``seconds``.
    """

    def __init__(
        self,
        postmaster: int,
        dbnames: Iterable[str],
        exclude: Iterable[int] = (),
        interval: float = 0.1,
    ) -> None:
        self.postmaster = postmaster
        self.dbnames = set(dbnames)
        self.exclude = set(exclude)
        self.interval = interval
        self._mine: dict[int, bool] = {}
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="backend-cpu", daemon=True)

    def start(self) -> None:
        self._sample(initial=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self._sample(initial=False)
        return self.seconds

    def __enter__(self) -> BackendCpu:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def seconds(self) -> float:
        return sum(self._last[pid] - first for pid, first in self._first.items())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(initial=False)

    def _belongs(self, pid: int) -> bool:
        known = self._mine.get(pid)
        if known is not None:
            return known
        title = process_title(pid)
        if not title.startswith("postgres: "):
            return False  # just forked: the title is set after authentication
        leader = _PARALLEL.search(title)
        if leader:
            mine = self._mine.get(int(leader.group(1)), False)
        else:
            mine = bool(self.dbnames & set(title.split()))
        self._mine[pid] = mine
        return mine

    def _sample(self, *, initial: bool) -> None:
        for pid in postmaster_children(self.postmaster):
            if pid in self.exclude:
                continue
            with contextlib.suppress(OSError, ValueError):
                if not self._belongs(pid):
                    continue
                cpu = common.cpu_seconds(pid)
                self._first.setdefault(pid, cpu if initial else 0.0)
                self._last[pid] = cpu
