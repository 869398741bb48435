"""The cutover criteria, judged from a mapping's facts: pure functions, no I/O.

The clean window, precisely: take the finished full reconcile passes (not limited to one
tenant), newest first, starting from now. Walk back while each pass is clean (no missing,
extra or changed rows, and not flagged unclean) and no stretch without a pass is longer than
``max_gap`` (the first stretch runs from the newest pass's end to now, so stale evidence counts
as a gap). Any divergent pass, full or tenant-limited, ends the walk. The clean window is the
time from the start of the oldest pass reached to the end of the newest; it passes when it is
at least ``clean_window_hours`` long (with 0 hours: when there is one fresh clean pass). Failed
and interrupted passes are no evidence either way; only the gap bound limits them.

The other criteria are read at report time (dead letters, outbox age, backfill, paused) or
summed over the criteria window, the last ``clean_window_hours`` (unmirrored statements,
mirror failures, changes statement capture missed). A mapping marked for a full resync (a
TRUNCATE of its source, a dropped replication slot) fails until a clean full pass starts after
the mark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from compare.report.format import duration_text, number_text, timestamp_text
from compare.report.model import Criterion, Facts, Pass
from core.config import CutoverCriteria

#: the clean window rule in one sentence, printed in the reports
CLEAN_WINDOW_DEFINITION = (
    "Clean window: walking back from now through finished full reconcile passes, every pass is "
    "clean (no missing, extra or changed rows) and no stretch without a pass, including the "
    "one up to now, is longer than the allowed gap; the window runs from the start of the "
    "oldest such pass to the end of the newest and must be at least the required length. "
    "Any divergent pass ends it; failed passes count as no pass. Unmirrored statements, "
    "mirror failures and uncaptured changes are summed over the criteria window (the last "
    "clean_window_hours); dead letters, outbox age, backfill, a pending resync and pause state "
    "are read at report time."
)


@dataclass(frozen=True)
class Window:
    """When the report is made, and the bounds the criteria use."""

    now: datetime
    clean_window: timedelta
    max_gap: timedelta

    @property
    def start(self) -> datetime:
        return self.now - self.clean_window


@dataclass(frozen=True)
class Streak:
    """The most recent unbroken run of clean passes, newest first, and why it ends."""

    passes: list[Pass] = field(default_factory=list)
    broken_by: str = ""

    @property
    def span(self) -> timedelta:
        if not self.passes:
            return timedelta(0)
        return self.passes[0].finished_at - min(p.started_at for p in self.passes)


def clean_streak(passes: list[Pass], now: datetime, max_gap: timedelta) -> Streak:
    """Walk back from now through ``passes`` (newest first) as the module docstring says."""
    streak: list[Pass] = []
    frontier = now  # the earliest moment the streak covers so far
    for run in passes:
        if not run.clean:
            return Streak(streak, f"pass #{run.id} ({timestamp_text(run.finished_at)}) found "
                          f"{run.divergent} divergent rows")
        if not run.full:
            continue
        if frontier - run.finished_at > max_gap:
            return Streak(streak, _gap_reason(run, frontier, now))
        streak.append(run)
        frontier = min(frontier, run.started_at)
    return Streak(streak, "" if passes else "no finished reconcile pass")


def _gap_reason(run: Pass, frontier: datetime, now: datetime) -> str:
    gap = duration_text((frontier - run.finished_at).total_seconds())
    if frontier == now:
        return f"the last full pass finished {gap} ago"
    return f"no pass ran for {gap} after {timestamp_text(run.finished_at)}"


def judge(facts: Facts, criteria: CutoverCriteria, window: Window) -> list[Criterion]:
    """Every criterion for one mapping, in the order the report lists them."""
    judged = [
        clean_window(facts, criteria, window),
        dead_letters(facts, criteria),
        outbox_age(facts, criteria),
        unmirrored(facts, criteria, window),
        mirror_failures(facts, criteria, window),
        uncaptured(facts, criteria, window),
        resync(facts),
        mirroring_active(facts),
    ]
    if criteria.require_backfill_complete:
        judged.insert(5, backfill(facts))
    return judged


def clean_window(facts: Facts, criteria: CutoverCriteria, window: Window) -> Criterion:
    streak = clean_streak(facts.passes, window.now, window.max_gap)
    hours = streak.span.total_seconds() / 3600
    needed = criteria.clean_window_hours
    passed = bool(streak.passes) and hours >= needed
    if streak.broken_by and not streak.passes:
        detail = streak.broken_by
    elif streak.broken_by:
        detail = f"{len(streak.passes)} clean passes before it ends: {streak.broken_by}"
    else:
        detail = f"clean through all {len(streak.passes)} passes read"
    return Criterion(
        name="clean_window",
        title="Clean reconcile window",
        measured=round(hours, 3),
        measured_text=f"{duration_text(streak.span.total_seconds())} ({len(streak.passes)} passes)",
        threshold_text=f">= {number_text(needed)} h, no gap > "
        f"{duration_text(window.max_gap.total_seconds())}",
        passed=passed,
        detail=detail,
    )


def dead_letters(facts: Facts, criteria: CutoverCriteria) -> Criterion:
    codes = ", ".join(f"{code}: {n}" for code, n in facts.dead_letters_by_sqlstate.items())
    return Criterion(
        name="dead_letters",
        title="Dead letters",
        measured=facts.dead_letters,
        measured_text=number_text(facts.dead_letters),
        threshold_text=f"<= {criteria.max_dead_letters}",
        passed=facts.dead_letters <= criteria.max_dead_letters,
        detail=f"by SQLSTATE: {codes}" if codes else "",
    )


def outbox_age(facts: Facts, criteria: CutoverCriteria) -> Criterion:
    age = facts.outbox_oldest_age_seconds
    return Criterion(
        name="outbox_age",
        title="Oldest key in the outbox",
        measured=round(age, 3),
        measured_text=duration_text(age) if facts.outbox_depth else "empty",
        threshold_text=f"<= {duration_text(criteria.max_outbox_age_seconds)}",
        passed=age <= criteria.max_outbox_age_seconds,
        detail=_keys_waiting(facts.outbox_depth),
    )


def _keys_waiting(depth: int) -> str:
    if not depth:
        return ""
    return f"{number_text(depth)} key{'s' if depth != 1 else ''} waiting"


def unmirrored(facts: Facts, criteria: CutoverCriteria, window: Window) -> Criterion:
    return _at_most_in_window(
        "unmirrored_statements",
        "Unmirrored statements",
        facts.unmirrored_in_window,
        criteria.max_unmirrored_statements,
        window,
        f"since {timestamp_text(window.start)}",
    )


def mirror_failures(facts: Facts, criteria: CutoverCriteria, window: Window) -> Criterion:
    return _at_most_in_window(
        "mirror_failures",
        "Mirror failures",
        facts.mirror_failures_in_window,
        criteria.max_mirror_failures,
        window,
        f"rewritten statements that failed, since {timestamp_text(window.start)}",
    )


def uncaptured(facts: Facts, criteria: CutoverCriteria, window: Window) -> Criterion:
    return _at_most_in_window(
        "uncaptured_changes",
        "Changes statement capture missed",
        facts.uncaptured_in_window,
        criteria.max_uncaptured_changes,
        window,
        f"found in the WAL (capture: both), committed since {timestamp_text(window.start)}",
    )


def resync(facts: Facts) -> Criterion:
    """Passes unless the mapping was marked for a full resync and no clean full pass has
    started since the (latest) mark."""
    marked = facts.resync_marked_at
    cleared = marked is not None and any(
        p.full and p.clean and p.started_at > marked for p in facts.passes
    )
    passed = marked is None or cleared
    if marked is None:
        detail = ""
    elif cleared:
        detail = f"marked {timestamp_text(marked)} ({facts.resync_reason}); a clean pass since"
    else:
        detail = (
            f"marked {timestamp_text(marked)}: {facts.resync_reason}; run a full reconcile "
            "(with --repair) to clear it"
        )
    return Criterion(
        name="resync",
        title="No full resync pending",
        measured="pending" if not passed else "none",
        measured_text="pending" if not passed else "none",
        threshold_text="none",
        passed=passed,
        detail=detail,
    )


def _at_most_in_window(
    name: str, title: str, measured: int, limit: int, window: Window, detail: str
) -> Criterion:
    """A count over the clean window that passes while it stays at or below ``limit``."""
    return Criterion(
        name=name,
        title=title,
        measured=measured,
        measured_text=number_text(measured),
        threshold_text=f"<= {limit} in {duration_text(window.clean_window.total_seconds())}",
        passed=measured <= limit,
        detail=detail,
    )


def backfill(facts: Facts) -> Criterion:
    state = facts.backfill
    if state is None:
        measured, detail = "not run", "no row in dualwrite.backfill_state"
    else:
        measured = state.status
        total = f" of ~{number_text(state.rows_estimate)}" if state.rows_estimate else ""
        detail = f"{number_text(state.rows_done)}{total} rows copied"
    return Criterion(
        name="backfill",
        title="Backfill complete",
        measured=measured,
        measured_text=measured,
        threshold_text="done",
        passed=state is not None and state.status == "done",
        detail=detail,
    )


def mirroring_active(facts: Facts) -> Criterion:
    return Criterion(
        name="mirroring_active",
        title="Mirroring active (not paused)",
        measured="paused" if facts.paused else "active",
        measured_text="paused" if facts.paused else "active",
        threshold_text="active",
        passed=not facts.paused,
        detail="a paused mapping is not being mirrored" if facts.paused else "",
    )
