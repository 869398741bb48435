"""NOT NULL target columns fed by source expressions that may be NULL: found, and counted live.

A mapping may compute a NOT NULL target column from an expression that is NULL for some source
rows (a nullable column, ``nullif``, a ``CASE`` without ``ELSE``...). Every such row would be
refused by the target: dead-lettered in outbox mode, the application's write failing in sync
mode. ``setup`` warns about every such column from the expression alone; ``check`` also counts
the live source rows (inside the mapping's filter) for which the expression is NULL today.

"May be NULL" is decided conservatively from the expression's parse tree: only a NOT NULL
source column, a non-NULL constant, ``coalesce`` with one such argument, casts, a few operators
and functions that keep non-NULL inputs non-NULL, and ``concat`` count as never NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg
import pglast
from pglast import ast

from core.mapping import SRC, CompiledMapping
from core.sqltext import quote_ident

#: operators that give a non-NULL result for non-NULL operands
_SAFE_OPERATORS = frozenset({"+", "-", "*", "/", "%", "||", "=", "<>", "<", ">", "<=", ">="})
#: functions that give a non-NULL result for non-NULL arguments
_SAFE_FUNCTIONS = frozenset(
    {
        "lower",
        "upper",
        "btrim",
        "ltrim",
        "rtrim",
        "trim",
        "md5",
        "length",
        "char_length",
        "abs",
        "round",
        "trunc",
        "floor",
        "ceil",
        "greatest",
        "least",
        "left",
        "right",
        "lpad",
        "rpad",
        "replace",
        "initcap",
        "date_trunc",
        "to_char",
        "text",
        "now",
        "gen_random_uuid",
        "clock_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
    }
)
#: functions that are never NULL, whatever their arguments
_NEVER_NULL_FUNCTIONS = frozenset({"concat"})

_NOT_NULL_COLUMNS = """
SELECT a.attname FROM pg_attribute a
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull
"""


@dataclass(frozen=True)
class NullRisk:
    """A NOT NULL target column whose expression may be NULL."""

    mapping: str
    column: str
    expression: str
    #: live source rows (inside the filter) for which the expression is NULL; None: not counted
    rows: int | None = None

    def setup_warning(self) -> str:
        return (
            f"warning: mapping {self.mapping}: target column {self.column!r} is NOT NULL but "
            f"its expression ({self.expression}) may be NULL; such rows will be rejected by "
            "the target (run `dualwrite check` to count them in the live source)"
        )

    def check_line(self) -> str:
        counted = "not counted" if self.rows is None else f"{self.rows} live source rows"
        return (
            f"warning: mapping {self.mapping}: target column {self.column!r} is NOT NULL but "
            f"its expression ({self.expression}) may be NULL: {counted} would be rejected "
            "by the target today; coalesce the expression or fix those rows"
        )


def may_be_null(node: Any, not_null_columns: frozenset[str]) -> bool:
    """Whether an expression's parse tree can evaluate to NULL (conservatively True)."""

    def never_null(item: Any) -> bool:
        return not may_be_null(item, not_null_columns)

    if isinstance(node, ast.ColumnRef):
        fields = node.fields or ()
        names = [f.sval if isinstance(f, ast.String) else None for f in fields]
        # a column of the source row: bare, or through the alias every generated statement uses
        of_source = len(names) == 1 or (len(names) == 2 and names[0] == SRC)
        return not of_source or names[-1] not in not_null_columns
    if isinstance(node, ast.A_Const):
        return bool(node.isnull)
    if isinstance(node, ast.TypeCast):
        return may_be_null(node.arg, not_null_columns)
    if isinstance(node, ast.CoalesceExpr):
        return not any(never_null(arg) for arg in node.args or ())
    if isinstance(node, ast.SQLValueFunction):
        return False
    if isinstance(node, ast.A_Expr) and node.kind == 0:  # AEXPR_OP
        name = node.name[-1].sval if node.name else ""
        operands = [x for x in (node.lexpr, node.rexpr) if x is not None]
        return name not in _SAFE_OPERATORS or not all(never_null(x) for x in operands)
    if isinstance(node, ast.FuncCall):
        name = node.funcname[-1].sval if node.funcname else ""
        if name in _NEVER_NULL_FUNCTIONS:
            return False
        return name not in _SAFE_FUNCTIONS or not all(never_null(a) for a in node.args or ())
    return True


def _expression_node(sql: str) -> Any:
    statement: Any = pglast.parse_sql(f"SELECT {sql}")[0].stmt
    return statement.targetList[0].val


async def _not_null(conn: asyncpg.Connection, table_sql: str) -> frozenset[str]:
    return frozenset(r["attname"] for r in await conn.fetch(_NOT_NULL_COLUMNS, table_sql))


async def null_risks(conn: asyncpg.Connection, mapping: CompiledMapping) -> list[NullRisk]:
    """The NOT NULL target columns of a same-database mapping fed by maybe-NULL expressions."""
    source, target, _ = mapping.binding()
    target_not_null = await _not_null(conn, target.sql)
    source_not_null = await _not_null(conn, source.sql)
    risks = []
    for column in mapping.columns:
        if column not in target_not_null:
            continue
        node = _expression_node(mapping.expressions[column].sql)
        if may_be_null(node, source_not_null):
            risks.append(NullRisk(mapping.name, column, mapping.config.columns[column]))
    return risks


async def count_rejected(
    conn: asyncpg.Connection, mapping: CompiledMapping, risks: list[NullRisk]
) -> list[NullRisk]:
    """The risks with ``rows``: live source rows inside the filter the target would refuse."""
    if not risks:
        return []
    source, _, _ = mapping.binding()
    counts = ", ".join(
        f"count(*) FILTER (WHERE ({mapping.expressions[r.column].sql}) IS NULL) AS "
        f"{quote_ident(r.column)}"
        for r in risks
    )
    row = await conn.fetchrow(
        f"SELECT {counts} FROM {source.sql} AS src WHERE {mapping.filter_sql()}"
    )
    assert row is not None
    return [NullRisk(r.mapping, r.column, r.expression, int(row[r.column])) for r in risks]


def cross_database_note(mapping: CompiledMapping) -> str:
    return (
        f"note: mapping {mapping.name}: NOT NULL target columns not checked against the "
        "source's NULLs (the target is in another database)"
    )


async def setup_warnings(conn: asyncpg.Connection, mappings: list[CompiledMapping]) -> list[str]:
    """``setup``: one warning per maybe-NULL expression feeding a NOT NULL column."""
    lines = []
    for mapping in mappings:
        if mapping.cross_database:
            lines.append(cross_database_note(mapping))
            continue
        lines += [risk.setup_warning() for risk in await null_risks(conn, mapping)]
    return lines


async def check_lines(conn: asyncpg.Connection, mappings: list[CompiledMapping]) -> list[str]:
    """``check``: the same, with how many live source rows would be rejected now."""
    lines = []
    for mapping in mappings:
        if mapping.cross_database:
            lines.append(cross_database_note(mapping))
            continue
        risks = await count_rejected(conn, mapping, await null_risks(conn, mapping))
        lines += [risk.check_line() for risk in risks]
    return lines
