"""Writes lint results as text (people), JSON (pipelines) or SARIF 2.1.0 (CI annotations)."""

from __future__ import annotations

import json
from typing import Any

from core import __version__
from lint.findings import Finding, Rule
from lint.run import LintResult, all_rules

FORMATS = ("text", "json", "sarif")
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_SARIF_LEVEL = {"error": "error", "warning": "warning", "info": "note"}


def render(result: LintResult, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_json(result), indent=2) + "\n"
    if fmt == "sarif":
        return json.dumps(to_sarif(result), indent=2) + "\n"
    return to_text(result)


def to_text(result: LintResult) -> str:
    lines = []
    for finding in result.findings:
        lines.append(f"{finding.location}: {finding.severity} [{finding.rule}] {finding.message}")
        lines.append(f"    why: {finding.why}")
        lines.append(f"    fix: {finding.fix}")
        lines += [f"    evidence: {e}" for e in finding.evidence]
    counts = result.counts()
    verdict = "FAIL" if result.failed else "ok"
    lines.append(
        f"{len(result.files)} file{'s' if len(result.files) != 1 else ''}: "
        f"{counts['error']} errors, {counts['warning']} warnings, {counts['info']} notes "
        f"(--fail-on {result.options.fail_on}: {verdict})"
    )
    return "\n".join(lines) + "\n"


def to_json(result: LintResult) -> dict[str, Any]:
    return {
        "dualwrite": __version__,
        "squawk": result.squawk_version,
        "fail_on": result.options.fail_on,
        "failed": result.failed,
        "live": result.server_version is not None,
        "server_version": result.server_version,
        "files": [
            {
                "path": r.script.path,
                "statements": len([s for s in r.script.statements if not s.inner]),
                "header": r.script.header,
            }
            for r in result.files
        ],
        "summary": result.counts(),
        "findings": [f.as_json() for f in result.findings],
    }


def to_sarif(result: LintResult) -> dict[str, Any]:
    rules = all_rules()
    used = sorted({f.rule for f in result.findings})
    index = {rule: i for i, rule in enumerate(used)}
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {
                    "driver": {
                        "name": "dualwrite lint",
                        "version": __version__,
                        "rules": [_sarif_rule(rid, rules.get(rid)) for rid in used],
                    }
                },
                "results": [_sarif_result(f, index[f.rule]) for f in result.findings],
                "columnKind": "unicodeCodePoints",
            }
        ],
    }


def _sarif_rule(rule_id: str, rule: Rule | None) -> dict[str, Any]:
    if rule is None:
        return {"id": rule_id, "shortDescription": {"text": rule_id}}
    return {
        "id": rule.id,
        "shortDescription": {"text": rule.summary},
        "fullDescription": {"text": rule.why},
        "help": {"text": rule.fix},
        "defaultConfiguration": {"level": _SARIF_LEVEL[rule.severity]},
        "properties": {"engine": rule.engine},
    }


def _sarif_result(finding: Finding, rule_index: int) -> dict[str, Any]:
    text = f"{finding.message}. Why: {finding.why} Fix: {finding.fix}"
    if finding.evidence:
        text += " Evidence: " + "; ".join(finding.evidence)
    return {
        "ruleId": finding.rule,
        "ruleIndex": rule_index,
        "level": _SARIF_LEVEL[finding.severity],
        "message": {"text": text},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": {"uri": finding.path},
                    "region": {
                        "startLine": finding.line,
                        "endLine": max(finding.end_line or finding.line, finding.line),
                    },
                }
            }
        ],
    }
