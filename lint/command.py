"""``dualwrite lint FILE.sql…``: run the linter as the command line asked and pick the exit code.

Exit 0 when no finding is at or above ``--fail-on`` (default ``lint.fail_on``: error), 1 when
one is, 2 for a usage error (a missing or unreadable file, an unknown rule, a bad option, an
unreachable database with ``--live``). A file that does not parse is a finding
(``syntax-error``), not a usage error: it is the script under review that is wrong.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.config import Config, load_config, parse_duration
from core.errors import ConfigError
from lint.output import render
from lint.run import LintResult, all_rules, lint_live, lint_offline, options_from

EXIT_CLEAN, EXIT_FINDINGS = 0, 1


@dataclass(frozen=True)
class LintRequest:
    files: Sequence[str]
    config: str | None = None
    live: bool = False
    since: str | None = None
    fmt: str = "text"
    out: str | None = None
    fail_on: str | None = None
    disable: Sequence[str] = ()


def run(request: LintRequest) -> int:
    result = lint(request)
    text = render(result, request.fmt)
    if request.out:
        try:
            Path(request.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ConfigError("--out", f"cannot write {request.out}: {exc.strerror}") from None
    else:
        sys.stdout.write(text)
    return EXIT_FINDINGS if result.failed else EXIT_CLEAN


def lint(request: LintRequest) -> LintResult:
    config = load_config(request.config) if request.config else Config()
    try:
        since = parse_duration(request.since) if request.since else None
    except ValueError as exc:
        raise ConfigError("--since", str(exc)) from None
    options = options_from(
        config,
        fail_on=request.fail_on,
        disable=request.disable,
        live=request.live,
        since=since,
        with_mappings=request.config is not None,
    )
    if request.live:
        return asyncio.run(lint_live(request.files, options, config))
    return lint_offline(request.files, options)


def rules_table() -> str:
    """``--list-rules``: one line per rule."""
    lines = []
    for rule in sorted(all_rules().values(), key=lambda r: (r.engine, r.id)):
        needs = f" (needs {rule.needs})" if rule.needs else ""
        lines.append(f"{rule.id:<40} {rule.severity:<8} {rule.engine:<9} {rule.summary}{needs}")
    return "\n".join(lines) + "\n"
