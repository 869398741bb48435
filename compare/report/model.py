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
    #: divergent keys found in the dead letters (the reconciler then records clean = false)
    dead_lettered: int = 0
    #: False when the pass was limited to one tenant: it does not cover the whole mapping
    full: bool = True
    #: the reconciler recorded ``clean = false`` (trusted even if the counts are zero)
    flagged_unclean: bool = False
    #: the tenant a tenant-limited pass covered
    tenant: str | None = None
    #: divergent rows per tenant: {"<tenant>": {"missing": n, "extra": n, "changed": n}}
    by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    #: staged cutover: the tenants moved when the pass ran (None: its mapping was in no pair)
    moved: tuple[str, ...] | None = None

    @property
    def divergent(self) -> int:
        return self.missing + self.extra + self.changed

    @property
    def clean(self) -> bool:
        return self.divergent == 0 and self.dead_lettered == 0 and not self.flagged_unclean


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


@dataclass(frozen=True)
class Repair:
    """One repair on record (a row of ``dualwrite.repairs``)."""

    id: int
    mapping: str
    at: datetime
    requested_by: str | None
    reason: str | None
    dry_run: bool
    run_id: int | None
    #: keys it was asked to repair
    keys: int
    #: keys still divergent after it (None: a dry run)
    divergent_after: int | None
    upserted: int
    deleted: int
    #: per key: {"key", "class", "tenant", "before", "after"} target rows, redacted (when read)
    images: list[dict[str, Any]] | None = None
    #: tenants of the repaired rows (None: not recorded, so the repair counts for every tenant)
    tenants: tuple[str, ...] | None = None


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
    #: repairs that wrote to the target since ``passes_since``, newest first (each one
    #: restarts the clean window)
    repairs: list[Repair] = field(default_factory=list)


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


class Judged:
    """A verdict over a list of criteria (mixed into the mapping and tenant reports)."""

    criteria: list[Criterion]

    @property
    def go(self) -> bool:
        return all(c.passed for c in self.criteria)

    @property
    def verdict(self) -> str:
        return GO if self.go else NO_GO

    @property
    def failed(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.passed]


@dataclass
class MappingReport(Judged):
    """The verdict on one mapping, the criteria behind it, and its history."""

    name: str
    source: str
    target: str
    mode: str
    criteria: list[Criterion]
    facts: Facts
    #: what the running sidecar said about this mapping (None: no --status-url, or not listed)
    live: dict[str, Any] | None = None


@dataclass(frozen=True)
class InvariantFailure:
    """One failing group of an invariant check (values as JSON holds them)."""

    group: dict[str, Any]
    tenant: str | None
    #: None: the group is absent on that side
    old: list[Any] | None
    new: list[Any] | None


@dataclass(frozen=True)
class InvariantCheck:
    """A configured invariant and its most recent finished full check (``run_id`` None: never
    checked)."""

    name: str
    #: the mapping declaring it (None: migration-level)
    mapping: str | None
    kind: str
    description: str
    group_columns: tuple[str, ...]
    #: the group column holding the tenant (None: the invariant is not per tenant)
    tenant_column: str | None = None
    #: the names of the figures in a failing group's old and new values
    value_columns: tuple[str, ...] = ()
    run_id: int | None = None
    status: str | None = None
    finished_at: datetime | None = None
    groups_checked: int = 0
    groups_failed: int = 0
    by_tenant: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    #: the first failing groups recorded (at most :data:`INVARIANT_SAMPLES`)
    failures: tuple[InvariantFailure, ...] = ()

    @property
    def scope(self) -> str:
        return self.mapping or "migration"


#: failing groups the report shows per invariant
INVARIANT_SAMPLES = 10


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
class TenantReport(Judged):
    """One tenant's verdict: its own evidence in every mapping with a tenant_column, plus the
    criteria no tenant can be told apart in (outbox age, backfill, pause, ...)."""

    tenant: str
    #: divergent rows by class in the newest pass of each tenant mapping, summed
    divergent: dict[str, int]
    dead_letters: int
    invariant_failures: int
    criteria: list[Criterion]
    #: staged cutover (``cutover:``): "forward" (old is the source of truth, judged on the
    #: forward mappings) or "moved" (new is, judged on the reverse ones); None without one
    phase: str | None = None
    #: shadow reads attributed to this tenant that mismatched (core/shadow.py's rule)
    shadow_mismatches: int = 0

    @property
    def label(self) -> str:
        """The tenant as the table shows it: its id, and its phase in a staged cutover."""
        return self.tenant if self.phase is None else f"{self.tenant} ({self.phase})"

    @property
    def trouble(self) -> int:
        """Rows, groups and shadow mismatches in trouble, to rank tenants by."""
        return (
            sum(self.divergent.values())
            + self.dead_letters
            + self.invariant_failures
            + self.shadow_mismatches
        )


#: what the phase beside a tenant means (staged cutover)
PHASES = (
    "Staged cutover: a forward tenant writes the old schema, which is its source of truth, "
    "and is judged on the forward mappings; a moved tenant writes the new schema and is "
    "judged on the reverse mappings."
)


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
    #: every configured invariant with its latest full check
    invariants: list[InvariantCheck] = field(default_factory=list)
    #: per tenant, worst first (only when a mapping has a tenant_column)
    tenants: list[TenantReport] = field(default_factory=list)
    #: ``--tenant``: the tenant whose verdict the exit status follows
    tenant: str | None = None
    #: criteria configured looser than the production defaults (see criteria.relaxed)
    relaxed: list[str] = field(default_factory=list)
    #: (criterion, configured, production default) for every criterion
    settings: list[tuple[str, str, str]] = field(default_factory=list)

    def tenant_report(self, tenant: str) -> TenantReport | None:
        return next((t for t in self.tenants if t.tenant == tenant), None)

    @property
    def exit_go(self) -> bool:
        """What the exit status follows: the tenant's verdict with ``--tenant``, else all."""
        if self.tenant is None:
            return self.go
        found = self.tenant_report(self.tenant)
        return found is not None and found.go

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
