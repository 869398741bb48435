"""The reconciler's SQL: chunk diffs, re-checks and chunk hashes, composed from the row sources.

compare/rows.py supplies the row sources (expected rows from the source, actual rows from the
target, by key range or key set); this module adds what only comparing needs: the FULL JOIN
with ``IS DISTINCT FROM`` on normalised values, classification, redaction, the outbox check
and the per-chunk hashes used across databases. Every statement is a single SELECT, so it runs
in one snapshot whatever the session's isolation level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compare.rows import (
    column_aliases,
    key_aliases,
    key_bound_sql,
    keys_sql,
    source_rows_sql,
    target_rows_sql,
)
from compare.tolerance import ColumnForm, column_forms
from core.mapping import CompiledMapping
from core.sqltext import quote_ident, quote_literal

#: what a column outside ``compare.reveal_columns`` shows in findings
REDACTED = "<redacted>"
#: jsonb_build_object takes at most 100 arguments; objects are built in slices of this many pairs
_PAIRS_PER_CALL = 40
_IN = quote_ident("__dw_in")
_SIDES = ("source", "target")


def _joined(side: str, alias: str) -> str:
    """The name a value of side ``e`` (expected) or ``a`` (actual) has in the joined rows:
    ``"__c1"`` of ``e`` is ``"e__c1"``."""
    return quote_ident(side + alias.strip('"'))


def _in_join(side: str) -> Callable[[str], str]:
    """A reference maker for one side's values in the joined rows ``d``."""
    return lambda alias: f"d.{_joined(side, alias)}"


@dataclass
class Params:
    """Positional parameters of one statement, numbered as they are added."""

    values: list[Any] = field(default_factory=list)

    def add(self, value: Any, sql_type: str) -> str:
        self.values.append(value)
        return f"${len(self.values)}::{sql_type}"


@dataclass(frozen=True)
class Statement:
    sql: str
    args: tuple[Any, ...]


