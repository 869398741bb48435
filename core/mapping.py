"""The compiled mapping: the facts and shared SQL fragments every part builds its statements from.

The proxy's rewrite, ``sync_keys`` (applier, repair, backfill) and the reconciler each build
their own statements (proxy/mirror_sql.py, mirror/statements.py, compare/rows.py and
compare/statements.py; the delete function's DDL is core/control.py's), but all of them from one
:class:`CompiledMapping` and its fragments: the expected target rows of a source relation, the
key as JSON, the filter, which target rows the mapping owns (``target_filter``), the upsert
that skips unchanged rows. So they cannot disagree about what the target should hold.
Expressions are parsed by PostgreSQL's parser (pglast) and deparsed; identifiers are always
quoted. Compiling needs no database; :func:`bind_catalog` later adds what only the live
database knows (resolved names, column and key types).

Conventions of the generated SQL: source rows are always read through the alias ``src``, so a
mapping expression (which names source columns unqualified) means the same thing whether
``src`` is the source table, the rows a rewritten statement returned, or a keyset chunk.
Keys travel as a JSON array of the key values (``jsonb``): one text-safe representation for
any key type, independent of the session's DateStyle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from core.config import Config, MappingConfig
from core.errors import MappingValidationError
from core.modes import Capture, MirrorMode
from core.sqltext import (
    ParsedExpression,
    QualifiedName,
    parse_expression,
    parse_relation_name,
    qualified_sql,
    quote_ident,
)

#: alias of the source row in every generated statement
SRC = "src"
#: alias of the target row in every generated statement
TGT = "tgt"
#: column types without an equality operator: compared as text when deciding to update
_NO_EQUALITY = frozenset({"xml", "point", "line", "lseg", "box", "path", "polygon", "circle"})


@dataclass(frozen=True)
class CatalogFacts:
    """What validation learnt from the live database about one mapping."""

    #: SQL type of each key expression (format_type), in key order
    key_types: tuple[str, ...]
    #: every column of the source table, in attnum order
    source_columns: tuple[str, ...]
    #: source columns the mapping reads (expressions and filter), in attnum order
    source_columns_read: tuple[str, ...]
    #: the source table has rules, so writes to it cannot be rewritten
    source_has_rules: bool = False
    #: the source is partitioned or has inheritance children: a row written through it may
    #: land in another table (its ``tableoid`` is the child's)
    source_has_children: bool = False
    #: SQL type (with typmod) of each target column, in ``columns`` order
    target_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class CutoverRole:
    """A mapping's part in a staged cutover (``cutover:`` in the config)."""

    #: forward (old -> new): leaves the moved tenants out; reverse (new -> old): takes only them
    direction: Literal["forward", "reverse"]
    #: the other mapping of the pair
    partner: str
    #: the moved tenants (as text)
    tenants: tuple[str, ...]

    def phase(self, tenant: str) -> Literal["forward", "moved"]:
        """Which schema is the source of truth for ``tenant``: old (forward) or new (moved)."""
        return "moved" if tenant in self.tenants else "forward"


def moved_tenant_sql(value_sql: str, tenants: Sequence[str]) -> str:
    """Whether ``value_sql`` (a tenant id) is one of the moved ``tenants``: compared as text,
    like ``--tenant``; never NULL (a NULL tenant is not moved); operators named in full."""
    if not tenants:
        return "false"
    items = ", ".join("'" + t.replace("'", "''") + "'" for t in tenants)
    return (
        f"coalesce(({value_sql})::pg_catalog.text OPERATOR(pg_catalog.=) "
        f"ANY (ARRAY[{items}]::pg_catalog.text[]), false)"
    )


