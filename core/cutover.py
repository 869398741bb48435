"""What ``check`` verifies of a staged cutover (``cutover:``) against the live database.

- The reverse mapping can express what the forward one carries: every old row the forward
  mapping carries (of the listed tenants, or of every tenant when none is listed yet), mapped
  forward and then back, is the row it came from, on every column the reverse mapping writes
  (cast to the old column's type, as the upsert would). A row that does not come back is
  data a move would lose, so ``check`` fails naming its key.
- Every listed tenant has rows on one side or the other; a tenant with none is a warning (a
  typo, or a tenant not created yet).

The pair's filters are compiled without the cutover here (:func:`compile_mapping` without a
role), so the check covers the rows the pair would carry whichever tenants have moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import asyncpg

from core.errors import MappingValidationError
from core.mapping import SRC, CompiledMapping, compile_mapping
from core.sqltext import quote_ident

_OLD = "__dualwrite_old"


def round_trip_sql(forward: CompiledMapping, reverse: CompiledMapping) -> str:
    """The key (jsonb text) of one old row that forward then reverse does not give back;
    ``$1``: the tenants to look at (text[]; empty: every tenant)."""
    old, _, _ = forward.binding()
    _, _, back_catalog = reverse.binding()
    plain_forward = replace(forward, filter=compile_mapping(forward.config).filter)
    plain_reverse = compile_mapping(reverse.config)
    tenant = forward.config.columns[forward.config.tenant_column or ""]
    listed = (
        f"(pg_catalog.cardinality($1::pg_catalog.text[]) OPERATOR(pg_catalog.=) 0 OR "
        f"({tenant})::pg_catalog.text OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]))"
    )
    carried = (
        f"SELECT {plain_forward.select_list()}, {SRC} AS {_OLD} FROM {old.sql} AS {SRC} "
        f"WHERE {plain_forward.filter_sql()} AND {listed}"
    )
    back = ", ".join(
        f"CAST(({reverse.expressions[c].sql}) AS {back_catalog.target_types[i]})"
        for i, c in enumerate(reverse.columns)
    )
    came_from = ", ".join(f"({SRC}.{_OLD}).{quote_ident(c)}" for c in reverse.columns)
    key = ", ".join(f"({SRC}.{_OLD}).{quote_ident(k)}" for k in reverse.key)
    return (
        f"SELECT pg_catalog.jsonb_build_array({key})::pg_catalog.text FROM ({carried}) AS {SRC} "
        f"WHERE NOT {plain_reverse.filter_sql()} "
        f"OR ROW({back}) IS DISTINCT FROM ROW({came_from}) LIMIT 1"
    )


def tenants_without_rows_sql(forward: CompiledMapping, reverse: CompiledMapping) -> str:
    """The tenants of ``$1`` (text[]) with no row in the old table nor in the new one."""
    old, _, _ = forward.binding()
    new, _, _ = reverse.binding()
    sides = []
    for mapping, table in ((forward, old), (reverse, new)):
        tenant = mapping.config.columns[mapping.config.tenant_column or ""]
        sides.append(
            f"NOT EXISTS (SELECT FROM {table.sql} AS {SRC} WHERE "
            f"({tenant})::pg_catalog.text OPERATOR(pg_catalog.=) t)"
        )
    return (
        "SELECT t FROM pg_catalog.unnest($1::pg_catalog.text[]) WITH ORDINALITY AS u(t, n) "
        f"WHERE {' AND '.join(sides)} ORDER BY n"
    )


async def check_lines(
    conn: asyncpg.Connection, mappings: Sequence[CompiledMapping], tenants: Sequence[str]
) -> list[str]:
    """``check``: one line per cutover pair; raise MappingValidationError for a pair whose
    reverse mapping does not give back the rows the forward one carries."""
    by_name = {m.name: m for m in mappings}
    lines: list[str] = []
    for forward in mappings:
        role = forward.cutover
        if role is None or role.direction != "forward":
            continue
        reverse = by_name[role.partner]
        try:
            lost = await conn.fetchval(round_trip_sql(forward, reverse), list(tenants))
        except asyncpg.PostgresError as exc:
            raise MappingValidationError(
                reverse.name, f"cutover: cannot map {forward.name}'s rows back: {exc}"
            ) from None
        if lost is not None:
            raise MappingValidationError(
                reverse.name,
                f"cutover: does not give back what {forward.name} carries: the old row with "
                f"key {lost}, mapped forward and back, differs (or the reverse filter leaves "
                "it out); a move would lose data. Make the new table hold what the old one "
                "needs, or fix the reverse expressions",
            )
        scope = f"tenants {', '.join(tenants)}" if tenants else "every tenant (none moved)"
        lines.append(
            f"cutover {forward.name} <-> {reverse.name}: the rows of {scope} map forward "
            "and back unchanged"
        )
        if tenants:
            empty = await conn.fetch(tenants_without_rows_sql(forward, reverse), list(tenants))
            lines += [
                f"warning: cutover tenant {r['t']!r} has no row in {forward.source} nor in "
                f"{forward.target} (a typo, or a tenant not created yet?)"
                for r in empty
            ]
    return lines

