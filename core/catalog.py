"""Checks compiled mappings against the live database and binds them to what it finds.

Before the proxy accepts traffic every mapping is validated here: the tables and columns
exist, the service role sees every row of both (no row-level security filters them, see
core/rowsecurity.py), the target key has a unique constraint, required target columns are
mapped, the key types agree, and the generated SQL prepares (so type errors surface at start,
not mid-traffic). The statements are those of the parts that will run them (the rewrite's,
sync_keys'): each part lists them (a :data:`StatementsOf`) and its caller passes them in. A
mismatch raises MappingValidationError naming the mapping and the problem.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg

from core.control import delete_function_problem
from core.errors import DatabaseUnreachable, MappingValidationError
from core.mapping import SRC, TGT, CatalogFacts, CompiledMapping, bind_catalog, pin_expressions
from core.rowsecurity import filtered_view_problem
from core.sqltext import QualifiedName, pinned_select_list, quote_ident

_RESOLVE = """
SELECT n.nspname, c.relname, c.relkind::text, c.relhasrules
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = $1 AND n.nspname = ANY($2::text[]) AND c.relkind IN ('r', 'p', 'v', 'f', 'm')
ORDER BY array_position($2::text[], n.nspname::text)
"""

_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type,
       format_type(a.atttypid, NULL) AS base_type, a.attnotnull,
       (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default,
       a.attgenerated <> '' AS generated
FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_HAS_CHILDREN = """
SELECT c.relkind = 'p' OR EXISTS (SELECT FROM pg_inherits i WHERE i.inhparent = c.oid)
FROM pg_class c WHERE c.oid = $1::regclass
"""

_UNIQUE_KEYS = """
SELECT array_agg(a.attname ORDER BY k.ord) AS cols
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1::regclass AND i.indisunique AND i.indpred IS NULL
  AND i.indexprs IS NULL AND i.indimmediate
