"""The cutover report's data: the evidence read per mapping, the judged criteria, the verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from core.shadow import ShadowSummary

GO, NO_GO = "GO", "NO-GO"


@dataclass(frozen=True)
class Pass:
    """One finished reconcile pass (a row of ``dualwrite.reconcile_runs``)."""

    id: int
    started_at: datetime
    finished_at: datetime
    rows_compared: int
    missing: int
    extra: int
    changed: int
    pending: int
    #: False when the pass was limited to one tenant: it does not cover the whole mapping
    full: bool = True
    #: the reconciler recorded ``clean = false`` (trusted even if the counts are zero)
    flagged_unclean: bool = False

    @property
    def divergent(self) -> int:
        return self.missing + self.extra + self.changed

    @property
    def clean(self) -> bool:
        return self.divergent == 0 and not self.flagged_unclean


@dataclass(frozen=True)
class Bucket:
    """Mirroring in one time bucket: what the proxies captured, failed and could not mirror."""

    start: datetime
    statements: int = 0
    rows: int = 0
    failures: int = 0
    unmirrored: int = 0


@dataclass(frozen=True)
class Backfill:
    """A mapping's backfill state (``dualwrite.backfill_state``)."""

    status: str
    rows_done: int
    rows_estimate: int | None
    finished_at: datetime | None


@dataclass
class Facts:
    """Everything the control schema says about one mapping, as read for the report."""

    #: finished reconcile passes in the look-back, newest first
    passes: list[Pass] = field(default_factory=list)
    #: the look-back the passes were read over (the clean window can be no longer)
    passes_since: datetime | None = None
    #: failed or interrupted passes in the history window (shown, never counted as evidence)
    unfinished_passes: int = 0
    dead_letters: int = 0
    #: dead letters by SQLSTATE (errors may quote row values, so only codes are reported)
    dead_letters_by_sqlstate: dict[str, int] = field(default_factory=dict)
    outbox_depth: int = 0
    outbox_oldest_age_seconds: float = 0.0
    #: totals over the criteria window
    unmirrored_in_window: int = 0
    mirror_failures_in_window: int = 0
    #: capture: both. Committed changes statement capture missed, found in the WAL
    uncaptured_in_window: int = 0
    #: the mapping was marked for a full resync (a TRUNCATE, a dropped slot): why, and when last
    resync_reason: str | None = None
    resync_marked_at: datetime | None = None
    backfill: Backfill | None = None
    paused: bool = False
    #: mirroring per bucket over the history window, oldest first
    activity: list[Bucket] = field(default_factory=list)


@dataclass(frozen=True)
class Criterion:
    """One cutover criterion judged for one mapping: what was measured against what bound."""

    name: str
    title: str
    #: the measured value (a number where there is one), and how to read it
    measured: float | int | str | None
    measured_text: str
    threshold_text: str
    passed: bool
    detail: str = ""


@dataclass
class MappingReport:
    """The verdict on one mapping, the criteria behind it, and its history."""

    name: str
    source: str
    target: str
    mode: str
    criteria: list[Criterion]
    facts: Facts
    #: what the running sidecar said about this mapping (None: no --status-url, or not listed)
    live: dict[str, Any] | None = None

    @property
    def go(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def verdict(self) -> str:
        return GO if self.go else NO_GO

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]


@dataclass(frozen=True)
class ContractReadiness:
    """What application traffic still references of a mapping's source (the old relation the
    contract step will drop), from the sidecars' traffic evidence over the history window."""

    mapping: str
    relation: str
    #: statement shapes (fingerprints) that referenced the relation in the window
    statements: int
    first_seen: datetime | None
    last_seen: datetime | None
    #: column -> when a statement last referenced it (``*``: every column)
    columns: dict[str, datetime]
    #: what keeps the absence of references from proving no use (empty: the window is covered)
    gaps: tuple[str, ...]

    @property
    def ready(self) -> bool:
        return self.statements == 0 and not self.gaps


@dataclass
class Report:
    """The whole cutover report."""

    generated_at: datetime
    #: the database the control schema was read from (no credentials)
    database: str
    #: unmirrored statements and mirror failures are counted over [window_start, generated_at]
    window_start: datetime
    #: history charts and tables cover [history_start, generated_at]
    history_start: datetime
    #: longest tolerated time without a reconcile pass inside the clean window
    max_gap: timedelta
    bucket: timedelta
    thresholds: dict[str, Any]
    mappings: list[MappingReport]
    #: criteria about the whole deployment (the sidecar's /status when asked for)
    overall_criteria: list[Criterion] = field(default_factory=list)
    status_url: str | None = None
    status: dict[str, Any] | None = None
    #: per mapping, what traffic still references of its source (see ContractReadiness)
    contract: list[ContractReadiness] = field(default_factory=list)
    #: shadow reads replayed against the new schema (None: the shadow is not configured)
    shadow: ShadowSummary | None = None

    @property
    def window_span(self) -> timedelta:
        return self.generated_at - self.window_start

    @property
    def history_span(self) -> timedelta:
        return self.generated_at - self.history_start

    @property
    def go(self) -> bool:
        return bool(self.mappings) and all(m.go for m in self.mappings) and all(
            c.passed for c in self.overall_criteria
        )

    @property
    def verdict(self) -> str:
        return GO if self.go else NO_GO
