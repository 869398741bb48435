"""Inline SVG charts for the HTML report: no scripts, no external assets, print-friendly.

Each chart is a string of SVG with a ``viewBox`` and ``width="100%"``, so it scales with the
page and prints as vectors. Colours always come with a legend or a label, so a black-and-white
printout still reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape

from compare.report.format import axis_time

WIDTH, HEIGHT = 960, 176
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 30, 26
#: large enough to read on A4, where the 960 units print about 18 cm wide
FONT = 14

CLEAN, DIVERGENT, PARTIAL = "#2e9e4f", "#d0392b", "#9bb7a4"
AXIS, GRID, TEXT = "#555", "#e3e3e3", "#333"


@dataclass(frozen=True)
class Series:
    """One stacked series of a bar chart: a label, a colour and a value per bucket."""

    label: str
    color: str
    values: Sequence[float]


def bar_chart(
    starts: Sequence[datetime],
    bucket: timedelta,
    series: Sequence[Series],
    *,
    label: str,
    markers: Sequence[bool] = (),
    marker_label: str = "",
    empty_note: str = "nothing recorded",
) -> str:
    """Stacked bars per time bucket, with a y axis, time labels and a legend."""
    totals = [sum(s.values[i] for s in series) for i in range(len(starts))]
    top = nice_ceiling(max(totals, default=0))
    plot = _Plot(len(starts))
    parts = [_open(label), *_y_axis(top), *_x_labels(starts, bucket, plot)]
    for index, start in enumerate(starts):
        parts += _stack(index, series, top, plot, start)
    parts += _markers(markers, plot)
    if max(totals, default=0) == 0:
        parts.append(_centered_note(empty_note))
    legend = [(s.label, s.color) for s in series]
    if marker_label:
        legend.append((marker_label, CLEAN))
    parts += [*_legend(legend), "</svg>"]
    return "\n".join(parts)


def pass_timeline(
    passes: Sequence[tuple[datetime, datetime, str]],
    start: datetime,
    end: datetime,
    *,
    streak: tuple[datetime, datetime] | None,
    required: timedelta,
    label: str,
    now: datetime | None = None,
    ticks: Sequence[datetime] | None = None,
) -> str:
    """Each pass as a bar from its start to its end, coloured by outcome; the clean streak
    shaded behind them and the required window bracketed above, ending at ``now`` (default
    ``end``). With ``ticks`` (the bar charts' :func:`axis_ticks` over the same range) the
    timeline's time axis is theirs.

    ``passes`` are (started_at, finished_at, kind) with kind one of clean, divergent, partial.
    """
    now = now or end
    height = 108
    span = (end - start).total_seconds() or 1.0

    def x(at: datetime) -> float:
        seconds = min(max((at - start).total_seconds(), 0.0), span)
        return LEFT + seconds / span * (WIDTH - LEFT - RIGHT)

    parts = [_open(label, height)]
    if streak is not None:
        parts.append(_rect(x(streak[0]), 46, max(x(streak[1]) - x(streak[0]), 1), 34,
                           "#dff3e4", "clean streak"))
    parts += _required_bracket(x(now - required), x(now), required)
    colors = {"clean": CLEAN, "divergent": DIVERGENT, "partial": PARTIAL}
    for started, finished, kind in passes:
        left = x(started)
        parts.append(_rect(left, 52, max(x(finished) - left, 2.0), 22, colors[kind], kind))
    if not passes:
        parts.append(_text((LEFT + WIDTH - RIGHT) / 2, 67, "no finished pass", anchor="middle"))
    parts.append(_line(LEFT, 80, WIDTH - RIGHT, 80, AXIS))
    parts += _time_ticks(start, end, x, 80, ticks)
    parts += _legend(
        [("clean pass", CLEAN), ("divergent pass", DIVERGENT), ("one tenant only", PARTIAL),
         ("clean streak", "#dff3e4")],
        y=15,
    )
    parts.append("</svg>")
    return "\n".join(parts)


# --- building blocks -----------------------------------------------------------------------


class _Plot:
    """Geometry of the bar area for ``n`` buckets."""

    def __init__(self, n: int) -> None:
        self.n = max(n, 1)
        self.width = WIDTH - LEFT - RIGHT
        self.height = HEIGHT - TOP - BOTTOM
        self.band = self.width / self.n

    def x(self, index: int) -> float:
        return LEFT + index * self.band

    def y(self, value: float, top: float) -> float:
        return TOP + self.height * (1 - (value / top if top else 0))


def _open(label: str, height: int = HEIGHT) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" '
        f'role="img" aria-label="{escape(label)}" font-family="Helvetica, Arial, sans-serif" '
        f'font-size="{FONT}"><title>{escape(label)}</title>'
    )


def _y_axis(top: float) -> list[str]:
    plot = _Plot(1)
    parts = []
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        y = plot.y(value, top) if top else TOP + plot.height * (1 - fraction)
        color = AXIS if fraction == 0 else GRID
        parts.append(_line(LEFT, y, WIDTH - RIGHT, y, color))
        parts.append(_text(LEFT - 6, y + 4, compact(value) if top else "", anchor="end"))
    return parts


def axis_ticks(starts: Sequence[datetime]) -> list[datetime]:
    """The bucket starts the page's charts label: at most 8, evenly spaced, first included."""
    every = max(1, math.ceil(len(starts) / 8))
    return list(starts[::every])


def _x_labels(starts: Sequence[datetime], bucket: timedelta, plot: _Plot) -> list[str]:
    """A tick and a label at each of :func:`axis_ticks`, at the bucket's left edge (where its
    time is), so every chart of the page has the same time axis as the pass timeline."""
    if not starts:
        return []
    span = bucket * len(starts)
    index_of = {start: i for i, start in enumerate(starts)}
    labels, previous = [], None
    bottom = TOP + plot.height
    for at in axis_ticks(starts):
        x = plot.x(index_of[at])
        anchor = "start" if index_of[at] == 0 else "middle"
        labels.append(_line(x, bottom, x, bottom + 4, AXIS))
        labels.append(_text(x, HEIGHT - 6, axis_time(at, span, previous), anchor=anchor))
        previous = at
    return labels


def _stack(
    index: int, series: Sequence[Series], top: float, plot: _Plot, start: datetime
) -> list[str]:
    parts = []
    base = 0.0
    bar = plot.band * 0.78
    left = plot.x(index) + (plot.band - bar) / 2
    for s in series:
        value = s.values[index]
        if value <= 0:
            continue
        y_top, y_base = plot.y(base + value, top), plot.y(base, top)
        tip = f"{s.label} {compact(value)} at {axis_time(start, timedelta(0))}"
        parts.append(_rect(left, y_top, bar, max(y_base - y_top, 0.8), s.color, tip))
        base += value
    return parts


def _markers(markers: Sequence[bool], plot: _Plot) -> list[str]:
    y = TOP + plot.height
    return [
        f'<circle cx="{plot.x(i) + plot.band / 2:.1f}" cy="{y - 4:.1f}" r="3" fill="{CLEAN}"/>'
        for i, marked in enumerate(markers)
        if marked
    ]


def _legend(entries: Sequence[tuple[str, str]], y: float = 16) -> list[str]:
    parts = []
    x = float(LEFT)
    for label, color in entries:
        parts.append(_rect(x, y - 10, 11, 11, color, label))
        parts.append(_text(x + 15, y, label))
        x += 26 + 0.6 * FONT * len(label)
    return parts


def _required_bracket(left: float, right: float, required: timedelta) -> list[str]:
    hours = required.total_seconds() / 3600
    caption = f"required clean window: {hours:g} h"
    inside = right - left > 200
    return [
        _line(left, 42, right, 42, AXIS),
        _line(left, 38, left, 46, AXIS),
        _line(right, 38, right, 46, AXIS),
        _text(left + 6 if inside else right, 37, caption, anchor="start" if inside else "end"),
    ]


def _time_ticks(
    start: datetime,
    end: datetime,
    x: Callable[[datetime], float],
    y: float,
    ticks: Sequence[datetime] | None = None,
) -> list[str]:
    parts = []
    span = end - start
    chosen = list(ticks) if ticks else [start + span * (i / 6) for i in range(7)]
    previous = None
    for i, at in enumerate(chosen):
        parts.append(_line(x(at), y, x(at), y + 4, AXIS))
        last = not ticks and i == len(chosen) - 1
        anchor = "start" if i == 0 else "end" if last else "middle"
        parts.append(_text(x(at), y + 17, axis_time(at, span, previous), anchor=anchor))
        previous = at
    return parts


def _centered_note(note: str) -> str:
    # a quarter down the plot: clear of the half-way gridline
    return _text((LEFT + WIDTH - RIGHT) / 2, TOP + (HEIGHT - TOP - BOTTOM) * 0.3, note,
                 anchor="middle", fill="#777")


def _rect(x: float, y: float, width: float, height: float, fill: str, tip: str) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{width:.1f}" height="{height:.1f}" '
        f'fill="{fill}"><title>{escape(tip)}</title></rect>'
    )


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str) -> str:
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
        f'stroke="{stroke}" stroke-width="1"/>'
    )


def _text(x: float, y: float, text: str, *, anchor: str = "start", fill: str = TEXT) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" fill="{fill}">'
        f"{escape(text)}</text>"
    )


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 4 or 5 times a power of ten at or above ``value`` (0 stays 0); the
    half of each is still a round axis label."""
    if value <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 4, 5, 10):
        if step * power >= value:
            return float(step * power)
    return float(10 * power)


def compact(value: float) -> str:
    """``950``, ``1.2k``, ``3.4M``: short enough for an axis."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}".rstrip("0").rstrip(".") + suffix
    return f"{value:.1f}".rstrip("0").rstrip(".") if value % 1 else f"{value:.0f}"