GROUP BY i.indexrelid
"""


@dataclass(frozen=True)
class Prepared:
    """A statement some part will run for a mapping, prepared during validation."""

    #: what it is, for the error message (``upsert into target: ...``)
    what: str
    sql: str
    #: prepared in the target's database (a cross-database mapping), else in the source's
    in_target: bool = False


#: the statements one part (the rewrite, sync_keys) runs for a bound mapping
StatementsOf = Callable[[CompiledMapping], Sequence[Prepared]]


async def resolve_table(
    conn: asyncpg.Connection, schema: str | None, name: str, search_path: Sequence[str]
) -> tuple[QualifiedName, str, bool] | None:
    """(qualified name, relkind, has rules) of a table, resolving an unqualified name."""
    schemas = [schema] if schema else list(search_path)
    row = await conn.fetchrow(_RESOLVE, name, schemas)
    if row is None:
        return None
    return QualifiedName(row["nspname"], row["relname"]), row["relkind"], row["relhasrules"]


async def _columns(conn: asyncpg.Connection, table: QualifiedName) -> list[asyncpg.Record]:
    return list(await conn.fetch(_COLUMNS, table.sql))


async def validate_mapping(
    conn: asyncpg.Connection,
    mapping: CompiledMapping,
    search_path: Sequence[str],
    target_conn: asyncpg.Connection | None = None,
    *,
    statements: Sequence[StatementsOf],
    require_functions: bool = True,
) -> CompiledMapping:
    """Check one mapping against the database; return it bound to the catalog.

    ``target_conn`` is the target's database when the mapping has a ``target_dsn``;
    ``statements`` list what the callers' parts will run, all of it prepared here.
    """

    def fail(reason: str) -> MappingValidationError:
        return MappingValidationError(mapping.name, reason)

    tconn = target_conn or conn
    source = await resolve_table(conn, mapping.source_schema, mapping.source_name, search_path)
    if source is None:
        raise fail(f"source table {mapping.config.source!r} does not exist")
    target = await resolve_table(tconn, mapping.target_schema, mapping.target_name, search_path)
    if target is None:
        raise fail(f"target table {mapping.config.target!r} does not exist")
    source_name, source_kind, source_rules = source
    target_name, target_kind, _ = target
    if source_kind not in ("r", "p"):
        raise fail(f"source {source_name} is not a table (relkind {source_kind})")
    if target_kind not in ("r", "p"):
        raise fail(f"target {target_name} is not a table (relkind {target_kind})")
    if source_name == target_name and target_conn is None:
        raise fail("source and target are the same table")
    for db, table, what in ((conn, source_name, "source"), (tconn, target_name, "target")):
        problem = await filtered_view_problem(db, table, what)
        if problem is not None:
            raise fail(problem)

    source_cols = await _columns(conn, source_name)
    target_cols = {r["attname"]: r for r in await _columns(tconn, target_name)}
    for column in mapping.columns:
        if column not in target_cols:
            raise fail(f"target column {column!r} does not exist in {target_name}")
        if target_cols[column]["generated"]:
            raise fail(f"target column {column!r} is generated and cannot be written")
    for column, info in target_cols.items():
        if info["attnotnull"] and not info["has_default"] and column not in mapping.columns:
            raise fail(f"target column {column!r} is NOT NULL without a default and is not mapped")

    unique_sets = [tuple(r["cols"]) for r in await tconn.fetch(_UNIQUE_KEYS, target_name.sql)]
    if not any(sorted(cols) == sorted(mapping.key) for cols in unique_sets):
        raise fail(
            f"target key ({', '.join(mapping.key)}) has no unique constraint or index on "
            f"{target_name} (ON CONFLICT needs one)"
        )

    source_names = [r["attname"] for r in source_cols]
    read = tuple(c for c in source_names if c in mapping.mentioned)
    missing_keys = mapping.key_mentioned - set(source_names)
    if missing_keys and not read:
        raise fail(f"key expressions name no source column ({', '.join(sorted(missing_keys))})")

    key_types = await _key_types(conn, mapping, source_name, fail)
    for key, key_type in zip(mapping.key, key_types, strict=True):
        target_type = target_cols[key]["base_type"]
        if key_type != target_type:
            raise fail(
                f"key {key!r}: expression type {key_type} differs from target column type "
                f"{target_type}; cast it in the mapping (e.g. ({mapping.config.columns[key]})"
                f"::{target_type})"
            )
    bound = bind_catalog(
        mapping,
        source=source_name,
        target=target_name,
        catalog=CatalogFacts(
            key_types=key_types,
            source_columns=tuple(source_names),
            source_columns_read=read,
            source_has_rules=bool(source_rules),
            source_has_children=bool(await conn.fetchval(_HAS_CHILDREN, source_name.sql)),
            target_types=tuple(target_cols[c]["type"] for c in mapping.columns),
        ),
    )
    bound = await _pinned(conn, bound, fail)
    checks = [*_mapping_checks(bound), *(s for of in statements for s in of(bound))]
    for check in checks:
        db = (target_conn or conn) if check.in_target else conn
        try:
            await db.prepare(check.sql)
        except asyncpg.PostgresError as exc:
            raise fail(f"{check.what}: {exc}") from None
    if target_conn is None and require_functions and mapping.mode.needs_delete_function:
        problem = await delete_function_problem(conn, bound)
        if problem is not None:
            raise fail(problem)
    return bound


async def _key_types(
    conn: asyncpg.Connection, mapping: CompiledMapping, source: QualifiedName, fail: Any
) -> tuple[str, ...]:
    """The SQL types of the key expressions (what the outbox's jsonb keys are cast back to)."""
    probe = ", ".join(f"pg_typeof({expr})::text" for expr in mapping.key_exprs())
    try:
        row = await conn.fetchrow(
            f"SELECT {probe} FROM (SELECT * FROM {source.sql} LIMIT 0) AS src "
            f"RIGHT JOIN (SELECT) AS one ON true"
        )
    except asyncpg.PostgresError as exc:
        raise fail(f"key expressions do not evaluate: {exc}") from None
    assert row is not None
    return tuple(str(v) for v in row)


_PIN_VIEW = "pg_temp.__dualwrite_pin"


async def _pinned(conn: asyncpg.Connection, mapping: CompiledMapping, fail: Any) -> CompiledMapping:
    """The mapping with its expressions and filter resolved now, once, for every session.

    Rewritten statements evaluate them in the application's session, under its search_path:
    unpinned, ``upper(status)`` would call whatever ``upper`` comes first there. PostgreSQL
    resolves the expressions of a view when it is created (here, under validation's path) and
    prints them back qualified where a name is not visible: under an empty search_path, all
    but pg_catalog's, which :func:`pinned_select_list` then qualifies too. The view is a temp
    one, in a transaction rolled back at once.
    """
    source, _, _ = mapping.binding()
    parts = list(mapping.expressions.items())
    if mapping.filter is not None:
        parts.append(("", mapping.filter))
    select = ", ".join(
        f"({expr.sql}) AS {quote_ident(f'e{i}')}" for i, (_, expr) in enumerate(parts)
    )
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            f"CREATE TEMP VIEW {_PIN_VIEW} AS SELECT {select} FROM {source.sql} AS src"
        )
        await conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")
        viewdef = await conn.fetchval(
            f"SELECT pg_catalog.pg_get_viewdef('{_PIN_VIEW}'::pg_catalog.regclass)"
        )
    except (asyncpg.InsufficientPrivilegeError, asyncpg.ReadOnlySQLTransactionError) as exc:
        raise fail(
            f"expressions and filter: validation pins them with a temporary view, which this "
            f"session cannot create ({exc}); the service role needs TEMPORARY on the database"
        ) from None
    except asyncpg.PostgresError as exc:
        raise fail(f"expressions and filter: {exc}") from None
    finally:
        await transaction.rollback()
    try:
        pinned = pinned_select_list(str(viewdef))
    except ValueError as exc:
        raise fail(f"expressions and filter: {exc}") from None
    texts = dict(zip((column for column, _ in parts), pinned, strict=True))
    pinned_mapping = pin_expressions(mapping, texts)
    if mapping.target_filter is None or mapping.cross_database:
        return pinned_mapping
    owned = await _pinned_target_filter(conn, mapping, fail)
    return replace(pinned_mapping, target_filter=replace(mapping.target_filter, sql=owned))


