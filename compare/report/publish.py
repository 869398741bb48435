"""``dualwrite report``: build the report, write it where asked, exit 0 for GO and 1 for NO-GO."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from compare.report.gather import ReportRequest, build_report
from compare.report.model import Report
from compare.report.render import FORMATS, render
from core.config import Config, parse_duration
from core.errors import ConfigError

EXIT_GO, EXIT_NO_GO = 0, 1


def infer_format(fmt: str | None, out: str | None) -> str:
    """``--format`` if given, else the ``--out`` file's suffix when it names one, else md."""
    if fmt is not None:
        if fmt not in FORMATS:
            choices = ", ".join(FORMATS)
            raise ConfigError("--format", f"unknown format {fmt!r}: use one of {choices}")
        return fmt
    suffix = Path(out).suffix.lstrip(".").lower() if out else ""
    suffix = {"htm": "html", "markdown": "md"}.get(suffix, suffix)
    return suffix if suffix in FORMATS else "md"


def make_request(
    since: str, max_gap: str | None, status_url: str | None, tenant: str | None = None
) -> ReportRequest:
    """Parse the command line's durations; a bad one is a usage error (exit 2)."""
    try:
        return ReportRequest(
            since=parse_duration(since),
            max_gap=parse_duration(max_gap) if max_gap else None,
            status_url=status_url,
            tenant=tenant,
        )
    except ValueError as exc:
        raise ConfigError("--since/--max-gap", str(exc)) from None


async def run_report(
    config: Config,
    *,
    since: str = "24h",
    fmt: str | None = None,
    out: str | None = None,
    status_url: str | None = None,
    max_gap: str | None = None,
    tenant: str | None = None,
) -> int:
    """The whole command: returns the exit code (ConfigError propagates as exit 2); with
    ``tenant`` the exit status is that tenant's verdict alone."""
    request = make_request(since, max_gap, status_url, tenant)
    chosen = infer_format(fmt, out)
    report = await build_report(config, request)
    text = render(report, chosen)
    if out:
        write_atomically(Path(out), text)
        print(summary_line(report, out), file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_GO if report.exit_go else EXIT_NO_GO


def summary_line(report: Report, out: str) -> str:
    reasons = [
        f"{m.name}: {', '.join(c.name for c in m.failed)}" for m in report.mappings if not m.go
    ]
    reasons += [c.name for c in report.overall_criteria if not c.passed]
    failing = "; ".join(reasons)
    line = f"dualwrite report: {report.verdict}{f' ({failing})' if failing else ''} -> {out}"
    if report.tenant is not None:
        found = report.tenant_report(report.tenant)
        line += f"; tenant {report.tenant}: {found.verdict if found else 'NO-GO'}"
    return line


def write_atomically(path: Path, text: str) -> None:
    """Write next to ``path`` and rename, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
