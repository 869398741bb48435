"""The cutover criteria, judged from a mapping's facts: pure functions, no I/O.

The clean window, precisely: take the finished full reconcile passes (not limited to one
tenant), newest first, starting from now. Walk back while each pass is clean (no missing,
extra or changed rows, and not flagged unclean) and no stretch without a pass is longer than
``max_gap`` (the first stretch runs from the newest pass's end to now, so stale evidence counts
as a gap). Any divergent pass, full or tenant-limited, ends the walk, and so does a repair: a
pass that started before the latest repair (that wrote, not a dry run) is not reached, since
a window is clean only if nothing needed repairing in it. The clean window is the
time from the start of the oldest pass reached to the end of the newest; it passes when it is
at least ``clean_window_hours`` long (with 0 hours: when there is one fresh clean pass). Failed
and interrupted passes are no evidence either way; only the gap bound limits them.

Each configured invariant is a criterion of its own (of its mapping, or of the deployment when
it is migration-level): its most recent full check must have finished, no longer ago than the
allowed gap, with at most ``max_invariant_failures`` failing groups.

The other criteria are read at report time (dead letters, outbox age, backfill, paused) or
summed over the criteria window, the last ``clean_window_hours`` (unmirrored statements,
mirror failures, changes statement capture missed). A mapping marked for a full resync (a
TRUNCATE of its source, a dropped replication slot) fails until a clean full pass starts after
the mark.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from compare.report.format import duration_text, number_text, timestamp_text
from compare.report.model import Criterion, Facts, InvariantCheck, Pass, Repair
from core.config import CutoverCriteria

#: the clean window rule in one sentence, printed in the reports
CLEAN_WINDOW_DEFINITION = (
    "Clean window: walking back from now through finished full reconcile passes, every pass is "
    "clean (no missing, extra or changed rows) and no stretch without a pass, including the "
    "one up to now, is longer than the allowed gap; the window runs from the start of the "
    "oldest such pass to the end of the newest and must be at least the required length. "
    "Any divergent pass ends it, and so does a repair (a window is clean only if nothing "
    "needed repairing in it); failed passes count as no pass. Unmirrored statements, "
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


def clean_streak(
    passes: list[Pass], now: datetime, max_gap: timedelta, repairs: Sequence[Repair] = ()
) -> Streak:
    """Walk back from now through ``passes`` (newest first) as the module docstring says."""
    streak: list[Pass] = []
    frontier = now  # the earliest moment the streak covers so far
    last_repair = max((r for r in repairs if not r.dry_run), key=lambda r: r.at, default=None)
    for run in passes:
        if last_repair is not None and run.started_at <= last_repair.at:
            return Streak(streak, _repair_reason(last_repair))
        if not run.clean:
            return Streak(streak, f"pass #{run.id} ({timestamp_text(run.finished_at)}) found "
                          f"{plural(run.divergent, 'divergent row')}")
        if not run.full:
            continue
        if frontier - run.finished_at > max_gap:
            return Streak(streak, _gap_reason(run, frontier, now))
        streak.append(run)
        frontier = min(frontier, run.started_at)
    return Streak(streak, "" if passes else "no finished reconcile pass")


def _repair_reason(repair: Repair) -> str:
    who = f" by {repair.requested_by}" if repair.requested_by else ""
    why = f" ({repair.reason})" if repair.reason else ""
    return (
        f"repair #{repair.id} at {timestamp_text(repair.at)}{who} wrote "
        f"{plural(repair.upserted + repair.deleted, 'row')}{why}; a repair restarts the window"
    )


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
    streak = clean_streak(facts.passes, window.now, window.max_gap, facts.repairs)
    hours = streak.span.total_seconds() / 3600
    needed = criteria.clean_window_hours
    passed = bool(streak.passes) and hours >= needed
    if streak.broken_by and not streak.passes:
        detail = streak.broken_by
    elif streak.broken_by:
        detail = f"{plural(len(streak.passes), 'clean pass')} before it ends: {streak.broken_by}"
    else:
        detail = f"clean through all {plural(len(streak.passes), 'pass')} read"
    return Criterion(
        name="clean_window",
        title="Clean reconcile window",
        measured=round(hours, 3),
        measured_text=(
            f"{duration_text(streak.span.total_seconds())} "
            f"({plural(len(streak.passes), 'pass')})"
        ),
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
    return f"{plural(depth, 'key')} waiting"


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


def invariant(check: InvariantCheck, criteria: CutoverCriteria, window: Window) -> Criterion:
    """An invariant's latest full check: finished recently with few enough failing groups."""
    limit = criteria.max_invariant_failures
    gap = duration_text(window.max_gap.total_seconds())
    measured: int | str
    if check.finished_at is None:
        measured, measured_text, passed, detail = "never", "never checked", False, (
            "no finished check: run dualwrite reconcile"
        )
    elif check.status != "done":
        measured, measured_text, passed = "failed", "check failed", False
        detail = f"the last check could not finish: {check.error or 'unknown error'}"
    else:
        measured = check.groups_failed
        measured_text = (
            f"{plural(check.groups_failed, 'offending row')}"
            if check.kind == "new_only"
            else f"{number_text(check.groups_failed)} failing of "
            f"{plural(check.groups_checked, 'group')}"
        )
        age = window.now - check.finished_at
        fresh = age <= window.max_gap
        passed = fresh and check.groups_failed <= limit
        detail = _invariant_detail(check)
        if not fresh:
            detail = f"the last check finished {duration_text(age.total_seconds())} ago; {detail}"
    return Criterion(
        name=f"invariant:{check.name}",
        title=f"Invariant {check.name}",
        measured=measured,
        measured_text=measured_text,
        threshold_text=f"<= {limit} failing, checked within {gap}",
        passed=passed,
        detail=detail,
    )