async def _pinned_target_filter(
    conn: asyncpg.Connection, mapping: CompiledMapping, fail: Any
) -> str:
    """``target_filter`` resolved as :func:`_pinned` resolves the expressions (a sync-mode
    upsert evaluates it in the application's session), over the target row."""
    _, target, _ = mapping.binding()
    assert mapping.target_filter is not None
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(
            f"CREATE TEMP VIEW {_PIN_VIEW} AS SELECT ({mapping.target_filter.sql}) AS e0 "
            f"FROM {target.sql} AS {TGT}"
        )
        await conn.execute("SELECT pg_catalog.set_config('search_path', '', true)")
        viewdef = await conn.fetchval(
            f"SELECT pg_catalog.pg_get_viewdef('{_PIN_VIEW}'::pg_catalog.regclass)"
        )
    except asyncpg.PostgresError as exc:
        raise fail(f"target_filter: {exc}") from None
    finally:
        await transaction.rollback()
    try:
        return pinned_select_list(str(viewdef))[0]
    except ValueError as exc:
        raise fail(f"target_filter: {exc}") from None


def _mapping_checks(mapping: CompiledMapping) -> list[Prepared]:
    """The mapping's own SQL, whichever part runs it: its expressions and filter."""
    source, target, _ = mapping.binding()
    checks = [Prepared("expressions and filter", mapping.expected_rows_sql(source.sql))]
    if mapping.target_filter is not None:
        checks.append(
            Prepared(
                "target_filter",
                f"SELECT 1 FROM {target.sql} AS {TGT} WHERE {mapping.owned_sql()}",
                in_target=True,
            )
        )
    if not mapping.cross_database:
        # Aggregates, window and set-returning functions are not allowed in WHERE, which
        # makes this the place to reject expressions that are not per-row.
        per_row = " AND ".join(
            f"(({e.sql}) IS NULL) IS NOT NULL" for e in mapping.expressions.values()
        )
        checks.append(
            Prepared(
                "per-row expressions",
                f"SELECT 1 FROM {source.sql} AS src WHERE {per_row or 'true'}",
            )
        )
    return checks


TargetConnector = Callable[[str], Awaitable[asyncpg.Connection]]


