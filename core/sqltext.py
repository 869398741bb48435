"""SQL text the project builds itself: identifier and literal quoting, and parsing with pglast.

Every identifier that reaches generated SQL goes through :func:`quote_ident`; every expression
from configuration is parsed by the PostgreSQL parser and deparsed, never spliced as raw text.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from pglast import parse_sql
from pglast.ast import (
    A_Expr,
    CaseExpr,
    CollateClause,
    ColumnRef,
    CommonTableExpr,
    FuncCall,
    Node,
    RangeVar,
    ResTarget,
    SelectStmt,
    String,
    SubLink,
    TypeName,
)
from pglast.enums.parsenodes import A_Expr_Kind
from pglast.enums.primnodes import SubLinkType
from pglast.parser import ParseError
from pglast.stream import RawStream
from pglast.visitors import Skip, Visitor

from core.sqllex import neutral_text


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
    return f"pg_catalog.convert_from(pg_catalog.decode('{encoded}', 'base64'), 'UTF8')"


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


# --- pinning: expressions that resolve the same whatever the session's search_path -----------

_CATALOG: Final = "pg_catalog"
_NAME_OPERATORS: Final = frozenset(
    {
        A_Expr_Kind.AEXPR_OP,
        A_Expr_Kind.AEXPR_OP_ANY,
        A_Expr_Kind.AEXPR_OP_ALL,
        A_Expr_Kind.AEXPR_LIKE,
        A_Expr_Kind.AEXPR_ILIKE,
        A_Expr_Kind.AEXPR_SIMILAR,
    }
)


def pinned_select_list(viewdef: str) -> list[str]:
    """The select list of ``pg_get_viewdef`` text read under ``search_path = ''``, with every
    name PostgreSQL resolves through the search path made explicit.

    Under an empty path the server already qualified what is not in pg_catalog; what it left
    bare is pg_catalog's (functions, operators and types are never looked up in pg_temp, and
    validation has no temp relations). Each of those gets ``pg_catalog.``: functions, types,
    collations, relations in subqueries, and operators as ``OPERATOR(pg_catalog.=)``.
    Constructs that look an operator up by name without naming it (``IS DISTINCT FROM``,
    ``NULLIF``, ``CASE x WHEN``) are spelled out with a named one. Literals are respelled to
    read the same under either ``standard_conforming_strings``.
    """
    try:
        stmts = parse_sql(viewdef)
    except ParseError as exc:
        raise ValueError(f"cannot read back the pinned expressions: {exc}") from None
    stmt = stmts[0].stmt
    if not isinstance(stmt, SelectStmt) or not stmt.targetList:
        raise ValueError("the pinned expressions are not a select list")
    ctes = {
        str(cte.ctename)
        for _, cte in _nodes(stmt)
        if isinstance(cte, CommonTableExpr) and cte.ctename
    }
    out = []
    for target in stmt.targetList:
        assert isinstance(target, ResTarget)
        text = RawStream()(_pin(target.val, ctes))
        respelled = neutral_text(text, standard_conforming_strings=True)
        out.append(respelled.text if respelled is not None else text)
    return out


def _nodes(node: Any) -> Iterator[tuple[str | None, Any]]:
    """Every pglast node under ``node`` (with itself), parents first."""
    stack: list[Any] = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, Node):
            yield None, item
            stack.extend(getattr(item, name) for name in item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _qualified(names: Any) -> tuple[Any, ...]:
    names = tuple(names or ())
    return (String(sval=_CATALOG), *names) if len(names) == 1 else names


def _pin(node: Any, ctes: set[str]) -> Any:
    """``node`` with its children pinned first, then itself (a replacement or the same)."""
    if isinstance(node, (list, tuple)):
        return type(node)(_pin(item, ctes) for item in node)
    if not isinstance(node, Node):
        return node
    for name in node:
        value = getattr(node, name)
        if isinstance(value, (Node, list, tuple)):
            setattr(node, name, _pin(value, ctes))
    if isinstance(node, FuncCall):
        node.funcname = _qualified(node.funcname)
    elif isinstance(node, TypeName) and not node.pct_type:
        node.names = _qualified(node.names)
    elif isinstance(node, CollateClause):
        node.collname = _qualified(node.collname)
    elif isinstance(node, RangeVar) and not node.schemaname and node.relname not in ctes:
        node.schemaname = _CATALOG
    elif isinstance(node, SubLink) and node.subLinkType in (
        SubLinkType.ANY_SUBLINK,
        SubLinkType.ALL_SUBLINK,
    ):
        node.operName = _qualified(node.operName or (String(sval="="),))
    elif isinstance(node, A_Expr):
        return _pinned_operator(node)
    elif isinstance(node, CaseExpr) and node.arg is not None:
        return _expression(
            "CASE "
            + " ".join(
                f"WHEN ({_sql(node.arg)}) OPERATOR(pg_catalog.=) ({_sql(when.expr)}) "
                f"THEN {_sql(when.result)}"
                for when in node.args or ()
            )
            + (f" ELSE {_sql(node.defresult)}" if node.defresult is not None else "")
            + " END"
        )
    return node


def _pinned_operator(node: A_Expr) -> Any:
    kind = node.kind
    if kind in _NAME_OPERATORS:
        node.name = _qualified(node.name)
        return node
    left, right = _sql(node.lexpr), _sql(node.rexpr)
    equal = f"({left}) OPERATOR(pg_catalog.=) ({right})"
    if kind == A_Expr_Kind.AEXPR_DISTINCT:
        return _expression(
            f"CASE WHEN ({left}) IS NULL THEN ({right}) IS NOT NULL "
            f"WHEN ({right}) IS NULL THEN true ELSE NOT ({equal}) END"
        )
    if kind == A_Expr_Kind.AEXPR_NOT_DISTINCT:
        return _expression(
            f"CASE WHEN ({left}) IS NULL THEN ({right}) IS NULL "
            f"WHEN ({right}) IS NULL THEN false ELSE {equal} END"
        )
    if kind == A_Expr_Kind.AEXPR_NULLIF:
        return _expression(f"CASE WHEN {equal} THEN NULL ELSE ({left}) END")
    # IN, BETWEEN: pg_get_viewdef prints them as = ANY (...) and >= / <= already
    raise ValueError(f"cannot pin operator construct {kind!r}")


def _sql(node: Any) -> str:
    return str(RawStream()(node))


def _expression(text: str) -> Node:
    stmt = parse_sql(f"SELECT {text}")[0].stmt
    assert isinstance(stmt, SelectStmt)
    assert stmt.targetList
    target = stmt.targetList[0]
    assert isinstance(target, ResTarget)
    assert target.val is not None
    return target.val


def check_select(text: str) -> str:
    """``text`` if it is one SELECT (no data-modifying WITH, no INTO); ValueError otherwise.

    Queries from configuration (invariants) are also run in read-only transactions; this
    check names the mistake at load instead of at the first run.
    """
    try:
        stmts = parse_sql(text)
    except ParseError as exc:
        raise ValueError(f"invalid SQL: {exc}") from None
    stmt = stmts[0].stmt if len(stmts) == 1 else None
    if not isinstance(stmt, SelectStmt) or stmt.intoClause is not None:
        raise ValueError("must be exactly one SELECT statement")
    ctes = stmt.withClause.ctes if stmt.withClause is not None else ()
    if any(not isinstance(getattr(cte, "ctequery", None), SelectStmt) for cte in ctes or ()):
        raise ValueError("a WITH query must be a SELECT (no INSERT/UPDATE/DELETE)")
    return text


def qualified_sql(expression: ParsedExpression, alias: str) -> str:
    """The expression with its unqualified column references qualified by ``alias``.

    So it names the aliased row's columns wherever it is spliced, even where another row is
    in scope too (``EXCLUDED`` in ON CONFLICT DO UPDATE). References inside sub-SELECTs are
    left alone (they may name the subquery's own tables).
    """
    stmt = parse_sql(f"SELECT ({expression.sql})")[0].stmt
    assert isinstance(stmt, SelectStmt)
    assert stmt.targetList
    target = stmt.targetList[0]
    assert isinstance(target, ResTarget)
    assert target.val is not None

    class Qualify(Visitor):
        def visit_SubLink(self, _ancestors: Any, node: Any) -> Any:
            if node.testexpr is not None:
                self(node.testexpr)  # ``col IN (SELECT ...)``: the col is ours
            return Skip

        def visit_ColumnRef(self, _ancestors: Any, node: ColumnRef) -> None:
            name = _simple_name(node)
            if name is not None:
                node.fields = (String(sval=alias), String(sval=name))

    Qualify()(target.val)
    return str(RawStream()(target.val))
