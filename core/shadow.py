"""Shadow-read results in the control schema: per fingerprint counts, samples and latencies.

The replay (proxy/shadow/replay.py) adds each verdict to a :class:`ShadowLog` in memory; every
``shadow.flush_interval_seconds`` the log is written in one transaction and emptied. The cutover
report reads it back with :func:`read_summary`, and per tenant (when a mapping has a
``tenant_column``) with :func:`read_tenants`. Samples hold the normalized statement (literals
as $n), never parameter values, and result values only for ``shadow.reveal_columns``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg

from core.errors import ConfigError
from core.sqltext import quote_ident

#: the outcomes a replay can have (dropped reads never reach the log)
OUTCOMES: Final = ("match", "mismatch", "noise", "error", "unsafe")
#: latency samples written per fingerprint per flush
LATENCY_SAMPLES_PER_FLUSH: Final = 50
#: latency samples older than this are deleted at flush
LATENCY_RETENTION: Final = "7 days"
#: tenants one replay is attributed to at most (the first found; a bound, not a sample)
MAX_TENANTS_PER_REPLAY: Final = 100


@dataclass
class ShapeResults:
    """What one fingerprint's replays came to since the last flush."""

    statement: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    first_seen: float = 0.0
    last_seen: float = 0.0
    #: outcome -> one sample (the first since the last flush)
    samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: (old seconds, new seconds) of matched or mismatched replays
    latencies: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class TenantResults:
    """What the replays attributed to one tenant (or to none) came to since the last flush."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    first_seen: float = 0.0
    last_seen: float = 0.0
    last_mismatch: str | None = None


class ShadowLog:
    """Verdicts not yet written to the control schema."""

    def __init__(self) -> None:
        self.shapes: dict[str, ShapeResults] = {}
        #: tenant -> results; the key None holds replays no tenant was found for
        self.tenants: dict[str | None, TenantResults] = {}

    def add(
        self,
        fingerprint: str,
        statement: str,
        outcome: str,
        sample: dict[str, Any] | None,
        latency: tuple[float, float] | None,
        tenants: tuple[str, ...] | None = None,
    ) -> None:
        """One verdict; ``tenants`` are those it is attributed to (empty: none found; None:
        no mapping has a tenant_column, nothing is recorded per tenant)."""
        now = time.time()
        if tenants is not None:
            for tenant in tenants or (None,):
                found = self.tenants.get(tenant)
                if found is None:
                    found = self.tenants[tenant] = TenantResults(first_seen=now)
                found.counts[outcome] += 1
                found.last_seen = now
                if outcome == "mismatch":
                    found.last_mismatch = fingerprint
        shape = self.shapes.get(fingerprint)
        if shape is None:
            shape = self.shapes[fingerprint] = ShapeResults(statement, first_seen=now)
        shape.counts[outcome] += 1
        shape.last_seen = now
        if sample is not None and outcome not in shape.samples:
            shape.samples[outcome] = sample
        if latency is not None and len(shape.latencies) < LATENCY_SAMPLES_PER_FLUSH:
            shape.latencies.append(latency)

    def take(self) -> tuple[dict[str, ShapeResults], dict[str | None, TenantResults]]:
        taken = self.shapes, self.tenants
        self.shapes, self.tenants = {}, {}
        return taken


_UPSERT = """
INSERT INTO dualwrite.shadow_statements AS s
    (fingerprint, statement, matched, mismatched, noise, errors, unsafe, first_seen, last_seen,
     samples)
VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8), to_timestamp($9), $10::jsonb)
ON CONFLICT (fingerprint) DO UPDATE SET
    statement = EXCLUDED.statement,
    matched = s.matched + EXCLUDED.matched,
    mismatched = s.mismatched + EXCLUDED.mismatched,
    noise = s.noise + EXCLUDED.noise,
    errors = s.errors + EXCLUDED.errors,
    unsafe = s.unsafe + EXCLUDED.unsafe,
    first_seen = least(s.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
    samples = EXCLUDED.samples || s.samples
"""

_LATENCY = """
INSERT INTO dualwrite.shadow_latency (fingerprint, old_ms, new_ms) VALUES ($1, $2, $3)
"""

_UPSERT_TENANT = """
INSERT INTO dualwrite.shadow_tenants AS s
    (attributed, tenant, matched, mismatched, noise, errors, unsafe, first_seen, last_seen,
     last_mismatch)
VALUES ($1, $2, $3, $4, $5, $6, $7, to_timestamp($8), to_timestamp($9), $10)
ON CONFLICT (attributed, tenant) DO UPDATE SET
    matched = s.matched + EXCLUDED.matched,
    mismatched = s.mismatched + EXCLUDED.mismatched,
    noise = s.noise + EXCLUDED.noise,
    errors = s.errors + EXCLUDED.errors,
    unsafe = s.unsafe + EXCLUDED.unsafe,
    first_seen = least(s.first_seen, EXCLUDED.first_seen),
    last_seen = greatest(s.last_seen, EXCLUDED.last_seen),
    last_mismatch = coalesce(EXCLUDED.last_mismatch, s.last_mismatch)
"""

_EXPIRE = f"DELETE FROM dualwrite.shadow_latency WHERE at < now() - interval '{LATENCY_RETENTION}'"


async def flush(
    conn: asyncpg.Connection,
    shapes: dict[str, ShapeResults],
    tenants: dict[str | None, TenantResults] | None = None,
) -> None:
    """Write taken results in one transaction (samples already stored are kept)."""
    rows = [
        (
            fingerprint,
            shape.statement,
            shape.counts["match"],
            shape.counts["mismatch"],
            shape.counts["noise"],
            shape.counts["error"],
            shape.counts["unsafe"],
            shape.first_seen,
            shape.last_seen,
            json.dumps(shape.samples, default=str),
        )
        for fingerprint, shape in shapes.items()
    ]
    latencies = [
        (fingerprint, old * 1000.0, new * 1000.0)
        for fingerprint, shape in shapes.items()
        for old, new in shape.latencies
    ]
    per_tenant = [
        (
            tenant is not None,
            tenant or "",
            *(results.counts[outcome] for outcome in OUTCOMES),
            results.first_seen,
            results.last_seen,
            results.last_mismatch,
        )
        for tenant, results in (tenants or {}).items()
    ]
    async with conn.transaction():
        if rows:
            await conn.executemany(_UPSERT, rows)
        if per_tenant:
            await conn.executemany(_UPSERT_TENANT, per_tenant)
        if latencies:
            await conn.executemany(_LATENCY, latencies)
        await conn.execute(_EXPIRE)


# --- reading it back ------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowShape:
    """One fingerprint as the control schema holds it."""

    fingerprint: str
    statement: str
    counts: dict[str, int]
    first_seen: datetime
    last_seen: datetime
    samples: dict[str, Any]


@dataclass(frozen=True)
class ShadowSummary:
    """Everything the cutover report says about shadow reads."""

    shapes: tuple[ShadowShape, ...]
    #: new/old latency ratio percentiles (p50, p90, p99); None without samples
    latency_ratio: tuple[float, float, float] | None

    def total(self, outcome: str) -> int:
        return sum(shape.counts[outcome] for shape in self.shapes)

    @property
    def compared(self) -> int:
        """Replays that were judged: matched plus mismatched (noise, errors, unsafe are not)."""
        return self.total("match") + self.total("mismatch")

    @property
    def mismatch_ratio(self) -> float:
        return self.total("mismatch") / self.compared if self.compared else 0.0

    def top_mismatches(self, limit: int = 5) -> list[ShadowShape]:
        found = [shape for shape in self.shapes if shape.counts["mismatch"]]
        return sorted(found, key=lambda s: -s.counts["mismatch"])[:limit]


_SHAPES = """
SELECT fingerprint, statement, matched, mismatched, noise, errors, unsafe, first_seen, last_seen,
       samples::text AS samples
FROM dualwrite.shadow_statements
WHERE last_seen >= $1
ORDER BY mismatched DESC, fingerprint
"""

_RATIOS = """
SELECT percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY new_ms / old_ms)
FROM dualwrite.shadow_latency
WHERE at >= $1 AND old_ms > 0
"""


async def read_summary(conn: asyncpg.Connection, since: datetime) -> ShadowSummary:
    """The shadow's results seen since ``since`` (empty when the schema predates them)."""
    if not await conn.fetchval("SELECT to_regclass('dualwrite.shadow_statements') IS NOT NULL"):
        return ShadowSummary((), None)
    shapes = tuple(
        ShadowShape(
            fingerprint=row["fingerprint"],
            statement=row["statement"],
            counts={
                "match": row["matched"],
                "mismatch": row["mismatched"],
                "noise": row["noise"],
                "error": row["errors"],
                "unsafe": row["unsafe"],
            },
            first_seen=row["first_seen"],
            last_seen=row["last_seen"],
            samples=json.loads(row["samples"]),
        )
        for row in await conn.fetch(_SHAPES, since)
    )
    ratios = await conn.fetchval(_RATIOS, since)
    latency = tuple(float(r) for r in ratios) if ratios and ratios[0] is not None else None
    return ShadowSummary(shapes, latency)  # type: ignore[arg-type]