async def validate_all(
    conn: asyncpg.Connection,
    mappings: Sequence[CompiledMapping],
    search_path: Sequence[str],
    connect_target: TargetConnector | None = None,
    *,
    statements: Sequence[StatementsOf],
    require_functions: bool = True,
) -> list[CompiledMapping]:
    """Validate every mapping; also refuse a table that is both a source and a target.

    ``statements``: what the caller's parts run for a mapping (see :func:`validate_mapping`).
    ``require_functions`` is false only for ``setup``, which creates them after this.
    """
    bound = []
    for mapping in mappings:
        dsn = mapping.config.target_dsn
        if dsn is None:
            bound.append(
                await validate_mapping(
                    conn,
                    mapping,
                    search_path,
                    statements=statements,
                    require_functions=require_functions,
                )
            )
            continue
        if connect_target is None:
            raise MappingValidationError(
                mapping.name, "target_dsn is set but cannot be reached here"
            )
        try:
            target_conn = await connect_target(dsn)
        except (OSError, asyncpg.PostgresError, DatabaseUnreachable) as exc:
            raise MappingValidationError(
                mapping.name, f"target_dsn: cannot connect: {exc}"
            ) from None
        try:
            bound.append(
                await validate_mapping(
                    conn, mapping, search_path, target_conn, statements=statements
                )
            )
        finally:
            await target_conn.close()
    _check_shared_targets(bound)
    sources = {m.source for m in bound if not m.cross_database}
    pairs = {(m.name, m.cutover.partner) for m in bound if m.cutover is not None}
    for mapping in bound:
        # a cutover pair mirrors each table into the other, for disjoint tenants (their
        # filters are each other's complement), so neither sees the other's writes
        readers = {
            m.name for m in bound if not m.cross_database and m.source == mapping.target
        }
        if readers and all((mapping.name, r) in pairs for r in readers):
            continue
        if not mapping.cross_database and mapping.target in sources:
            raise MappingValidationError(
                mapping.name,
                f"target {mapping.target} is also the source of a mapping; mirror loops are "
                "refused (pause or remove one direction)",
            )
    return bound


def _check_shared_targets(mappings: Sequence[CompiledMapping]) -> None:
    """Mappings writing one target table (as resolved) must each have a target_filter."""
    writers: dict[tuple[QualifiedName | None, str | None], list[CompiledMapping]] = {}
    for mapping in mappings:
        writers.setdefault((mapping.target, mapping.config.target_dsn), []).append(mapping)
    for group in writers.values():
        for mapping in group:
            if len(group) > 1 and mapping.target_filter is None:
                others = ", ".join(m.name for m in group if m is not mapping)
                raise MappingValidationError(
                    mapping.name,
                    f"target_filter is required: {mapping.target} is also written by {others}; "
                    "set it to the condition naming the target rows this mapping owns",
                )


async def foreign_rows_problem(conn: asyncpg.Connection, mapping: CompiledMapping) -> str | None:
    """Why a mapping without ``target_filter`` cannot own its whole target: a target row that
    no source row maps to and that waits in no queue (a reverse mapping into a table that
    holds other rows). None when there is none, or when the mapping has a target_filter or
    its target is in another database. One anti-join over the target: ``check`` runs it.
    """
    if mapping.target_filter is not None or mapping.cross_database:
        return None
    source, target, _ = mapping.binding()
    keys = mapping.target_key_list(TGT)
    queued = ""
    if await conn.fetchval("SELECT to_regclass('dualwrite.dead_letters') IS NOT NULL"):
        queued = (
            f"AND jsonb_build_array({keys}) NOT IN (SELECT q.key FROM dualwrite.outbox q "
            "WHERE q.mapping = $1 UNION ALL SELECT l.key FROM dualwrite.dead_letters l "
            "WHERE l.mapping = $1) "
        )
    found = await conn.fetchval(
        f"SELECT jsonb_build_array({keys})::text FROM {target.sql} AS {TGT} "
        f"WHERE NOT EXISTS (SELECT FROM {source.sql} AS {SRC} WHERE {mapping.filter_sql()} "
        f"AND ({', '.join(mapping.key_exprs())}) = ({keys})) "
        f"{queued}AND $1::text IS NOT NULL ORDER BY {keys} LIMIT 1",
        mapping.name,
    )
    if found is None:
        return None
    return (
        f"target_filter is required: {target} holds rows this mapping's source does not "
        f"produce (key {found}, for one). If another writer owns them (a reverse mapping into "
        "a table with other rows), set target_filter to the condition naming this mapping's "
        "rows; if they are divergence, run `dualwrite reconcile --repair`"
    )
