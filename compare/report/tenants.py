"""Per-tenant verdicts: each tenant judged on its own evidence, pure functions, no I/O.

For a tenant T, in every mapping with a ``tenant_column``:

- the clean window is walked over T's view of the passes: a full pass counts T's divergent
  rows only (its ``by_tenant``), a pass limited to T is full evidence for T, a pass limited
  to another tenant is left out; only repairs that touched T's rows (or whose tenants were not
  recorded) restart T's window;
- dead letters are those whose source row belongs to T (a full pass's dead-lettered keys are
  not counted per tenant, so in T's view of a pass they are left to this criterion);
- a tenant-aware invariant (``tenant:`` set) counts T's failing groups only;
- shadow reads: the mismatch ratio of the replays attributed to T plus the unattributed ones
  (compare/report/shadow.py), when the shadow attributes replays to tenants.

In a staged cutover (``cutover:``) each tenant is judged in its own phase: a moved tenant on
the reverse mappings (new is its source of truth) and not on the forward ones it has left, any
other tenant on the forward mappings and not on the reverse ones; mappings outside a pair count
for every tenant. A pair mapping's pass counts for a tenant only if it carried the tenant
when it ran (its recorded ``cutover_tenants``), so a tenant that has just moved earns its clean
window again on passes that compared it in its new phase.

Every other criterion (outbox age, unmirrored statements, mirror failures, uncaptured
changes, a pending resync, backfill, pause, invariants without a tenant column, the number of
shadow reads, the sidecar's status) cannot be told apart by tenant: it is shared, it counts
for every tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from compare.report.criteria import Window, clean_window, dead_letters, invariant
from compare.report.model import (
    Criterion,
    Facts,
    InvariantCheck,
    MappingReport,
    Pass,
    Repair,
    TenantReport,
)
from compare.report.shadow import tenant_shadow_criterion
from core.config import CutoverCriteria
from core.shadow import TenantShadow

#: mapping criteria judged again on each tenant's own evidence; all the others are shared
PER_TENANT = ("clean_window", "dead_letters")


@dataclass(frozen=True)
class TenantEvidence:
    """What gather read for the per-tenant verdicts."""

    #: the mappings with a tenant_column, judged as a whole
    mappings: Sequence[MappingReport]
    #: per mapping, dead letters per tenant (None: the tenant could not be found)
    dead_letters: Mapping[str, Mapping[str | None, int]]
    checks: Sequence[InvariantCheck]
    #: deployment criteria (migration-level invariants are re-judged per tenant)
    overall: Sequence[Criterion]
    #: tenants to list even without any trouble (report.tenants, cutover.tenants, --tenant)
    named: Iterable[str] = ()
    #: staged cutover: mapping name -> "forward" or "reverse" (mappings in a pair)
    directions: Mapping[str, str] = field(default_factory=dict)
    #: staged cutover: the moved tenants (None: no cutover configured)
    moved: frozenset[str] | None = None
    #: shadow replays per tenant (None key: unattributed); None: the shadow is not configured
    shadow: Mapping[str | None, TenantShadow] | None = None

    def phase(self, tenant: str) -> str | None:
        """The tenant's phase: "moved" (new is its source of truth), "forward", or None."""
        if self.moved is None:
            return None
        return "moved" if tenant in self.moved else "forward"

    def judges(self, mapping: str, tenant: str) -> bool:
        """Whether ``mapping`` carries ``tenant``'s rows in the tenant's phase."""
        direction = self.directions.get(mapping)
        if direction is None:
            return True
        return (direction == "reverse") == (self.phase(tenant) == "moved")


def tenants_seen(evidence: TenantEvidence) -> list[str]:
    """Every tenant the evidence names, and the named ones."""
    seen: set[str] = set(evidence.named)
    for mapping in evidence.mappings:
        for run in mapping.facts.passes:
            seen.update(run.by_tenant)
            if run.tenant is not None:
                seen.add(run.tenant)
    for per_tenant in evidence.dead_letters.values():
        seen.update(t for t in per_tenant if t is not None)
    for check in evidence.checks:
        seen.update(check.by_tenant)
    for tenant, shadow in (evidence.shadow or {}).items():
        if tenant is not None and shadow.counts["mismatch"]:
            seen.add(tenant)
    return sorted(seen)


def judge_tenants(
    evidence: TenantEvidence, criteria: CutoverCriteria, window: Window
) -> list[TenantReport]:
    """Every tenant's report, NO-GO first, then the most trouble first."""
    reports = [judge_tenant(t, evidence, criteria, window) for t in tenants_seen(evidence)]
    return sorted(reports, key=lambda r: (r.go, -r.trouble, r.tenant))