@dataclass(frozen=True)
class TenantShadow:
    """The replays attributed to one tenant (or, ``tenant`` None, to none)."""

    tenant: str | None
    counts: dict[str, int]
    last_mismatch: str | None = None

    @property
    def compared(self) -> int:
        return self.counts["match"] + self.counts["mismatch"]


_TENANTS = """
SELECT attributed, tenant, matched, mismatched, noise, errors, unsafe, last_mismatch
FROM dualwrite.shadow_tenants
WHERE last_seen >= $1
"""


async def read_tenants(conn: asyncpg.Connection, since: datetime) -> dict[str | None, TenantShadow]:
    """Per tenant (the key None: unattributed), the replays seen since ``since``; empty when
    the schema predates them."""
    if not await conn.fetchval("SELECT to_regclass('dualwrite.shadow_tenants') IS NOT NULL"):
        return {}
    found: dict[str | None, TenantShadow] = {}
    for row in await conn.fetch(_TENANTS, since):
        tenant = row["tenant"] if row["attributed"] else None
        found[tenant] = TenantShadow(
            tenant,
            {
                "match": row["matched"],
                "mismatch": row["mismatched"],
                "noise": row["noise"],
                "error": row["errors"],
                "unsafe": row["unsafe"],
            },
            row["last_mismatch"],
        )
    return found


# --- the views, checked ---------------------------------------------------------------------

_COLUMNS = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, a.atttypid AS oid
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

#: the view's type can stand for the old one: the same, binary-coercible, or cast implicitly
_COMPATIBLE = """
SELECT $1::oid = $2::oid OR EXISTS (
    SELECT 1 FROM pg_cast
    WHERE castsource = $1 AND casttarget = $2 AND castcontext = 'i'
)
"""


async def check_views(conn: asyncpg.Connection, views: dict[str, str]) -> list[str]:
    """Each view exists, is readable, and has the old relation's columns with compatible
    types; one line per view, ConfigError naming the first that is not."""
    lines = []
    for old, new in views.items():
        path = f"shadow.views[{old}]"
        for name in (old, new):
            if await conn.fetchval("SELECT to_regclass($1)", name) is None:
                raise ConfigError(path, f"{name} does not exist")
        try:
            await conn.execute(f"SELECT * FROM {_qualified(new)} LIMIT 1")
        except asyncpg.PostgresError as exc:
            raise ConfigError(path, f"{new} is not readable: {exc}") from None
        have = {row["name"]: row for row in await conn.fetch(_COLUMNS, new)}
        for column in await conn.fetch(_COLUMNS, old):
            found = have.get(column["name"])
            if found is None:
                raise ConfigError(path, f"{new} has no column {column['name']}")
            if not await conn.fetchval(_COMPATIBLE, found["oid"], column["oid"]):
                raise ConfigError(
                    path,
                    f"{new}.{column['name']} is {found['type']}, {old} has {column['type']}",
                )
        lines.append(f"shadow view {new} answers for {old}: ok ({len(have)} columns)")
    return lines


def _qualified(name: str) -> str:
    schema, _, relation = name.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(relation)}"
