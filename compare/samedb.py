"""The same-database differ: one statement per keyset chunk, exact in a single snapshot.

Source, target and outbox are read in the same snapshot, so a key whose mirror is still queued
is seen as pending, never as divergent, and a key in the dead letters as dead-lettered (stuck,
which keeps the pass from being clean); a divergent key is re-checked once in a fresh
snapshot before it counts.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncGenerator, Sequence

import asyncpg

from compare.findings import Chunk, Divergence, Recheck, in_order
from compare.statements import CompareSql
from core.mapping import CompiledMapping
from mirror.keysync import keys_payload

PENDING, DEAD_LETTERED = "pending", "dead_lettered"


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
        readers: Sequence[asyncpg.Connection] = (),
    ) -> None:
        self.sql = CompareSql(mapping)
        self.conn = conn
        self.chunk_rows = chunk_rows
        self.tenant = tenant
        #: sessions that compare chunks side by side (reconcile.workers); none: one at a time
        self.readers = list(readers)

    async def chunk(self, after: str | None) -> Chunk:
        statement = self.sql.chunk(after, self.chunk_rows, self.tenant)
        row = await self.conn.fetchrow(statement.sql, *statement.args)
        assert row is not None
        return _chunk_of(row)

    async def chunks(self, after: str | None) -> AsyncGenerator[Chunk, None]:
        """Every chunk after ``after``, in key order.

        With ``readers`` the chunk bounds are walked in order on ``conn`` (an index walk, a
        fraction of a chunk's cost) and each chunk is compared on a free reader, up to one
        chunk per reader in flight. Results are yielded in key order, so the caller's
        checkpoints mean what they mean with one session. Each chunk is still one statement,
        one snapshot. ``conn`` is never in use while the generator waits at a yield, so the
        caller may use it (for re-checks) between chunks.
        """
        if not self.readers:
            async for chunk in in_order(self.chunk, after):
                yield chunk
            return
        free: deque[asyncpg.Connection] = deque(self.readers)
        flight: deque[tuple[asyncpg.Connection, asyncio.Task[Chunk]]] = deque()
        walked = False  # every bound has been found
        try:
            while True:
                while free and not walked:
                    bound = self.sql.chunk_bound(after, self.chunk_rows, self.tenant)
                    row = await self.conn.fetchrow(bound.sql, *bound.args)
                    assert row is not None
                    upto, hi = row["upto"], row["hi"]
                    if upto is None:  # no row after ``after``: the pass ends with an empty chunk
                        walked = True
                        break
                    walked = hi is None
                    reader = free.popleft()
                    flight.append(
                        (reader, asyncio.ensure_future(self._between(reader, after, upto, hi)))
                    )
                    after = upto
                if not flight:
                    yield Chunk(None, 0, [], 0)
                    return
                reader, task = flight.popleft()
                chunk = await task
                free.append(reader)
                yield chunk
                if chunk.upto is None:
                    return
        finally:
            for _, task in flight:
                task.cancel()
            await asyncio.gather(*(task for _, task in flight), return_exceptions=True)

    async def _between(
        self, reader: asyncpg.Connection, after: str | None, upto: str, hi: str | None
    ) -> Chunk:
        statement = self.sql.chunk_between(after, upto, hi, self.tenant)
        row = await reader.fetchrow(statement.sql, *statement.args)
        assert row is not None
        return _chunk_of(row)

    async def recheck(self, keys: Sequence[str]) -> Recheck:
        statement = self.sql.recheck(keys_payload(keys))
        row = await self.conn.fetchrow(statement.sql, *statement.args)
        assert row is not None
        diffs = _divergences(row)
        confirmed = [d for d, state in diffs if state is None]
        dead = sum(1 for _, state in diffs if state == DEAD_LETTERED)
        return Recheck(
            confirmed, len(diffs) - len(confirmed) - dead, len(set(keys)) - len(diffs), dead
        )


def _chunk_of(row: asyncpg.Record) -> Chunk:
    """The Chunk a diff statement's row describes."""
    diffs = _divergences(row)
    extra = sum(1 for d, _ in diffs if d.cls == "extra")
    return Chunk(
        upto=row["hi"],
        compared=int(row["expected_rows"]) + extra,
        suspects=[d.key for d, state in diffs if state is None],
        pending=sum(1 for _, state in diffs if state == PENDING),
        dead_lettered=sum(1 for _, state in diffs if state == DEAD_LETTERED),
    )


def _divergences(row: asyncpg.Record) -> list[tuple[Divergence, str | None]]:
    """The divergent keys a diff statement described, each with its queue state: PENDING
    (in the outbox), DEAD_LETTERED (in the dead letters, whether or not also queued again)
    or None (neither: a suspect)."""
    if row["keys"] is None:
        return []
    described = zip(
        row["keys"],
        row["classes"],
        row["columns"],
        row["tenants"],
        row["pending"],
        row["dead"],
        row["expected"],
        row["actual"],
        strict=True,
    )
    return [
        (
            Divergence(
                key, cls, tuple(json.loads(columns) if columns else ()), tenant, expected, actual
            ),
            DEAD_LETTERED if dead else PENDING if pending else None,
        )
        for key, cls, columns, tenant, pending, dead, expected, actual in described
    ]