class CompareSql:
    """Builds the reconciler's statements for one bound mapping."""

    def __init__(self, mapping: CompiledMapping) -> None:
        _, _, catalog = mapping.binding()
        self.mapping = mapping
        self.forms: list[ColumnForm] = column_forms(
            mapping.columns, catalog.target_types, mapping.config.compare.tolerances
        )
        self.keys = key_aliases(mapping)
        self.values = column_aliases(mapping)
        self.revealed = frozenset(mapping.config.compare.reveal_columns)
        tenant = mapping.config.tenant_column
        self.tenant_value = None if tenant is None else self.values[mapping.columns.index(tenant)]

    # --- same database --------------------------------------------------------------------

    def chunk(self, after: str | None, limit: int, tenant: str | None) -> Statement:
        """The diff of the next keyset chunk after ``after`` (None: from the start).

        The chunk ends at the smaller of the two sides' ``limit``-th keys (a walk of each key
        index), or, when neither side has that many rows left, at the last key of both: never
        more than ``limit`` rows per side. Both sides are then read by key range and joined
        in key order; one row comes back (see :meth:`_diff`).
        """
        p = Params()
        bound = None if after is None else p.add(after, "jsonb")
        ctes, who = self._bound_ctes(p, bound, limit, tenant)
        m = self.mapping
        k = ", ".join(self.keys)
        upto = "(" + ", ".join(f"(SELECT {c} FROM bound)" for c in self.keys) + ")"
        expected = source_rows_sql(m, after=bound, upto_row=upto, tenant=who)
        actual = target_rows_sql(m, after=bound, upto_row=upto, tenant=who)
        hi = f"(SELECT jsonb_build_array({k})::text FROM hi)"
        return Statement(self._diff(expected, actual, ctes, hi), tuple(p.values))

    def chunk_bound(self, after: str | None, limit: int, tenant: str | None) -> Statement:
        """Where the chunk :meth:`chunk` would compare ends, without comparing it.

        Returns ``upto`` (the chunk's last key as jsonb text; NULL when no row is left) and
        ``hi`` (the same, or NULL when this is the last chunk), so that chunks can be handed
        to several sessions with :meth:`chunk_between` while the bounds are walked in order.
        """
        p = Params()
        bound = None if after is None else p.add(after, "jsonb")
        ctes, _ = self._bound_ctes(p, bound, limit, tenant)
        k = ", ".join(self.keys)
        sql = (
            f"WITH {ctes} SELECT (SELECT jsonb_build_array({k})::text FROM bound) AS upto, "
            f"(SELECT jsonb_build_array({k})::text FROM hi) AS hi"
        )
        return Statement(sql, tuple(p.values))

    def chunk_between(
        self, after: str | None, upto: str, hi: str | None, tenant: str | None
    ) -> Statement:
        """The diff of the chunk (``after``, ``upto``] found by :meth:`chunk_bound`; the row
        it returns is the one :meth:`chunk` returns for that chunk (``hi`` passed through)."""
        p = Params()
        bound = None if after is None else p.add(after, "jsonb")
        end = p.add(upto, "jsonb")
        who = None if tenant is None else p.add(tenant, "text")
        m = self.mapping
        expected = source_rows_sql(m, after=bound, upto=end, tenant=who)
        actual = target_rows_sql(m, after=bound, upto=end, tenant=who)
        return Statement(self._diff(expected, actual, None, p.add(hi, "text")), tuple(p.values))

    def _bound_ctes(
        self, p: Params, bound: str | None, limit: int, tenant: str | None
    ) -> tuple[str, str | None]:
        """CTEs ``hi`` (the smaller ``limit``-th key of the two sides), ``last`` (the greater
        last key) and ``bound`` (hi, or last when neither side has ``limit`` rows left)."""
        skip = p.add(limit - 1, "integer")
        who = None if tenant is None else p.add(tenant, "text")
        m = self.mapping
        k = ", ".join(self.keys)
        desc = ", ".join(f"{c} DESC" for c in self.keys)
        nth = [f"({keys_sql(m, s, after=bound, offset=skip, tenant=who)})" for s in _SIDES]
        last = [f"({keys_sql(m, s, after=bound, last=True, tenant=who)})" for s in _SIDES]
        ctes = (
            f"hi AS (SELECT {k} FROM ({' UNION ALL '.join(nth)}) AS b ORDER BY {k} LIMIT 1), "
            f"last AS (SELECT {k} FROM ({' UNION ALL '.join(last)}) AS b "
            f"ORDER BY {desc} LIMIT 1), "
            f"bound AS (SELECT {k} FROM hi UNION ALL "
            f"(SELECT {k} FROM last WHERE NOT EXISTS (SELECT FROM hi)))"
        )
        return ctes, who

    def recheck(self, keys: str) -> Statement:
        """The same diff as :meth:`chunk` for a key set (a jsonb array of keys), fresh snapshot."""
        p = Params()
        param = p.add(keys, "jsonb")
        m = self.mapping
        expected = source_rows_sql(m, keys=param)
        actual = target_rows_sql(m, keys=param)
        return Statement(self._diff(expected, actual, None, "NULL::text"), tuple(p.values))

    def _diff(self, expected: str, actual: str, ctes: str | None, hi_sql: str) -> str:
        """One row: rows on each side, the chunk's end, and parallel arrays describing each
        divergent key (key, class, columns as a JSON array, tenant, pending, dead-lettered,
        both rows).

        The join is projected once (OFFSET 0 keeps it a subquery) and the descriptions are
        computed only for divergent rows (aggregate FILTER), so a clean chunk costs the join.
        """
        on = " AND ".join(f"e.{c} = a.{c}" for c in self.keys)
        e_norm = ", ".join(self._each("e", ColumnForm.normalised))
        a_norm = ", ".join(self._each("a", ColumnForm.normalised))
        first = self.keys[0]
        carried = ", ".join(
            f"{side}.{c} AS {_joined(side, c)}"
            for side in ("e", "a")
            for c in (*self.keys, *self.values)
        )
        joined = (
            f"SELECT {carried}, (e.{first} IS NULL OR a.{first} IS NULL OR "
            f"ROW({e_norm}) IS DISTINCT FROM ROW({a_norm})) AS __div "
            f"FROM (SELECT * FROM ({expected}) AS s WHERE {_IN}) AS e "
            f"FULL JOIN ({actual}) AS a ON {on} OFFSET 0"
        )
        e, a = _in_join("e"), _in_join("a")
        key = "jsonb_build_array(" + ", ".join(f"coalesce({e(c)}, {a(c)})" for c in self.keys) + ")"
        has_e, has_a = f"{e(first)} IS NOT NULL", f"{a(first)} IS NOT NULL"
        described = {
            "keys": f"{key}::text",
            "classes": f"CASE WHEN NOT {has_e} THEN 'extra' WHEN NOT {has_a} THEN 'missing' "
            "ELSE 'changed' END",
            "columns": f"CASE WHEN {has_e} AND {has_a} THEN {self._changed_columns()} END",
            "tenants": self._tenant_sql(),
            "pending": self._queued_sql(key, "outbox"),
            "dead": self._queued_sql(key, "dead_letters"),
            "expected": f"CASE WHEN {has_e} THEN ({self._shown(e)})::text END",
            "actual": f"CASE WHEN {has_a} THEN ({self._shown(a)})::text END",
        }
        arrays = ", ".join(
            f"array_agg({sql}) FILTER (WHERE d.__div) AS {name}" for name, sql in described.items()
        )
        with_ = f"WITH {ctes} " if ctes else ""
        return (
            f"{with_}SELECT count({e(first)}) AS expected_rows, "
            f"count({a(first)}) AS actual_rows, {hi_sql} AS hi, {arrays} "
            f"FROM ({joined}) AS d"
        )

    def _changed_columns(self) -> str:
        """The names of the columns that differ, as a JSON array text."""
        e, a = _in_join("e"), _in_join("a")
        checks = ", ".join(
            f"CASE WHEN {f.normalised(e(v))} IS DISTINCT FROM {f.normalised(a(v))} "
            f"THEN {quote_literal(c)} END"
            for f, v, c in zip(self.forms, self.values, self.mapping.columns, strict=True)
        )
        return f"array_to_json(array_remove(ARRAY[{checks}]::text[], NULL))::text"

    def _tenant_sql(self) -> str:
        if self.tenant_value is None:
            return "NULL::text"
        value = self.tenant_value
        return f"coalesce({_in_join('e')(value)}, {_in_join('a')(value)})::text"

    def _queued_sql(self, key: str, table: str) -> str:
        """Whether the key is in ``dualwrite.<table>`` (outbox: pending; dead_letters: stuck),
        in this snapshot."""
        name = quote_literal(self.mapping.name)
        return f"({key} IN (SELECT q.key FROM dualwrite.{table} q WHERE q.mapping = {name}))"

    def _shown(self, ref: Callable[[str], str]) -> str:
        """A row as jsonb: values of revealed columns, ``REDACTED`` for every other column.

        ``ref`` turns a value's alias (``"__c1"``) into a reference to it.
        """
        pairs = [
            f"{quote_literal(c)}, "
            + (ref(v) if c in self.revealed else f"{quote_literal(REDACTED)}::text")
            for c, v in zip(self.mapping.columns, self.values, strict=True)
        ]
        calls = [
            "jsonb_build_object(" + ", ".join(pairs[i : i + _PAIRS_PER_CALL]) + ")"
            for i in range(0, len(pairs), _PAIRS_PER_CALL)
        ]
        return " || ".join(calls)

    # --- across databases -------------------------------------------------------------------

    def side_summary(
        self,
        side: str,
        after: str | None,
        upto: str | None,
        limit: int | None,
        tenant: str | None,
    ) -> Statement:
        """One side's chunk: rows scanned, last key scanned, included rows and their hash.

        ``side`` is 'source' or 'target'. The hash is the md5 of the rows' canonical bytes in
        the order the materialised, key-ordered ``r`` is scanned (no second sort for the
        aggregate). Should the two servers order keys differently (collations), chunks only
        look different and are compared row by row, never wrongly equal.
        """
        p = Params()
        rows = self._rows(side, p, after=after, upto=upto, limit=limit, tenant=tenant)
        k = ", ".join(self.keys)
        desc = ", ".join(f"{c} DESC" for c in self.keys)
        sql = (
            f"WITH r AS MATERIALIZED ({rows}) SELECT count(*) AS scanned, "
            f"(SELECT jsonb_build_array({k})::text FROM "
            f"(SELECT {k} FROM r ORDER BY {desc} LIMIT 1) AS l) AS last, "
            f"count(*) FILTER (WHERE {_IN}) AS rows, "
            f"coalesce(md5(string_agg({self._row_bytes('r')}, ''::bytea) "
            f"FILTER (WHERE {_IN})), '') AS hash FROM r"
        )
        return Statement(sql, tuple(p.values))

    def side_row_hashes(
        self, side: str, after: str | None, upto: str | None, tenant: str | None
    ) -> Statement:
        """(key, row hash) of every included row of one side in (``after``, ``upto``]."""
        p = Params()
        rows = self._rows(side, p, after=after, upto=upto, limit=None, tenant=tenant)
        k = ", ".join(f"r.{c}" for c in self.keys)
        sql = (
            f"SELECT jsonb_build_array({k})::text AS key, md5({self._row_text('r')}) AS h "
            f"FROM ({rows}) AS r WHERE r.{_IN}"
        )
        return Statement(sql, tuple(p.values))

    def side_details(self, side: str, keys: str) -> Statement:
        """Per key: row hash, per-column hashes, tenant and the redacted row (one side)."""
        p = Params()
        rows = self._rows(side, p, keys=p.add(keys, "jsonb"))
        k = ", ".join(f"r.{c}" for c in self.keys)
        columns = ", ".join(f"md5({t})" for t in self._each("r", ColumnForm.canonical_text))
        tenant = "NULL::text" if self.tenant_value is None else f"r.{self.tenant_value}::text"
        sql = (
            f"SELECT jsonb_build_array({k})::text AS key, md5({self._row_text('r')}) AS h, "
            f"ARRAY[{columns}]::text[] AS column_hashes, {tenant} AS tenant, "
            f"({self._shown(lambda v: f'r.{v}')})::text AS shown FROM ({rows}) AS r "
            f"WHERE r.{_IN}"
        )
        return Statement(sql, tuple(p.values))

    def pending_keys(self, keys: str) -> Statement:
        """Which of these keys wait in the outbox or the dead letters (run in the source db):
        rows (key, dead), ``dead`` true for a dead-lettered key."""
        dead = self._queued_sql("value", "dead_letters")
        sql = (
            f"SELECT value::text AS key, {dead} AS dead FROM jsonb_array_elements($1::jsonb) "
            f"WHERE {self._queued_sql('value', 'outbox')} OR {dead}"
        )
        return Statement(sql, (keys,))

    def key_at_or_before(self, a: str, b: str) -> Statement:
        """Whether key ``a`` sorts at or before key ``b`` (in the connection's collation)."""
        first = key_bound_sql(self.mapping, "$1::jsonb")
        second = key_bound_sql(self.mapping, "$2::jsonb")
        return Statement(f"SELECT {first} <= {second}", (a, b))

    def _rows(
        self,
        side: str,
        p: Params,
        *,
        after: str | None = None,
        upto: str | None = None,
        limit: int | None = None,
        keys: str | None = None,
        tenant: str | None = None,
    ) -> str:
        kwargs = {
            "after": None if after is None else p.add(after, "jsonb"),
            "upto": None if upto is None else p.add(upto, "jsonb"),
            "limit": None if limit is None else p.add(limit, "integer"),
            "keys": keys,
            "tenant": None if tenant is None else p.add(tenant, "text"),
        }
        if side == "source":
            return source_rows_sql(self.mapping, **kwargs)
        return target_rows_sql(self.mapping, **kwargs)

    def _row_bytes(self, alias: str) -> str:
        return " || ".join(self._each(alias, ColumnForm.canonical_bytes))

    def _row_text(self, alias: str) -> str:
        return f"ROW({', '.join(self._each(alias, ColumnForm.canonical_text))})::text"

    def _each(self, alias: str, form: Callable[[ColumnForm, str], str]) -> list[str]:
        """``form`` applied to every column value of the row ``alias``."""
        return [form(f, f"{alias}.{v}") for f, v in zip(self.forms, self.values, strict=True)]
