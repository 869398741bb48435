"""A lint finding and the rule it comes from: id, severity, where, why it is dangerous, the safe
rewrite, and the evidence (live database, traffic) gathered for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: severities, lowest first
SEVERITIES = ("info", "warning", "error")
DUALWRITE, SQUAWK = "dualwrite", "squawk"


def at_least(severity: str, threshold: str) -> bool:
    return SEVERITIES.index(severity) >= SEVERITIES.index(threshold)


@dataclass(frozen=True)
class Rule:
    """A rule as documented in docs/lint-rules.md."""

    id: str
    severity: str
    summary: str
    why: str
    fix: str
    #: which engine finds it: our pglast rules or squawk's
    engine: str = DUALWRITE
    #: what it needs beyond the file: "" (nothing), "config", "live"
    needs: str = ""


@dataclass
class Finding:
    rule: str
    severity: str
    path: str
    line: int
    message: str
    why: str
    fix: str
    engine: str = DUALWRITE
    end_line: int | None = None
    column: int = 1
    #: index of the statement in the script (None: about the file as a whole)
    statement: int | None = None
    #: facts gathered for it: table size, predicted duration, lock queue, traffic, mappings
    evidence: list[str] = field(default_factory=list)

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}"

    def as_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "severity": self.severity,
            "engine": self.engine,
            "path": self.path,
            "line": self.line,
            "end_line": self.end_line or self.line,
            "message": self.message,
            "why": self.why,
            "fix": self.fix,
            "evidence": list(self.evidence),
        }
