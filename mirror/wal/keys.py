"""Mapping keys of decoded WAL rows, computed by PostgreSQL from the compiled mapping.

A decoded row is a set of column values as text (the type output functions' text, which
pgoutput sends). The reader never evaluates a mapping expression itself: it sends the rows as
record literals of the source table's row type, PostgreSQL casts each back into a row (each
value through its type's input function, exactly the inverse of what pgoutput sent) and
evaluates the mapping's key expressions over it as ``src``, like every other consumer of the
compiled mapping. The key comes back as the same jsonb text the rewrite's outbox capture
writes, so the two can be compared as strings.

A column the WAL did not carry (an unchanged TOASTed value, a column outside a DELETE's
replica identity, a column added since) is NULL in the record: validation requires every column
the key is computed from to be in the replica identity, so keys never depend on those. The
reader leaves out every column the keys do not mention (``KeyDeriver.needs``) the same way, so
it never decodes them; a domain-typed column is the exception (the reader decodes it), since
its domain may refuse a NULL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import asyncpg

from core.catalog import Prepared
from core.mapping import SRC, CompiledMapping
from mirror.wal.pgoutput import UNCHANGED_TOAST

_ROW = "__dualwrite_row"
_ORD = "__dualwrite_ord"


def keys_sql(mapping: CompiledMapping) -> str:
    """``$1``: text[] of record literals of the source row type -> (ordinal, key jsonb text)."""
    source, _, _ = mapping.binding()
    return (
        f"SELECT {_ORD}, ({mapping.key_json_sql()})::text "
        f"FROM unnest($1::text[]) WITH ORDINALITY AS __dualwrite_in({_ROW}, {_ORD}), "
        f"LATERAL (SELECT ({_ROW}::{source.sql}).*) AS {SRC} ORDER BY {_ORD}"
    )


def statements_to_prepare(mapping: CompiledMapping) -> list[Prepared]:
    """What the WAL reader runs for a WAL-read mapping, for validation to prepare at start."""
    if not mapping.capture.reads_wal:
        return []
    return [Prepared("key derivation from WAL rows", keys_sql(mapping))]


def record_literal(columns: Sequence[str], values: Mapping[str, object]) -> str:
    """``("v1","v2",)``: a row-type literal of ``columns`` (record_in syntax; absent = NULL).

    One call per changed row: most values need no escaping, so they are checked first."""
    parts = []
    get = values.get
    for column in columns:
        value = get(column)
        if value is None or value is UNCHANGED_TOAST:
            parts.append("")
        elif isinstance(value, str):
            if "\\" in value or '"' in value:
                value = value.replace("\\", "\\\\").replace('"', '\\"')
            parts.append('"' + value + '"')
        else:
            raise TypeError(f"column {column}: binary values are not requested")
    return "(" + ",".join(parts) + ")"


class KeyDeriver:
    """Turns decoded rows of one mapping's source into that mapping's keys (one round trip per
    batch of rows)."""

    def __init__(self, mapping: CompiledMapping) -> None:
        self.mapping = mapping
        _, _, catalog = mapping.binding()
        #: every column of the source row type, in order (what a record literal lists)
        self.columns = catalog.source_columns
        self._index = {name: i for i, name in enumerate(self.columns)}
        #: the only columns the key is computed from (all a decoder needs to give us)
        self.needs = frozenset(mapping.key_mentioned)
        self.sql = keys_sql(mapping)

    def literal(self, row: Mapping[str, object]) -> str:
        """:func:`record_literal` of a row that carries few of the columns (the reader decodes
        only the key's): the cost is per value present, not per column of the table."""
        parts = [""] * len(self.columns)
        index = self._index
        for column, value in row.items():
            at = index.get(column)
            if at is None or value is None or value is UNCHANGED_TOAST:
                continue  # a column added since: not in the row type; NULL
            if not isinstance(value, str):
                raise TypeError(f"column {column}: binary values are not requested")
            text = value
            if "\\" in text or '"' in text:
                text = text.replace("\\", "\\\\").replace('"', '\\"')
            parts[at] = '"' + text + '"'
        return "(" + ",".join(parts) + ")"

    async def keys(self, conn: asyncpg.Connection, literals: Sequence[str]) -> list[str]:
        """The key (jsonb text) of each record literal (:meth:`literal`), in order."""
        if not literals:
            return []
        records = await conn.fetch(self.sql, literals)
        return [r[1] for r in records]