def _invariant_detail(check: InvariantCheck) -> str:
    if not check.failures:
        return check.description
    first = check.failures[0]
    group = ", ".join(f"{k}={v}" for k, v in first.group.items())
    return f"first failing group: {group} (old {_side(first.old)}, new {_side(first.new)})"


def _side(values: list[object] | None) -> str:
    return "absent" if values is None else ", ".join(str(v) for v in values)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 pass``, ``2 passes``, ``0 groups``: the count and the noun that agrees with it."""
    word = noun if count == 1 else (nouns or _plural_of(noun))
    return f"{number_text(count)} {word}"


def _plural_of(noun: str) -> str:
    if noun.endswith(("s", "sh", "ch", "x")):
        return noun + "es"
    return noun + "s"


def relaxed(criteria: CutoverCriteria) -> list[str]:
    """Each criterion configured looser than the production default, as ``clean window 0 h
    (production default 24 h)`` (the report shows them in a banner)."""
    default = CutoverCriteria()
    looser = []
    for name, (configured, production) in _compared(criteria, default).items():
        if _is_looser(name, configured, production):
            looser.append(
                f"{_label(name)} {_setting(name, configured)} "
                f"(production default {_setting(name, production)})"
            )
    return looser


def _compared(
    criteria: CutoverCriteria, default: CutoverCriteria
) -> dict[str, tuple[object, object]]:
    return {
        name: (getattr(criteria, name), getattr(default, name))
        for name in CutoverCriteria.model_fields
    }


def _is_looser(name: str, configured: object, production: object) -> bool:
    if isinstance(configured, bool):
        return configured is False and production is True  # require_* switched off
    assert isinstance(configured, int | float)
    assert isinstance(production, int | float)
    if name == "clean_window_hours" or name.startswith("min_"):
        return configured < production
    return configured > production  # max_* bounds


def _label(name: str) -> str:
    """``clean_window_hours`` -> ``clean window`` (the unit goes with the value)."""
    return name.removesuffix("_hours").removesuffix("_seconds").replace("_", " ")


def _setting(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if not isinstance(value, int | float):
        return str(value)
    if name.endswith("_hours"):
        return f"{number_text(float(value))} h"
    if name.endswith("_seconds"):
        return duration_text(float(value))
    return number_text(value)


def criteria_settings(criteria: CutoverCriteria) -> list[tuple[str, str, str]]:
    """(criterion, configured, production default) for every cutover criterion."""
    return [
        (name, _setting(name, configured), _setting(name, production))
        for name, (configured, production) in _compared(criteria, CutoverCriteria()).items()
    ]
