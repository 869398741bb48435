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


def outbox_capture_sql(mappings: Sequence[tuple[CompiledMapping, str]]) -> str:
    """One INSERT into the outbox of ``(mapping, key)`` for each mapping and each row of its
    ``from_sql`` (one statement, whatever the number of mappings)."""
    rows = " UNION ALL ".join(
        f"SELECT {quote_literal(m.name)}::pg_catalog.text, {m.key_json_sql()} "
        f"FROM {from_sql} AS {SRC}"
        for m, from_sql in mappings
    )
    return f"INSERT INTO dualwrite.outbox (mapping, key) {rows}"


def written_to_source_sql(mapping: CompiledMapping, tableoid: str) -> str:
    """True for a changed row whose ``tableoid`` is the mapping's source (or a partition or
    child of it): the statement named the table unqualified, and the session's search_path
    or a temp table of the same name decided which table that was."""
    source, _, catalog = mapping.binding()
    table = f"{quote_literal(source.sql)}::pg_catalog.regclass::pg_catalog.oid"
    if not catalog.source_has_children:
        return f"{tableoid} OPERATOR(pg_catalog.=) {table}"
    # Evaluated once per statement (an uncorrelated subquery): partitions added later count.
    tree = (
        f"WITH RECURSIVE tree(relid) AS (SELECT {table} UNION SELECT i.inhrelid "
        "FROM pg_catalog.pg_inherits AS i JOIN tree "
        "ON i.inhparent OPERATOR(pg_catalog.=) tree.relid) SELECT relid FROM tree"
    )
    return f"{tableoid} OPERATOR(pg_catalog.=) ANY (ARRAY({tree}))"


def statements_to_prepare(mapping: CompiledMapping) -> list[Prepared]:
    """What a rewritten statement runs for this mapping, for validation to prepare at start.

    Prepared for outbox-mode mappings too: it checks that the mapped rows can be written to
    the target at all, which the applier needs as much as a sync-mode statement.
    """
    if mapping.cross_database:
        return []
    source, _, _ = mapping.binding()
    return [Prepared("upsert into target", upsert_sql(mapping, source.sql))]