def cutover_predicates(
    config: MappingConfig, role: CutoverRole
) -> tuple[str | None, str | None]:
    """The ``filter`` and ``target_filter`` texts of a mapping in a staged cutover: its own,
    narrowed to the tenants its direction carries (forward: all but the moved ones; reverse:
    only the moved ones). A forward mapping with no tenant moved keeps its own texts."""
    column = config.tenant_column
    if column is None:  # refused at config load
        raise ValueError(f"mapping {config.name} is in a cutover without a tenant_column")
    if role.direction == "forward" and not role.tenants:
        return config.filter, config.target_filter
    source_side = moved_tenant_sql(config.columns[column], role.tenants)
    target_side = moved_tenant_sql(quote_ident(column), role.tenants)
    if role.direction == "forward":
        source_side, target_side = f"NOT {source_side}", f"NOT {target_side}"

    def both(own: str | None, tenant: str) -> str:
        return tenant if own is None else f"({own}) AND {tenant}"

    return both(config.filter, source_side), both(config.target_filter, target_side)


class Binding(NamedTuple):
    """What :func:`bind_catalog` added to a mapping: its resolved tables and catalog facts."""

    source: QualifiedName
    target: QualifiedName
    catalog: CatalogFacts


@dataclass(frozen=True)
class CompiledMapping:
    """A mapping ready to generate SQL. Immutable; ``bind_catalog`` returns a bound copy."""

    name: str
    config: MappingConfig
    #: as written in config; ``source``/``target`` are set once resolved
    source_schema: str | None
    source_name: str
    target_schema: str | None
    target_name: str
    columns: tuple[str, ...]
    expressions: dict[str, ParsedExpression]
    key: tuple[str, ...]
    filter: ParsedExpression | None
    #: which target rows the mapping owns (``target_filter``), over the target row ``tgt``
    target_filter: ParsedExpression | None = None
    catalog: CatalogFacts | None = None
    source: QualifiedName | None = None
    target: QualifiedName | None = None
    #: unqualified column names the expressions and filter mention
    mentioned: frozenset[str] = field(default_factory=frozenset)
    #: unqualified column names the key expressions mention
    key_mentioned: frozenset[str] = field(default_factory=frozenset)
    #: its part in a staged cutover (None: not in one; filters already narrowed when set)
    cutover: CutoverRole | None = None

    # --- identity -----------------------------------------------------------------------

    @property
    def mode(self) -> MirrorMode:
        return self.config.mode

    @property
    def capture(self) -> Capture:
        return self.config.capture

    @property
    def cross_database(self) -> bool:
        """The target table lives in another database than the source."""
        return self.config.target_dsn is not None

    def binding(self) -> Binding:
        """The resolved source and target tables and the catalog facts (what SQL needs).

        Raises RuntimeError when the mapping was not validated against the database: every
        statement names the resolved tables, so unbound SQL would be a bug, never a guess.
        """
        if self.source is None or self.target is None or self.catalog is None:
            raise RuntimeError(f"mapping {self.name} is not bound to the catalog")
        return Binding(self.source, self.target, self.catalog)

    # --- fragments ------------------------------------------------------------------------

    def key_exprs(self) -> list[str]:
        """SQL of each key expression, over ``src``."""
        return [f"({self.expressions[k].sql})" for k in self.key]

    def filter_sql(self) -> str:
        """The filter as a condition that is never NULL (a NULL filter means not included)."""
        if self.filter is None:
            return "true"
        return f"coalesce(({self.filter.sql}), false)"

    def owned_sql(self) -> str:
        """Whether the target row ``tgt`` is one this mapping owns (``target_filter``; never
        NULL). Reconcile, repair, backfill and the delete paths look only at owned rows."""
        if self.target_filter is None:
            return "true"
        return f"coalesce(({qualified_sql(self.target_filter, TGT)}), false)"

    def key_json_sql(self) -> str:
        """The key of a source row as a jsonb array (how keys travel through the outbox)."""
        return "pg_catalog.jsonb_build_array(" + ", ".join(self.key_exprs()) + ")"

    def target_column_list(self) -> str:
        return ", ".join(quote_ident(c) for c in self.columns)

    def target_key_list(self, alias: str | None = None) -> str:
        prefix = f"{alias}." if alias else ""
        return ", ".join(prefix + quote_ident(k) for k in self.key)

    def select_list(self) -> str:
        """``<expr> AS "col", ...`` over ``src``, in target column order."""
        return ", ".join(f"({self.expressions[c].sql}) AS {quote_ident(c)}" for c in self.columns)

    def keys_from_json_sql(self, param: str) -> str:
        """Rows ``(k1, k2, ...)`` of typed key values from a jsonb array of key arrays."""
        _, _, catalog = self.binding()
        parts = [
            f"(k.value->>{i})::{typ} AS {quote_ident(f'k{i + 1}')}"
            for i, typ in enumerate(catalog.key_types)
        ]
        return f"SELECT {', '.join(parts)} FROM jsonb_array_elements({param}) AS k"

    def key_tuple_names(self) -> str:
        """The column names of :meth:`keys_from_json_sql`'s rows, as a list."""
        return ", ".join(quote_ident(f"k{i + 1}") for i in range(len(self.key)))

    def expected_rows_sql(self, from_sql: str, *, where: str = "true") -> str:
        """Target rows the mapping says ``from_sql`` (aliased ``src``) produces."""
        return (
            f"SELECT {self.select_list()} FROM {from_sql} AS {SRC} "
            f"WHERE {self.filter_sql()} AND ({where})"
        )

    def upsert_sql(self, rows_sql: str) -> str:
        """INSERT ... ON CONFLICT DO UPDATE of ``rows_sql`` (target columns in order).

        The rewrite (sync mode) and ``sync_keys`` both write the target through this, so they
        agree on what counts as a change (and a sync-mode target sees one kind of write).
        """
        _, target, _ = self.binding()
        return (
            f"INSERT INTO {target.sql} AS {TGT} ({self.target_column_list()}) "
            f"{rows_sql} {self._on_conflict_update()}"
        )

    def _on_conflict_update(self) -> str:
        others = [c for c in self.columns if c not in self.key]
        if not others:
            return f"ON CONFLICT ({self.target_key_list()}) DO NOTHING"
        sets = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in others)
        current = ", ".join(self._comparable(f"{TGT}.{quote_ident(c)}", c) for c in others)
        excluded = ", ".join(self._comparable(f"EXCLUDED.{quote_ident(c)}", c) for c in others)
        # Never overwrite a row another writer owns (target_filter).
        owned = "" if self.target_filter is None else f"{self.owned_sql()} AND "
        # Skip rows that would not change: no new row version, no WAL, no trigger work. As
        # records, compared by record equality (NULLs equal to each other, like IS NOT
        # DISTINCT FROM), through an operator named in full: this runs in the application's
        # session, under its search_path.
        return (
            f"ON CONFLICT ({self.target_key_list()}) DO UPDATE SET {sets} "
            f"WHERE {owned}NOT (ROW({current})::pg_catalog.record OPERATOR(pg_catalog.=) "
            f"ROW({excluded})::pg_catalog.record)"
        )

    def _comparable(self, ref: str, column: str) -> str:
        """``ref`` in a form with an equality operator (json, xml and geometry have none)."""
        types = self.catalog.target_types if self.catalog is not None else ()
        if not types:
            return ref
        base = types[self.columns.index(column)].partition("(")[0].strip()
        if base == "json":
            return f"{ref}::pg_catalog.jsonb"
        if base in _NO_EQUALITY:
            return f"{ref}::pg_catalog.text"
        return ref


