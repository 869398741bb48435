"""Repair: ``sync_keys`` on the divergent keys a pass confirmed, recorded in dualwrite.repairs.

Each batch is recorded (who, when, why, which keys, divergent before and after) with each
row's image in the target before and after, redacted to ``reveal_columns`` like the findings:
before is what the re-check read, after is what the re-check after the repair read for a key
still divergent, else the expected row (the target now equals it). A dry run writes nothing
to the target, prints the plan and records it, the after-images being what it would write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg

from compare.connections import Sessions
from compare.findings import Divergence, Recheck
from compare.recording import RepairRecord, RowImage, record_repair
from compare.resync import MAX_KEYS_PER_TRANSACTION, apply_keys
from core import metrics
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error
from mirror.keysync import SyncResult

_log = get_logger("repair")

#: what sync_keys does to a key of each class
ACTIONS = {"missing": "insert", "extra": "delete", "changed": "update"}
#: dry-run lines printed per mapping before the rest is only counted
DRY_RUN_LINES = 50


@dataclass
class RepairTally:
    repaired: int = 0
    upserted: int = 0
    deleted: int = 0
    #: keys still divergent after their repair (a dry run writes nothing and leaves this 0)
    remaining: int = 0
    planned: int = 0


class Repairer:
    """Repairs (or plans) batches of confirmed divergences of one mapping."""

    def __init__(
        self,
        mapping: CompiledMapping,
        sessions: Sessions,
        recheck: Callable[[Sequence[str]], Awaitable[Recheck]],
        *,
        run_id: int,
        requested_by: str,
        dry_run: bool,
        lock_timeout_ms: int,
        reason: str | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.mapping = mapping
        self.sessions = sessions
        self.recheck = recheck
        self.run_id = run_id
        self.requested_by = requested_by
        self.dry_run = dry_run
        self.lock_timeout_ms = lock_timeout_ms
        self.reason = reason or f"divergent rows confirmed by reconcile pass #{run_id}"
        self.say = say
        self.tally = RepairTally()

    async def repair(self, divergences: Sequence[Divergence]) -> None:
        for start in range(0, len(divergences), MAX_KEYS_PER_TRANSACTION):
            batch = divergences[start : start + MAX_KEYS_PER_TRANSACTION]
            if self.dry_run:
                await self._plan(batch)
            else:
                await self._apply(batch)

    async def _apply(self, batch: Sequence[Divergence]) -> None:
        keys = [d.key for d in batch]
        result = await self._sync(keys)
        still = {d.key: d for d in (await self.recheck(keys)).confirmed}
        remaining = len(still)
        images = [
            RowImage(
                d.key,
                d.cls,
                d.actual,
                still[d.key].actual if d.key in still else d.expected,
                d.tenant,
            )
            for d in batch
        ]
        self.tally.repaired += len(keys) - remaining
        self.tally.upserted += result.upserted
        self.tally.deleted += result.deleted
        self.tally.remaining += remaining
        metrics.RECONCILE_REPAIRED_ROWS.labels(self.mapping.name, "upserted").inc(result.upserted)
        metrics.RECONCILE_REPAIRED_ROWS.labels(self.mapping.name, "deleted").inc(result.deleted)
        _log.info(
            "repaired",
            mapping=self.mapping.name,
            keys=len(keys),
            upserted=result.upserted,
            deleted=result.deleted,
            remaining=remaining,
        )
        await self._record(keys, remaining, result.upserted, result.deleted, images)

    async def _sync(self, keys: Sequence[str]) -> SyncResult:
        """sync_keys on the batch; if the target rejects it, key by key (the rejected keys
        stay divergent and are counted as remaining, the others are repaired)."""
        try:
            return await self._sync_batch(keys)
        except asyncpg.PostgresError as exc:
            if len(keys) == 1:
                self._rejected(keys[0], exc)
                return SyncResult(0, 0)
        total = SyncResult(0, 0)
        for key in keys:
            try:
                total = total + await self._sync_batch([key])
            except asyncpg.PostgresError as exc:
                self._rejected(key, exc)
        return total

    def _rejected(self, key: str, exc: asyncpg.PostgresError) -> None:
        _log.warning(
            "repair_rejected",
            mapping=self.mapping.name,
            key=key,
            sqlstate=getattr(exc, "sqlstate", None),
            error=describe_error(exc, self.mapping)[:500],
        )

    async def _sync_batch(self, keys: Sequence[str]) -> SyncResult:
        return await apply_keys(
            self.sessions, self.mapping, keys, lock_timeout_ms=self.lock_timeout_ms
        )

    async def _plan(self, batch: Sequence[Divergence]) -> None:
        for divergence in batch:
            if self.say is not None and self.tally.planned < DRY_RUN_LINES:
                self.say(self._plan_line(divergence))
            self.tally.planned += 1
        upserts = sum(1 for d in batch if d.cls != "extra")
        images = [RowImage(d.key, d.cls, d.actual, d.expected, d.tenant) for d in batch]
        await self._record([d.key for d in batch], None, upserts, len(batch) - upserts, images)

    def _plan_line(self, divergence: Divergence) -> str:
        what = f"{self.mapping.name} {divergence.key}: {divergence.cls}"
        if divergence.columns:
            what += f" ({', '.join(divergence.columns)})"
        return f"would {ACTIONS[divergence.cls]} {self.mapping.target} row: {what}"

    async def _record(
        self,
        keys: Sequence[str],
        remaining: int | None,
        upserted: int,
        deleted: int,
        images: Sequence[RowImage],
    ) -> None:
        await record_repair(
            self.sessions.control,
            self.run_id,
            RepairRecord(
                mapping=self.mapping.name,
                requested_by=self.requested_by,
                dry_run=self.dry_run,
                keys=keys,
                divergent_before=len(keys),
                divergent_after=remaining,
                upserted=upserted,
                deleted=deleted,
                reason=self.reason,
                images=images,
            ),
        )

    def finish(self) -> None:
        """Print how many planned changes the dry-run lines did not show."""
        hidden = self.tally.planned - DRY_RUN_LINES
        if self.dry_run and self.say is not None and hidden > 0:
            self.say(f"... and {hidden} more changes to {self.mapping.target}")
