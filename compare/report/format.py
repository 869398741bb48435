"""How the report writes numbers, durations and times (``--since 24h`` is read by core.config)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def duration_text(seconds: float) -> str:
    """A short human duration: ``850 ms``, ``42 s``, ``12 min``, ``5.5 h``, ``3.2 d``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds > 0 else "0 s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{number_text(round(seconds / 3600, 1))} h"
    return f"{number_text(round(seconds / 86400, 1))} d"


def number_text(value: float | int | None) -> str:
    """Thousands separated; whole floats without decimals."""
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}".rstrip("0").rstrip(".")
    return f"{int(value):,}"


def timestamp_text(value: datetime | None) -> str:
    """UTC, to the minute: ``2024-05-01 13:45 UTC``."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def axis_time(value: datetime, span: timedelta, previous: datetime | None = None) -> str:
    """An axis label (UTC): the time of day for spans up to two days, with the date when it
    differs from the ``previous`` label's; the date alone for longer spans."""
    value = value.astimezone(UTC)
    if span > timedelta(days=2):
        return value.strftime("%d %b")
    if previous is None or previous.astimezone(UTC).date() != value.date():
        return value.strftime("%d %b %H:%M")
    return value.strftime("%H:%M")


def pick_bucket(span: timedelta, max_buckets: int = 48) -> timedelta:
    """The smallest round bucket that splits ``span`` into at most ``max_buckets``."""
    for minutes in (1, 5, 15, 30, 60, 120, 360, 720, 1440, 10080):
        bucket = timedelta(minutes=minutes)
        if span / bucket <= max_buckets:
            return bucket
    return timedelta(days=7) * (span / timedelta(days=7) // max_buckets + 1)


_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """``▁▁▃█▅``: one block per value, scaled to the largest (zero is the lowest block)."""
    top = max(values, default=0)
    if top <= 0:
        return _BLOCKS[0] * len(values)
    steps = len(_BLOCKS) - 1
    return "".join(_BLOCKS[0 if v <= 0 else max(1, round(v / top * steps))] for v in values)