def compile_mapping(
    config: MappingConfig, *, source: str | None = None, cutover: CutoverRole | None = None
) -> CompiledMapping:
    """Parse a mapping's names and expressions; raise MappingValidationError naming the problem.

    With ``cutover``, the filter and target_filter are the mapping's own narrowed to the
    tenants its direction carries (:func:`cutover_predicates`): every consumer (rewrite,
    applier, repair, backfill, reconciler, delete function) then sees the narrowed ones.
    """
    row_filter, target_filter = config.filter, config.target_filter
    if cutover is not None:
        row_filter, target_filter = cutover_predicates(config, cutover)
    try:
        source_schema, source_name = parse_relation_name(config.source)
        target_schema, target_name = parse_relation_name(config.target)
    except ValueError as exc:
        raise MappingValidationError(config.name, str(exc), source=source) from None
    expressions: dict[str, ParsedExpression] = {}
    for column, text in config.columns.items():
        try:
            expressions[column] = parse_expression(text)
        except ValueError as exc:
            raise MappingValidationError(
                config.name, f"columns.{column}: {exc}", source=source
            ) from None
    filter_expr = None
    if row_filter is not None:
        try:
            filter_expr = parse_expression(row_filter)
        except ValueError as exc:
            raise MappingValidationError(config.name, f"filter: {exc}", source=source) from None
    owned = None
    if target_filter is not None:
        try:
            owned = parse_expression(target_filter)
        except ValueError as exc:
            raise MappingValidationError(
                config.name, f"target_filter: {exc}", source=source
            ) from None
    mentioned = set().union(*(e.column_names for e in expressions.values()))
    if filter_expr is not None:
        mentioned |= filter_expr.column_names
    key_mentioned = set().union(*(expressions[k].column_names for k in config.key))
    return CompiledMapping(
        name=config.name,
        config=config,
        source_schema=source_schema,
        source_name=source_name,
        target_schema=target_schema,
        target_name=target_name,
        columns=tuple(config.columns),
        expressions=expressions,
        key=tuple(config.key),
        filter=filter_expr,
        target_filter=owned,
        mentioned=frozenset(mentioned),
        key_mentioned=frozenset(key_mentioned),
        cutover=cutover,
    )


