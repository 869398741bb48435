"""Progress of passes and backfills (a bar on a terminal, log lines otherwise), summary tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from core.logs import get_logger

_BAR_WIDTH = 24


class Progress:
    """Reports progress of one job at a time (``start`` ... ``advance`` ... ``finish``)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        tty: bool | None = None,
        log_every_seconds: float = 10.0,
        event: str = "progress",
    ) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every = log_every_seconds
        self._log = get_logger(event)
        self.label = ""
        self.total: int | None = None
        self.done = 0
        self._started = self._shown = 0.0

    def start(self, label: str, total: int | None, done: int = 0) -> None:
        self.label, self.total, self.done = label, total, done
        self._started = self._shown = time.monotonic()
        self._render(force=True)

    def advance(self, rows: int) -> None:
        self.done += rows
        self._render()

    def finish(self) -> None:
        self._render(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _rate(self) -> float:
        elapsed = time.monotonic() - self._started
        return self.done / elapsed if elapsed > 0 else 0.0

    def _render(self, *, force: bool = False) -> None:
        now = time.monotonic()
        interval = 0.1 if self.tty else self.log_every
        if not force and now - self._shown < interval:
            return
        self._shown = now
        if self.tty:
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
        elif not force:
            self._log.info(
                "progress",
                job=self.label,
                rows=self.done,
                total=self.total,
                rows_per_second=round(self._rate()),
            )

    def line(self) -> str:
        """``label [#####......]  42%  4,200/10,000 rows  1,234 rows/s``"""
        rate = f"{self._rate():,.0f} rows/s"
        if not self.total:
            return f"{self.label}  {self.done:,} rows  {rate}"
        ratio = min(1.0, self.done / self.total)
        filled = round(ratio * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        return f"{self.label} [{bar}] {ratio:4.0%}  {self.done:,}/{self.total:,} rows  {rate}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: left-aligned text, right-aligned numbers."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], (int, float)) for row in rows) and bool(rows)
        for i in range(len(headers))
    ]

    def fmt(values: Sequence[str]) -> str:
        aligned = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in aligned).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
