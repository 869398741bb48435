"""Comparing one replay's answers: the original twice (A/A) and the new side once (B).

Two answers are the same when their columns (names and types), their errors (SQLSTATE) and
their rows agree: as a multiset, or in order when the statement has ORDER BY. The A/A pair is
the noise baseline: a statement that answers differently to itself in one snapshot (random(),
clock_timestamp(), LIMIT without ORDER BY) cannot be judged, so an A/B difference there is
*noise*, not a mismatch.

:func:`tenants_of` attributes a judged replay to tenants (when a mapping has a
``tenant_column``): a row mismatch to the tenants of the rows that differ, any other outcome to
the tenants of the rows answered, found in a result column named like a tenant column; failing
that, to the tenant the statement's WHERE names (``tenant = constant or parameter``, found by
the planner); failing that, to no tenant.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from proxy.shadow.plan import ShadowPlan

#: what a value outside ``shadow.reveal_columns`` shows in a sample
REDACTED: Final = "<redacted>"
#: read_only_sql_transaction: the READ ONLY replay refused a write
READ_ONLY_REFUSED: Final = "25006"

MATCH, MISMATCH, NOISE, ERROR, UNSAFE = "match", "mismatch", "noise", "error", "unsafe"


@dataclass(frozen=True)
class Answer:
    """What one run of a statement answered."""

    #: (name, type name) per result column
    columns: tuple[tuple[str, str], ...] = ()
    rows: tuple[tuple[Any, ...], ...] = ()
    #: the SQLSTATE when the statement failed
    sqlstate: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Verdict:
    outcome: str
    #: what differed, values redacted (None: nothing to show)
    diff: dict[str, Any] | None = None
    #: the tenants it is attributed to (None: not attributed, no mapping has a tenant_column)
    tenants: tuple[str, ...] | None = None


def judge(
    plan: ShadowPlan, first: Answer, new: Answer, again: Answer, reveal: frozenset[str]
) -> Verdict:
    """Classify one replay: the original (first and again) against the new side."""
    if first.sqlstate == READ_ONLY_REFUSED:
        return Verdict(UNSAFE, {"sqlstate": first.sqlstate})
    if first.sqlstate is not None and new.sqlstate is None:
        return Verdict(ERROR, {"old_sqlstate": first.sqlstate})
    diff = difference(first, new, ordered=plan.ordered, reveal=reveal)
    if diff is None:
        return Verdict(MATCH)
    if not plan.deterministic or difference(first, again, ordered=plan.ordered) is not None:
        return Verdict(NOISE, diff)
    return Verdict(MISMATCH, diff)


def tenants_of(
    outcome: str,
    first: Answer,
    new: Answer,
    columns: frozenset[str],
    named: str | None,
    limit: int,
) -> tuple[str, ...]:
    """The tenants a replay is attributed to (the module docstring's rule), at most ``limit``;
    ``named`` is the tenant the statement's WHERE names, if any."""
    found: dict[str, None] = {}
    index = _tenant_index(first.columns, columns)
    if index is not None:
        rows: Iterable[tuple[Any, ...]] = first.rows
        if outcome == MISMATCH and first.columns == new.columns:
            old_rows = Counter(map(_frozen, first.rows))
            new_rows = Counter(map(_frozen, new.rows))
            differing = (old_rows - new_rows) + (new_rows - old_rows)
            # the same rows in another order (or an error) differ nowhere in particular
            rows = list(differing) or [*first.rows, *new.rows]
        for row in rows:
            value = row[index]
            if value is not None:
                found[str(value)] = None
                if len(found) >= limit:
                    break
    if not found and named is not None:
        found[named] = None
    return tuple(found)


def _tenant_index(
    columns: Sequence[tuple[str, str]], tenant_columns: frozenset[str]
) -> int | None:
    for index, (name, _) in enumerate(columns):
        if name in tenant_columns:
            return index
    return None


def difference(
    old: Answer, new: Answer, *, ordered: bool, reveal: frozenset[str] = frozenset()
) -> dict[str, Any] | None:
    """None when the answers are the same, else what differs (values redacted)."""
    if old.sqlstate != new.sqlstate:
        return {"old_sqlstate": old.sqlstate, "new_sqlstate": new.sqlstate}
    if old.columns != new.columns:
        return {"old_columns": _columns(old.columns), "new_columns": _columns(new.columns)}
    if ordered and old.rows == new.rows:
        return None
    old_rows, new_rows = Counter(map(_frozen, old.rows)), Counter(map(_frozen, new.rows))
    if old_rows == new_rows:
        return None if not ordered else {"order": "the same rows in another order"}
    names = [name for name, _ in old.columns]
    return {
        "old_rows": len(old.rows),
        "new_rows": len(new.rows),
        "only_old": [_redact(names, row, reveal) for row in _first(old_rows - new_rows)],
        "only_new": [_redact(names, row, reveal) for row in _first(new_rows - old_rows)],
    }


def _columns(columns: Iterable[tuple[str, str]]) -> list[str]:
    return [f"{name} {kind}" for name, kind in columns]


def _first(rows: Counter[tuple[Any, ...]], limit: int = 3) -> list[tuple[Any, ...]]:
    return list(rows.elements())[:limit]


def _redact(names: Sequence[str], row: tuple[Any, ...], reveal: frozenset[str]) -> dict[str, Any]:
    return {
        name: (_json_value(value) if name in reveal else REDACTED)
        for name, value in zip(names, row, strict=False)
    }


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _frozen(row: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(_hashable(value) for value in row)


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, dict):
        return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
