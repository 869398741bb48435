"""The same-database differ: one statement per keyset chunk, exact in a single snapshot.

Source, target and outbox are read in the same snapshot, so a key whose mirror is still queued
is seen as pending, never as divergent; a divergent key is re-checked once in a fresh
snapshot before it counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import asyncpg

from compare.findings import Chunk, Divergence, Recheck
from compare.statements import CompareSql
from dualwrite.keysync import keys_payload
from dualwrite.mapping import CompiledMapping


class SameDatabaseDiffer:
    """Compares a mapping whose target is in the source's database."""

    method = "same_database"
    recheck_delay = 0.0

    def __init__(
        self,
        mapping: CompiledMapping,
        conn: asyncpg.Connection,
        chunk_rows: int,
        tenant: str | None = None,
    ) -> None:
        self.sql = CompareSql(mapping)
        self.conn = conn
        self.chunk_rows = chunk_rows
        self.tenant = tenant

    async def chunk(self, after: str | None) -> Chunk:
        statement = self.sql.chunk(after, self.chunk_rows, self.tenant)
        row = await self.conn.fetchrow(statement.sql, *statement.args)
        assert row is not None
        diffs = _divergences(row)
        extra = sum(1 for d, _ in diffs if d.cls == "extra")
        return Chunk(
            upto=row["hi"],
            compared=int(row["expected_rows"]) + extra,
            suspects=[d.key for d, pending in diffs if not pending],
            pending=sum(1 for _, pending in diffs if pending),
        )

    async def recheck(self, keys: Sequence[str]) -> Recheck:
        statement = self.sql.recheck(keys_payload(keys))
        row = await self.conn.fetchrow(statement.sql, *statement.args)
        assert row is not None
        diffs = _divergences(row)
        confirmed = [d for d, pending in diffs if not pending]
        return Recheck(confirmed, len(diffs) - len(confirmed), len(set(keys)) - len(diffs))


def _divergences(row: asyncpg.Record) -> list[tuple[Divergence, bool]]:
    """The divergent keys a diff statement described, each with whether it is pending."""
    if row["keys"] is None:
        return []
    described = zip(
        row["keys"],
        row["classes"],
        row["columns"],
        row["tenants"],
        row["pending"],
        row["expected"],
        row["actual"],
        strict=True,
    )
    return [
        (
            Divergence(
                key, cls, tuple(json.loads(columns) if columns else ()), tenant, expected, actual
            ),
            bool(pending),
        )
        for key, cls, columns, tenant, pending, expected, actual in described
    ]