def cutover_roles(config: Config) -> dict[str, CutoverRole]:
    """Each mapping in a cutover pair (by name): its direction, partner and the moved tenants."""
    tenants = tuple(config.cutover.tenants)
    roles: dict[str, CutoverRole] = {}
    for forward, reverse in config.cutover.reverse.items():
        roles[forward] = CutoverRole("forward", reverse, tenants)
        roles[reverse] = CutoverRole("reverse", forward, tenants)
    return roles


def compile_all(config: Config, *, source: str | None = None) -> list[CompiledMapping]:
    """Compile every mapping of the config (each checked on its own; validation checks
    the ones that only make sense together against the database)."""
    roles = cutover_roles(config)
    return [
        compile_mapping(m, source=source, cutover=roles.get(m.name)) for m in config.mappings
    ]


def bind_catalog(
    mapping: CompiledMapping,
    *,
    source: QualifiedName,
    target: QualifiedName,
    catalog: CatalogFacts,
) -> CompiledMapping:
    """A copy of ``mapping`` that knows its resolved tables and types."""
    return replace(mapping, source=source, target=target, catalog=catalog)


def pin_expressions(mapping: CompiledMapping, texts: dict[str, str]) -> CompiledMapping:
    """A copy whose expressions (by target column; the filter under ``""``) read ``texts``:
    the same expressions with every name resolved (see core/catalog.py's pinning)."""
    expressions = {c: replace(e, sql=texts[c]) for c, e in mapping.expressions.items()}
    filter_expr = mapping.filter
    if filter_expr is not None:
        filter_expr = replace(filter_expr, sql=texts[""])
    return replace(mapping, expressions=expressions, filter=filter_expr)


def read_columns(mappings: Sequence[CompiledMapping]) -> tuple[str, ...]:
    """Source columns any of these mappings read, in source attnum order (sources in turn,
    when the mappings have several: a name that several tables have)."""
    needed: set[str] = set()
    order: dict[str, None] = {}
    for mapping in mappings:
        _, _, catalog = mapping.binding()
        needed.update(catalog.source_columns_read)
        order.update(dict.fromkeys(catalog.source_columns))
    return tuple(c for c in order if c in needed)
