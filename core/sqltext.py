"""SQL text the project builds itself: identifier and literal quoting, and parsing with pglast.

Every identifier that reaches generated SQL goes through :func:`quote_ident`; every expression
from configuration is parsed by the PostgreSQL parser and deparsed, never spliced as raw text.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from pglast import parse_sql
from pglast.ast import ColumnRef, Node, RangeVar, ResTarget, SelectStmt, String
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Skip, Visitor


def quote_ident(name: str) -> str:
    """Always-quoted identifier: safe for any name, keeps its case."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """A string literal that reads the same whatever ``standard_conforming_strings`` is."""
    escaped = value.replace("\\", "\\\\").replace("'", "''")
    return f"E'{escaped}'"


def utf8_literal(value: str) -> str:
    """A text expression decoding to ``value``, with no quotes, backslashes or dollars in it.

    Used where generated SQL embeds arbitrary text inside a dollar-quoted body (DO blocks).
    """
    encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
    return f"convert_from(decode('{encoded}', 'base64'), 'UTF8')"


@dataclass(frozen=True, order=True)
class QualifiedName:
    """A schema-qualified relation name as PostgreSQL stores it (case already folded)."""

    schema: str
    name: str

    @property
    def sql(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def parse_relation_name(text: str) -> tuple[str | None, str]:
    """``public.users``, ``"Odd"."Name"`` or ``users`` -> (schema or None, name), case folded."""
    try:
        stmts = parse_sql(f"SELECT FROM {text}")
    except ParseError as exc:
        raise ValueError(f"not a table name: {text!r} ({exc})") from None
    stmt = stmts[0].stmt if len(stmts) == 1 else None
    if not isinstance(stmt, SelectStmt) or not stmt.fromClause or len(stmt.fromClause) != 1:
        raise ValueError(f"not a table name: {text!r}")
    rel = stmt.fromClause[0]
    if not isinstance(rel, RangeVar) or rel.alias is not None or rel.catalogname or not rel.relname:
        raise ValueError(f"not a table name: {text!r}")
    return rel.schemaname, rel.relname


@dataclass(frozen=True)
class ParsedExpression:
    """A scalar SQL expression from config, deparsed to canonical text."""

    sql: str
    #: unqualified column names it mentions (some may belong to tables inside subqueries)
    column_names: frozenset[str]


def _ref_fields(node: ColumnRef) -> tuple[Any, ...]:
    return tuple(node.fields or ())


def _simple_name(node: ColumnRef) -> str | None:
    """The name of an unqualified column reference, else None."""
    fields = _ref_fields(node)
    if len(fields) == 1 and isinstance(fields[0], String) and fields[0].sval:
        return str(fields[0].sval)
    return None


class _ColumnRefs(Visitor):
    """Collects every unqualified column name in an expression tree."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_ColumnRef(self, _ancestors: Any, node: ColumnRef) -> None:
        name = _simple_name(node)
        if name is not None:
            self.names.add(name)


def parse_expression(text: str) -> ParsedExpression:
    """Parse one scalar expression; raise ValueError with the parser's reason if it is not one.

    A qualified column reference (``users.id``) is allowed only inside a subquery, because the
    same expression is evaluated over rows that do not come from the source table by name.
    """
    try:
        stmts = parse_sql(f"SELECT ({text})")
    except ParseError as exc:
        raise ValueError(f"invalid SQL expression {text!r}: {exc}") from None
    stmt = stmts[0].stmt if len(stmts) == 1 else None
    if (
        not isinstance(stmt, SelectStmt)
        or stmt.fromClause
        or stmt.whereClause
        or stmt.groupClause
        or stmt.havingClause
        or stmt.sortClause
        or stmt.limitCount
        or stmt.valuesLists
        or (stmt.op != 0 and str(stmt.op) != "SETOP_NONE")
        or not stmt.targetList
        or len(stmt.targetList) != 1
    ):
        raise ValueError(f"not a single SQL expression: {text!r}")
    target = stmt.targetList[0]
    assert isinstance(target, ResTarget)
    assert target.val is not None
    expr: Node = target.val
    refs = _ColumnRefs()
    refs(expr)
    outer_qualified = _qualified_outside_subqueries(expr)
    if outer_qualified:
        raise ValueError(
            f"column references must be unqualified (got {outer_qualified[0]!r} in {text!r})"
        )
    return ParsedExpression(RawStream()(expr), frozenset(refs.names))


def _qualified_outside_subqueries(expr: Node) -> list[str]:
    """Qualified or star column refs that are not inside a sub-SELECT."""
    found: list[str] = []

    class Outer(Visitor):
        def visit_SubLink(self, _ancestors: Any, _node: Any) -> Any:
            return Skip  # refs inside subqueries may name the subquery's tables

        def visit_ColumnRef(self, _ancestors: Any, node: ColumnRef) -> None:
            if _simple_name(node) is None:
                found.append(".".join(getattr(f, "sval", "*") for f in _ref_fields(node)))

    Outer()(expr)
    return found
