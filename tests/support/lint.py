"""Helpers for the ``dualwrite lint`` tests: run the command, and give a database the evidence
the live rules read (the POS schema, the control schema, recorded traffic).

- :func:`run_cli` runs ``dualwrite lint`` in this process and returns (exit code, stdout, stderr).
- :func:`lint_text` lints SQL text written to a file and returns the findings.
- :func:`record_traffic` analyses statements with ``core.traffic.analyse`` and writes them with
  the sidecar's own writer (``core.traffic.flush``), as a sidecar that started recording
  ``recording_for`` ago would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from core.control import install
from core.traffic import TrafficLog, analyse, flush
from dualwrite.cli import main
from lint.command import LintRequest, lint
from lint.findings import Finding

from .pos import load_schema
from .postgres import Database

#: what the documented examples assume the application runs
DOC_TRAFFIC = ("SELECT first_name, last_name, email FROM users WHERE id = $1",)


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["lint", *args])
    return code, out.getvalue(), err.getvalue()


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data)))
    return path


def lint_text(
    tmp_path: Path,
    sql: str,
    *,
    name: str = "script.sql",
    config: Path | None = None,
    live: bool = False,
    since: str | None = None,
) -> list[Finding]:
    path = tmp_path / name
    path.write_text(sql)
    request = LintRequest(
        files=[str(path)], config=str(config) if config else None, live=live, since=since
    )
    return lint(request).findings


def rules_of(findings: Iterable[Finding]) -> set[str]:
    return {f.rule for f in findings}


async def _install_and_record(
    dsn: str, statements: Iterable[str], recording_for: float, sidecar: str
) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await install(conn)
        log = TrafficLog(sidecar)
        for sql in statements:
            for shape in analyse(sql):
                log.saw(shape)
        await flush(conn, log, started_at=time.time() - recording_for, max_fingerprints=10_000)
    finally:
        await conn.close()


def record_traffic(
    db: Database,
    statements: Iterable[str],
    *,
    recording_for: float = 8 * 86400.0,
    sidecar: str = "test-sidecar",
) -> None:
    """The control schema installed and ``statements`` recorded as application traffic."""
    asyncio.run(_install_and_record(db.dsn, list(statements), recording_for, sidecar))


def evidence_database(db: Database, statements: Iterable[str] = DOC_TRAFFIC) -> None:
    """The POS schema, the control schema and a week of recorded traffic."""
    load_schema(db)
    record_traffic(db, statements)
