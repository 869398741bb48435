"""What a pass found: divergences (classified, redacted) and the tally of one mapping's pass."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

CLASSES = ("missing", "extra", "changed")


@dataclass(frozen=True)
class Divergence:
    """One divergent key, confirmed by a re-check."""

    #: the key as jsonb text (``[1]``, ``[7, "eu"]``), what sync_keys and the outbox use
    key: str
    #: missing (expected, not in target), extra (in target, not expected), changed
    cls: str
    #: target columns that differ (changed rows only)
    columns: tuple[str, ...] = ()
    tenant: str | None = None
    #: the expected and actual rows as jsonb text, only reveal_columns' values shown
    expected: str | None = None
    actual: str | None = None


@dataclass(frozen=True)
class Recheck:
    """The outcome of re-checking suspect keys with fresh reads."""

    confirmed: list[Divergence]
    #: keys that still differ but wait in the outbox (or changed meanwhile)
    pending: int
    #: keys that agree now (a write landed between the first look and the re-check)
    resolved: int
    #: keys that still differ and sit in the dead letters
    dead_lettered: int = 0


@dataclass(frozen=True)
class Chunk:
    """One keyset chunk compared."""

    #: the last key the chunk covers (jsonb text); None: it reached the end of both sides
    upto: str | None
    compared: int
    #: keys that differed and were not pending: re-checked before they count
    suspects: list[str]
    pending: int
    #: keys that differed and sit in the dead letters: stuck, not in flight
    dead_lettered: int = 0


@dataclass
class Tally:
    """Counts of one pass over one mapping, and which divergences to keep as samples."""

    max_samples: int
    compared: int = 0
    pending: int = 0
    #: divergent keys in the dead letters: the mirror gave up on them for now, so a pass
    #: that meets one is not clean (they are not counted as missing/extra/changed)
    dead_lettered: int = 0
    resolved: int = 0
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0))
    by_tenant: dict[str, dict[str, int]] = field(default_factory=dict)
    by_column: dict[str, int] = field(default_factory=dict)

    def add(self, divergence: Divergence) -> bool:
        """Count a confirmed divergence; True when it is to be kept as a sample."""
        self.counts[divergence.cls] += 1
        if divergence.tenant is not None:
            per = self.by_tenant.setdefault(divergence.tenant, dict.fromkeys(CLASSES, 0))
            per[divergence.cls] += 1
        for column in divergence.columns:
            self.by_column[column] = self.by_column.get(column, 0) + 1
        return self.counts[divergence.cls] <= self.max_samples

    @property
    def divergent(self) -> int:
        return sum(self.counts.values())

    @property
    def clean(self) -> bool:
        return self.divergent == 0 and self.dead_lettered == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            **self.counts,
            "pending": self.pending,
            "dead_lettered": self.dead_lettered,
            "by_tenant": self.by_tenant,
            "by_column": self.by_column,
        }


async def in_order(
    chunk: Callable[[str | None], Awaitable[Chunk]], after: str | None
) -> AsyncGenerator[Chunk, None]:
    """Chunks one after the other from ``after`` until the last (``upto`` None)."""
    while True:
        found = await chunk(after)
        yield found
        if found.upto is None:
            return
        after = found.upto