def judge_tenant(
    tenant: str, evidence: TenantEvidence, criteria: CutoverCriteria, window: Window
) -> TenantReport:
    judged: list[Criterion] = []
    divergent = {"missing": 0, "extra": 0, "changed": 0}
    dead_total = 0
    for mapping in evidence.mappings:
        if not evidence.judges(mapping.name, tenant):
            continue
        facts = tenant_facts(mapping.facts, tenant, evidence.directions.get(mapping.name))
        facts.dead_letters = int(evidence.dead_letters.get(mapping.name, {}).get(tenant, 0))
        dead_total += facts.dead_letters
        if facts.passes:
            newest = facts.passes[0]
            for cls in divergent:
                divergent[cls] += getattr(newest, cls)
        judged.append(_named(mapping.name, clean_window(facts, criteria, window)))
        judged.append(_named(mapping.name, dead_letters(facts, criteria)))
        judged += [
            _named(mapping.name, c)
            for c in mapping.criteria
            if c.name not in PER_TENANT and not c.name.startswith("invariant:")
        ]
    failing_groups = 0
    for check in evidence.checks:
        if check.tenant_column is not None:
            failing_groups += int(check.by_tenant.get(tenant, 0))
            judged.append(_tenant_invariant(check, tenant, criteria, window))
        else:
            judged.append(invariant(check, criteria, window))
    judged += [c for c in evidence.overall if not c.name.startswith("invariant:")]
    shadow_mismatches = 0
    if evidence.shadow is not None:
        judged.append(tenant_shadow_criterion(tenant, evidence.shadow, criteria))
        mine = evidence.shadow.get(tenant)
        shadow_mismatches = mine.counts["mismatch"] if mine else 0
    return TenantReport(
        tenant,
        divergent,
        dead_total,
        failing_groups,
        judged,
        evidence.phase(tenant),
        shadow_mismatches=shadow_mismatches,
    )


def tenant_facts(facts: Facts, tenant: str, direction: str | None = None) -> Facts:
    """``facts`` as tenant ``tenant`` sees them (the module docstring's rules); ``direction``:
    the mapping's in a staged cutover, whose passes count only where they carried the tenant."""
    passes = [
        p
        for p in (_tenant_pass(run, tenant) for run in facts.passes)
        if p is not None and _carried(p, tenant, direction)
    ]
    repairs = [r for r in facts.repairs if _touches(r, tenant)]
    return replace(facts, passes=passes, repairs=repairs, dead_letters_by_sqlstate={})


def _carried(run: Pass, tenant: str, direction: str | None) -> bool:
    """Whether the pass compared the tenant's rows: a pair mapping's pass did only in the
    tenant's phase then (a pass recorded before cutovers were recorded is trusted)."""
    if direction is None or run.moved is None:
        return True
    return (tenant in run.moved) == (direction == "reverse")


def _tenant_pass(run: Pass, tenant: str) -> Pass | None:
    if run.tenant is not None:
        # a pass limited to this tenant covers all of its rows
        return replace(run, full=True, by_tenant={}) if run.tenant == tenant else None
    counts = run.by_tenant.get(tenant, {})
    return replace(
        run,
        missing=int(counts.get("missing", 0)),
        extra=int(counts.get("extra", 0)),
        changed=int(counts.get("changed", 0)),
        # dead-lettered keys are not counted per tenant: the tenant's own dead letters are
        # judged by its dead-letters criterion instead
        dead_lettered=0,
        # flagged with no counts: nothing says which tenant, so it counts for every tenant
        flagged_unclean=run.flagged_unclean and run.divergent == 0 and run.dead_lettered == 0,
        by_tenant={},
    )


def _touches(repair: Repair, tenant: str) -> bool:
    return not repair.tenants or tenant in repair.tenants


def _tenant_invariant(
    check: InvariantCheck, tenant: str, criteria: CutoverCriteria, window: Window
) -> Criterion:
    failing = int(check.by_tenant.get(tenant, 0))
    mine = tuple(f for f in check.failures if f.tenant == tenant)
    judged = invariant(replace(check, groups_failed=failing, failures=mine), criteria, window)
    if isinstance(judged.measured, int):
        judged = replace(judged, measured_text=f"{failing} failing (of this tenant)")
    return judged


def _named(mapping: str, criterion: Criterion) -> Criterion:
    """A mapping's criterion in a tenant's list: its mapping in the name and title."""
    return replace(
        criterion, name=f"{mapping}:{criterion.name}", title=f"{mapping}: {criterion.title}"
    )
