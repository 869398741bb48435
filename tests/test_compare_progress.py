"""The progress line on a terminal, progress logs elsewhere, and the summary table."""

from __future__ import annotations

import io

from structlog.testing import capture_logs

from compare.progress import Progress, format_table


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place():
    out = Tty()
    progress = Progress(out)
    progress.start("backfill items", 200)
    progress.advance(50)
    progress.finish()
    text = out.getvalue()
    frames = text.split("\r\x1b[K")[1:]
    assert frames[0].startswith("backfill items [........................]   0%  0/200 rows")
    assert frames[-1].startswith("backfill items [######..................]  25%  50/200 rows")
    assert text.endswith("\n")


def test_elsewhere_progress_is_logged_not_drawn():
    out = io.StringIO()
    progress = Progress(out, log_every_seconds=0)
    with capture_logs() as logs:
        progress.start("reconcile items", None)
        progress.advance(10)
        progress.finish()
    assert out.getvalue() == ""
    assert [(e["event"], e["job"], e["rows"]) for e in logs] == [
        ("progress", "reconcile items", 10)
    ]


def test_summary_table_aligns_text_left_and_numbers_right():
    table = format_table(["mapping", "rows"], [["items", 1234567], ["customers", 5]])
    assert table.splitlines() == [
        "mapping         rows",
        "---------  ---------",
        "items      1,234,567",
        "customers          5",
    ]
