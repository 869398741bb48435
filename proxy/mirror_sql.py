"""The SQL a rewritten statement adds to mirror a mapped write: the upsert or the outbox capture.

A statement of a mapping whose mode writes the target in the statement (sync) upserts the
target from the rows it changed, and deletes through the mapping's delete function (its call
is core/control.py's, beside the function); any other mapping captures the rows' keys in
``dualwrite.outbox`` for the applier. ``from_sql`` is the relation of the changed rows'
source columns (the rewrite's ``__dualwrite_src``), read as ``src`` like everywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

from core.catalog import Prepared
from core.mapping import SRC, CompiledMapping
from core.sqltext import quote_literal


def upsert_sql(mapping: CompiledMapping, from_sql: str) -> str:
    """INSERT ... ON CONFLICT DO UPDATE of the rows ``from_sql`` maps to (filter applied)."""
    return mapping.upsert_sql(mapping.expected_rows_sql(from_sql))


def outbox_capture_sql(mappings: Sequence[CompiledMapping], from_sql: str) -> str:
    """One INSERT into the outbox of ``(mapping, key)`` for each of ``from_sql``'s rows and
    each of these mappings (one statement, whatever the number of mappings)."""
    rows = " UNION ALL ".join(
        f"SELECT {quote_literal(m.name)}::pg_catalog.text, {m.key_json_sql()} "
        f"FROM {from_sql} AS {SRC}"
        for m in mappings
    )
    return f"INSERT INTO dualwrite.outbox (mapping, key) {rows}"


def statements_to_prepare(mapping: CompiledMapping) -> list[Prepared]:
    """What a rewritten statement runs for this mapping, for validation to prepare at start.

    Prepared for outbox-mode mappings too: it checks that the mapped rows can be written to
    the target at all, which the applier needs as much as a sync-mode statement.
    """
    if mapping.cross_database:
        return []
    source, _, _ = mapping.binding()
    return [Prepared("upsert into target", upsert_sql(mapping, source.sql))]
