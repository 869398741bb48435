"""The cross-database differ: chunk hashes on each server, row hashes only where they differ.

A divergent key is re-checked after the mirror's lag (``reconcile.recheck_delay_seconds``)
before it counts; keys queued in the outbox are pending, keys in the dead letters are
dead-lettered (stuck: the pass is not clean).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import asyncpg

from compare.findings import Chunk, Divergence, Recheck, in_order
from compare.statements import CompareSql, Statement
from core.mapping import CompiledMapping
from mirror.keysync import keys_payload


@dataclass(frozen=True)
class _Side:
    """One side's view of a chunk."""

    scanned: int
    #: the last key scanned, when the side had more rows than the chunk holds
    end: str | None
    rows: int
    hash: str


@dataclass(frozen=True)
class _Row:
    hash: str
    column_hashes: tuple[str | None, ...]
    tenant: str | None
    shown: str


class CrossDatabaseDiffer:
    """Compares a mapping whose target lives in another database (``target_dsn``)."""

    method = "cross_database"

    def __init__(
        self,
        mapping: CompiledMapping,
        source: asyncpg.Connection,
        target: asyncpg.Connection,
        chunk_rows: int,
        tenant: str | None = None,
        recheck_delay: float = 5.0,
    ) -> None:
        self.sql = CompareSql(mapping)
        self.mapping = mapping
        self.source = source
        self.target = target
        self.chunk_rows = chunk_rows
        self.tenant = tenant
        self.recheck_delay = recheck_delay

    # --- finding ---------------------------------------------------------------------------

    async def chunk(self, after: str | None) -> Chunk:
        source, target = await asyncio.gather(
            self._summary("source", after, None), self._summary("target", after, None)
        )
        upto, source, target = await self._align(after, source, target)
        if source.rows == target.rows and source.hash == target.hash:
            return Chunk(upto, source.rows, [], 0)
        expected, actual = await asyncio.gather(
            self._row_hashes("source", after, upto), self._row_hashes("target", after, upto)
        )
        keys = expected.keys() | actual.keys()
        differing = sorted(k for k in keys if expected.get(k) != actual.get(k))
        queued = await self._queued(differing)
        suspects = [k for k in differing if k not in queued]
        dead = sum(1 for k in differing if queued.get(k))
        return Chunk(upto, len(keys), suspects, len(differing) - len(suspects) - dead, dead)

    def chunks(self, after: str | None) -> AsyncGenerator[Chunk, None]:
        """Every chunk after ``after``, one after the other (both servers already work at once)."""
        return in_order(self.chunk, after)

    async def _align(
        self, after: str | None, source: _Side, target: _Side
    ) -> tuple[str | None, _Side, _Side]:
        """End the chunk at the smaller of the two sides' ends; re-read the side that ran past."""
        if source.end == target.end:
            return source.end, source, target
        if source.end is None or target.end is None:
            upto = source.end or target.end
        else:
            upto = source.end if await self._at_or_before(source.end, target.end) else target.end
        if source.end != upto:
            source = await self._summary("source", after, upto)
        if target.end != upto:
            target = await self._summary("target", after, upto)
        return upto, source, target

    async def _summary(self, side: str, after: str | None, upto: str | None) -> _Side:
        limit = self.chunk_rows if upto is None else None
        statement = self.sql.side_summary(side, after, upto, limit, self.tenant)
        row = await self._conn(side).fetchrow(statement.sql, *statement.args)
        assert row is not None
        full = limit is not None and int(row["scanned"]) >= limit
        return _Side(
            int(row["scanned"]), row["last"] if full else None, int(row["rows"]), str(row["hash"])
        )

    async def _row_hashes(self, side: str, after: str | None, upto: str | None) -> dict[str, str]:
        statement = self.sql.side_row_hashes(side, after, upto, self.tenant)
        rows = await self._conn(side).fetch(statement.sql, *statement.args)
        return {r["key"]: r["h"] for r in rows}

    async def _at_or_before(self, a: str, b: str) -> bool:
        statement = self.sql.key_at_or_before(a, b)
        return bool(await self.target.fetchval(statement.sql, *statement.args))

    async def _queued(self, keys: Sequence[str]) -> dict[str, bool]:
        """The keys queued in the outbox or the dead letters: True for dead-lettered ones."""
        if not keys:
            return {}
        statement = self.sql.pending_keys(keys_payload(keys))
        return {
            r["key"]: bool(r["dead"])
            for r in await self.source.fetch(statement.sql, *statement.args)
        }

    def _conn(self, side: str) -> asyncpg.Connection:
        return self.source if side == "source" else self.target

    # --- re-checking -----------------------------------------------------------------------

    async def recheck(self, keys: Sequence[str]) -> Recheck:
        """Read the source, then the target, then the source again; a key counts only if the
        source did not change around the target read and it was not queued at either read."""
        before = await self._details("source", keys)
        queued = await self._queued(keys)
        actual = await self._details("target", keys)
        after = await self._details("source", keys)
        for key, dead in (await self._queued(keys)).items():
            queued[key] = queued.get(key, False) or dead
        confirmed: list[Divergence] = []
        pending = resolved = dead_lettered = 0
        for key in dict.fromkeys(keys):
            expected = before.get(key)
            if queued.get(key) and _hash(expected) != _hash(actual.get(key)):
                dead_lettered += 1
            elif key in queued or _hash(expected) != _hash(after.get(key)):
                pending += 1
            elif _hash(expected) == _hash(actual.get(key)):
                resolved += 1
            else:
                confirmed.append(self._classify(key, expected, actual.get(key)))
        return Recheck(confirmed, pending, resolved, dead_lettered)

    async def _details(self, side: str, keys: Sequence[str]) -> dict[str, _Row]:
        statement: Statement = self.sql.side_details(side, keys_payload(keys))
        rows = await self._conn(side).fetch(statement.sql, *statement.args)
        return {
            r["key"]: _Row(r["h"], tuple(r["column_hashes"]), r["tenant"], r["shown"]) for r in rows
        }

    def _classify(self, key: str, expected: _Row | None, actual: _Row | None) -> Divergence:
        if expected is None:
            assert actual is not None
            return Divergence(key, "extra", tenant=actual.tenant, actual=actual.shown)
        if actual is None:
            return Divergence(key, "missing", tenant=expected.tenant, expected=expected.shown)
        columns = tuple(
            column
            for column, e, a in zip(
                self.mapping.columns, expected.column_hashes, actual.column_hashes, strict=True
            )
            if e != a
        )
        return Divergence(key, "changed", columns, expected.tenant, expected.shown, actual.shown)


def _hash(row: _Row | None) -> str | None:
    return None if row is None else row.hash
