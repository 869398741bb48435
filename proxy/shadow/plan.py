"""Which captured reads the shadow replays, and each one's rewrite onto the new schema.

The rewrite works on pglast's tree, never on the text: every relation named under
``shadow.views`` is replaced by its view, aliased with the old relation's name so that column
references qualified by it still resolve. A name that a WITH query of the statement defines is
not a relation and is left alone. Unqualified names resolve through ``search_path`` as the
sidecar's configuration gives it (the application's own session may differ).

Only a single SELECT (including VALUES, TABLE and set operations) is eligible; whether it
really reads only is decided by PostgreSQL itself: the replay runs it in a READ ONLY
transaction, which refuses a write (a data-modifying WITH, nextval(), SELECT INTO).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType
from pglast.parser import ParseError, fingerprint, normalize
from pglast.stream import RawStream
from pglast.visitors import Visitor

#: texts whose plan (or ineligibility) is cached
MAX_CACHED_PLANS: Final = 5000
#: functions whose result differs between two runs in one transaction: a statement calling one
#: cannot be judged by comparing its answers (the A/A pair only catches that by chance when
#: the statement picks, say, one row in a hundred with ORDER BY random())
VOLATILE: Final = frozenset(
    {
        "random",
        "random_normal",
        "clock_timestamp",
        "statement_timestamp",
        "timeofday",
        "gen_random_uuid",
        "uuid_generate_v1",
        "uuid_generate_v4",
        "txid_current",
        "pg_backend_pid",
    }
)


@dataclass(frozen=True)
class ShadowPlan:
    """How one statement text is replayed."""

    #: the application's text, run as it is (the "old" side and the A/A baseline)
    original: str
    #: the text with the views in place (None: run the original on the other server)
    rewritten: str | None
    #: PostgreSQL's fingerprint of the statement: the shape results are grouped by
    fingerprint: str
    #: the statement with its literals replaced by $n (what a sample may show)
    normalized: str
    #: the top level has ORDER BY: rows are compared in order
    ordered: bool
    #: False under LIMIT/OFFSET without ORDER BY (which rows come back is not decided by the
    #: statement) or with a volatile function (see VOLATILE)
    deterministic: bool
    #: the tenant the top-level WHERE names (``tenant_column = 'constant'``), if any
    tenant: str | None = None
    #: or the parameter that holds it (``tenant_column = $n``: n)
    tenant_parameter: int | None = None


class Planner:
    """Decides eligibility and builds the rewrite, once per distinct text."""

    def __init__(
        self,
        views: dict[str, str],
        search_path: list[str],
        *,
        other_server: bool,
        tenant_columns: frozenset[str] = frozenset(),
    ) -> None:
        self.views = {_split(old): _split(new) for old, new in views.items()}
        self.search_path = search_path
        self.other_server = other_server
        self.tenant_columns = tenant_columns
        self._cache: OrderedDict[str, ShadowPlan | None] = OrderedDict()

    def plan(self, text: str) -> ShadowPlan | None:
        """The plan for a statement text, or None when the shadow does not replay it."""
        cache = self._cache
        if text in cache:
            cache.move_to_end(text)
            return cache[text]
        found = cache[text] = self._plan(text)
        if len(cache) > MAX_CACHED_PLANS:
            cache.popitem(last=False)
        return found

    def _plan(self, text: str) -> ShadowPlan | None:
        try:
            statements = parse_sql(text)
        except ParseError:
            return None
        if len(statements) != 1 or not isinstance(statements[0].stmt, ast.SelectStmt):
            return None
        select = statements[0].stmt
        volatile = _CallsVolatile()
        volatile(statements)
        rewritten: str | None = None
        if not self.other_server:
            ctes = _WithNames()
            ctes(statements)
            swap = _SwapRelations(self._resolve, ctes.names)
            swap(statements)
            if not swap.swapped:
                return None
            rewritten = RawStream()(statements)
        top = select
        ordered = bool(top.sortClause)
        limited = top.limitCount is not None or top.limitOffset is not None
        tenant, parameter = _tenant_filter(top.whereClause, self.tenant_columns)
        return ShadowPlan(
            original=text,
            rewritten=rewritten,
            fingerprint=fingerprint(text),
            normalized=normalize(text),
            ordered=ordered,
            deterministic=(ordered or not limited) and not volatile.found,
            tenant=tenant,
            tenant_parameter=parameter,
        )

    def _resolve(self, schema: str | None, name: str) -> tuple[str, str] | None:
        """The view for a relation as the statement names it (None: not under views)."""
        if schema is not None:
            return self.views.get((schema, name))
        for candidate in self.search_path:
            found = self.views.get((candidate, name))
            if found is not None:
                return found
        return None


def _tenant_filter(where: Any, columns: frozenset[str]) -> tuple[str | None, int | None]:
    """``(constant, None)`` or ``(None, n)`` when a top-level conjunct of WHERE is
    ``<tenant column> = <constant or $n>`` (either side, casts allowed); else (None, None)."""
    if where is None or not columns:
        return None, None
    conjuncts: tuple[Any, ...] = (
        where.args or ()
        if isinstance(where, ast.BoolExpr) and where.boolop == BoolExprType.AND_EXPR
        else (where,)
    )
    for expr in conjuncts:
        name: tuple[Any, ...] = expr.name or () if isinstance(expr, ast.A_Expr) else ()
        if not (
            isinstance(expr, ast.A_Expr)
            and expr.kind == A_Expr_Kind.AEXPR_OP
            and len(name) == 1
            and name[0].sval == "="
        ):
            continue
        for column, side in ((expr.lexpr, expr.rexpr), (expr.rexpr, expr.lexpr)):
            if not (isinstance(column, ast.ColumnRef) and column.fields):
                continue
            last = column.fields[-1]
            if not isinstance(last, ast.String) or last.sval not in columns:
                continue
            other = side
            while isinstance(other, ast.TypeCast):
                other = other.arg
            if isinstance(other, ast.ParamRef):
                return None, other.number
            if isinstance(other, ast.A_Const) and not other.isnull:
                value = other.val
                for attribute in ("ival", "sval", "fval", "boolval"):
                    if hasattr(value, attribute):
                        return str(getattr(value, attribute)), None
    return None, None


class _CallsVolatile(Visitor):
    """Finds a call of a function in VOLATILE."""

    def __init__(self) -> None:
        super().__init__()
        self.found = False

    def visit_FuncCall(self, ancestors: Any, node: ast.FuncCall) -> None:
        name = node.funcname[-1].sval if node.funcname else ""
        if name in VOLATILE:
            self.found = True


class _WithNames(Visitor):
    """The names WITH queries define anywhere in the statement."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def visit_CommonTableExpr(self, ancestors: Any, node: ast.CommonTableExpr) -> None:
        if node.ctename:
            self.names.add(node.ctename)


class _SwapRelations(Visitor):
    """Replaces each relation under views by its view (pglast's in-place visitor)."""

    def __init__(self, resolve: Any, ctes: set[str]) -> None:
        super().__init__()
        self.resolve = resolve
        self.ctes = ctes
        self.swapped = 0

    def visit_RangeVar(self, ancestors: Any, node: ast.RangeVar) -> ast.RangeVar | None:
        schema = node.schemaname or None
        name = node.relname or ""
        if schema is None and name in self.ctes:
            return None
        view = self.resolve(schema, name)
        if view is None:
            return None
        self.swapped += 1
        return ast.RangeVar(
            schemaname=view[0],
            relname=view[1],
            inh=node.inh,
            relpersistence=node.relpersistence,
            alias=node.alias or ast.Alias(aliasname=name),
        )


def _split(qualified: str) -> tuple[str, str]:
    schema, _, name = qualified.partition(".")
    return schema, name
