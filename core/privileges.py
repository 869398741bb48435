"""What the application role needs to run rewritten statements: ``setup``'s grants and
``check``'s verification of them.

A rewritten statement runs as the application's own role, so that role needs, beyond what it
has on its own tables: SELECT on the source columns the rewrite adds to RETURNING; USAGE on
the control schema and INSERT on the outbox (every mapping captures there while paused); and
for a mapping whose statement writes the target (sync), USAGE on the target's schema, SELECT,
INSERT, UPDATE and DELETE on the target, and EXECUTE on the mapping's delete function. One
list of requirements (:func:`requirements`) drives both the GRANTs and the check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from core.control import SCHEMA, delete_function
from core.errors import ControlSchemaMissing
from core.mapping import CompiledMapping
from core.sqltext import quote_ident, quote_literal

_TARGET_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")


@dataclass(frozen=True)
class Requirement:
    """One privilege the application role needs for a mapping's rewritten statements."""

    #: the mapping that needs it (None: every mapping, the control schema's)
    mapping: str | None
    #: the GRANT that gives it (run by ``setup``)
    grant: str
    #: a boolean SQL expression true when the role has it (``$1`` is the role name)
    held: str
    #: what is missing, said in the check's message
    missing: str


def requirements(role: str, mappings: Sequence[CompiledMapping]) -> list[Requirement]:
    """Every privilege ``role`` needs to run the statements the rewrite generates."""
    who = quote_ident(role)
    outbox = f"{SCHEMA}.outbox"
    needed = [
        Requirement(
            None,
            f"GRANT USAGE ON SCHEMA {SCHEMA} TO {who}",
            f"has_schema_privilege($1, {quote_literal(SCHEMA)}, 'USAGE')",
            f"USAGE on schema {SCHEMA}",
        ),
        Requirement(
            None,
            f"GRANT INSERT ON {outbox} TO {who}",
            f"has_table_privilege($1, {quote_literal(outbox)}, 'INSERT')",
            f"INSERT on {outbox}",
        ),
    ]
    for mapping in mappings:
        if mapping.source is None or mapping.catalog is None:
            continue
        if mapping.capture.rewrites_statements:  # with capture wal the statement is untouched
            needed += _source_columns(mapping, who)
        if mapping.mode.app_role_writes_target and mapping.target is not None:
            needed += _target(mapping, who)
    return needed


def _source_columns(mapping: CompiledMapping, who: str) -> list[Requirement]:
    """The rewrite adds RETURNING of the columns the mapping reads: an insert-only role (an
    audit writer) needs SELECT on exactly those columns."""
    source, _, catalog = mapping.binding()
    columns = catalog.source_columns_read
    if not columns:
        return []
    listed = ", ".join(quote_ident(c) for c in columns)
    held = " AND ".join(
        f"has_column_privilege($1, {quote_literal(source.sql)}, {quote_literal(c)}, 'SELECT')"
        for c in columns
    )
    return [
        Requirement(
            mapping.name,
            f"GRANT SELECT ({listed}) ON {source.sql} TO {who}",
            held,
            f"SELECT on columns ({listed}) of {source}",
        )
    ]


def _target(mapping: CompiledMapping, who: str) -> list[Requirement]:
    """A statement that writes the target: the schema, the table and the delete function."""
    _, target, _ = mapping.binding()
    table = quote_literal(target.sql)
    function = delete_function(mapping)
    signature = quote_literal(f"{function.sql}(jsonb)")
    return [
        Requirement(
            mapping.name,
            f"GRANT USAGE ON SCHEMA {quote_ident(target.schema)} TO {who}",
            f"has_schema_privilege($1, {quote_literal(target.schema)}, 'USAGE')",
            f"USAGE on schema {target.schema}",
        ),
        Requirement(
            mapping.name,
            f"GRANT {', '.join(_TARGET_PRIVILEGES)} ON {target.sql} TO {who}",
            " AND ".join(
                f"has_table_privilege($1, {table}, '{p}')" for p in _TARGET_PRIVILEGES
            ),
            f"{', '.join(_TARGET_PRIVILEGES)} on {target}",
        ),
        Requirement(
            mapping.name,
            f"GRANT EXECUTE ON FUNCTION {function.sql}(jsonb) TO {who}",
            f"to_regprocedure({signature}) IS NULL "
            f"OR has_function_privilege($1, to_regprocedure({signature}), 'EXECUTE')",
            f"EXECUTE on {function}(jsonb)",
        ),
    ]


async def grant(
    conn: asyncpg.Connection, role: str, mappings: Sequence[CompiledMapping]
) -> list[str]:
    """Grant ``role`` what rewritten statements need; idempotent. Returns the GRANTs run."""
    if not await _role_exists(conn, role):
        raise ControlSchemaMissing(f"app_role {role!r} does not exist")
    statements = [r.grant for r in requirements(role, mappings)]
    for statement in statements:
        await conn.execute(statement)
    return statements


async def app_role_problems(
    conn: asyncpg.Connection, role: str, mappings: Sequence[CompiledMapping]
) -> tuple[list[tuple[str | None, str]], str | None]:
    """What ``role`` lacks to run every generated statement: ``(mapping or None, missing)``
    pairs, and a note when nothing could be checked (no such role or control schema yet)."""
    if not await _role_exists(conn, role):
        return [], f"app_role {role} does not exist yet: its privileges were not checked"
    if not await conn.fetchval("SELECT to_regnamespace($1) IS NOT NULL", SCHEMA):
        return [], f"schema {SCHEMA} does not exist yet: app_role's privileges were not checked"
    missing: list[tuple[str | None, str]] = []
    for need in requirements(role, mappings):
        if not await conn.fetchval(f"SELECT {need.held}", role):
            missing.append((need.mapping, need.missing))
    return missing, None


async def _role_exists(conn: asyncpg.Connection, role: str) -> bool:
    return bool(await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role))
