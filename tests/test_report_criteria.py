"""The clean-window rule and the report's small pieces, as pure functions (no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from compare.report.charts import compact, nice_ceiling
from compare.report.criteria import clean_streak
from compare.report.format import pick_bucket, sparkline
from compare.report.model import Pass
from compare.report.passes import worst_pass_per_bucket
from core.config import parse_duration

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
GAP = timedelta(hours=2)


def run(id_: int, started_h: float, finished_h: float, divergent: int = 0, **kw: object) -> Pass:
    """A pass that started and finished the given number of hours before NOW."""
    return Pass(
        id=id_,
        started_at=NOW - timedelta(hours=started_h),
        finished_at=NOW - timedelta(hours=finished_h),
        rows_compared=10,
        missing=divergent,
        extra=0,
        changed=0,
        pending=0,
        **kw,  # type: ignore[arg-type]
    )


def test_streak_spans_from_oldest_start_to_newest_end():
    passes = [run(3, 1.5, 1), run(2, 3.5, 3), run(1, 5.5, 5)]
    streak = clean_streak(passes, NOW, GAP)
    assert [p.id for p in streak.passes] == [3, 2, 1]
    assert streak.span == timedelta(hours=4.5)
    assert streak.broken_by == ""


def test_a_divergent_pass_ends_the_streak():
    passes = [run(3, 1.5, 1), run(2, 3.5, 3, divergent=1), run(1, 5.5, 5)]
    streak = clean_streak(passes, NOW, GAP)
    assert [p.id for p in streak.passes] == [3]
    assert "#2" in streak.broken_by


def test_stale_evidence_is_a_gap():
    streak = clean_streak([run(1, 3, 2.5)], NOW, GAP)
    assert streak.passes == []
    assert "ago" in streak.broken_by


def test_a_gap_between_passes_longer_than_the_bound_ends_the_streak():
    passes = [run(3, 1.5, 1), run(2, 3.4, 3.2), run(1, 8, 7)]  # 7 -> 3.4: 3.6 h without a pass
    streak = clean_streak(passes, NOW, GAP)
    assert [p.id for p in streak.passes] == [3, 2]
    assert "no pass ran" in streak.broken_by


def test_a_gap_exactly_at_the_bound_is_allowed():
    passes = [run(2, 1, 0.5), run(1, 3.5, 3)]  # 3 -> 1: exactly 2 h
    assert len(clean_streak(passes, NOW, GAP).passes) == 2


def test_overlapping_passes_from_two_sidecars_leave_no_gap():
    passes = [run(3, 2, 0.5), run(2, 3, 1), run(1, 5, 3.5)]  # 2 started before 3 ended
    streak = clean_streak(passes, NOW, GAP)
    assert len(streak.passes) == 3
    assert streak.span == timedelta(hours=4.5)


def test_tenant_passes_break_when_divergent_but_never_extend_coverage():
    clean_partial = [run(3, 1.5, 1, full=False), run(2, 5, 4.5)]
    streak = clean_streak(clean_partial, NOW, GAP)
    assert streak.passes == []  # the full pass is 4.5 h old: the partial one did not cover it
    divergent_partial = [run(3, 1.5, 1), run(2, 2.5, 2, divergent=4, full=False), run(1, 4, 3)]
    assert [p.id for p in clean_streak(divergent_partial, NOW, GAP).passes] == [3]


def test_a_pass_flagged_unclean_is_not_clean_whatever_its_counts():
    assert not run(1, 1, 0.5, flagged_unclean=True).clean
    assert clean_streak([run(1, 1, 0.5, flagged_unclean=True)], NOW, GAP).passes == []


def test_no_passes():
    streak = clean_streak([], NOW, GAP)
    assert streak.passes == []
    assert streak.span == timedelta(0)
    assert streak.broken_by == "no finished reconcile pass"


def test_worst_pass_per_bucket_never_hides_divergence():
    starts = [NOW - timedelta(hours=2), NOW - timedelta(hours=1)]
    passes = [run(3, 0.2, 0.1), run(2, 1.9, 1.8), run(1, 1.6, 1.5, divergent=5), run(4, 1.2, 1.1)]
    worst = worst_pass_per_bucket(passes, starts, timedelta(hours=1))
    assert [p.id if p else None for p in worst] == [1, 3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("90s", timedelta(seconds=90)), ("15m", timedelta(minutes=15)), ("24h", timedelta(hours=24)),
     ("7d", timedelta(days=7)), ("2w", timedelta(weeks=2)), ("6", timedelta(hours=6)),
     ("1.5h", timedelta(minutes=90))],
)
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "-1h", "0h", "5y", "h"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_small_helpers():
    assert pick_bucket(timedelta(hours=24)) == timedelta(minutes=30)
    assert pick_bucket(timedelta(days=7)) == timedelta(hours=6)
    assert [nice_ceiling(v) for v in (0, 3, 11, 0.3, 999)] == [0, 4, 20, 0.4, 1000]
    compacted = [compact(v) for v in (0, 950, 1200, 2.5, 3_400_000)]
    assert compacted == ["0", "950", "1.2k", "2.5", "3.4M"]
    assert sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert sparkline([0, 0]) == "▁▁"
