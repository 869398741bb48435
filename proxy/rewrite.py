"""Rewrites application writes to mapped tables into one statement that also mirrors them.

A write to a mapped source table becomes a single statement with data-modifying CTEs, so
PostgreSQL computes the affected rows and the mirror lands atomically with the write:

    WITH __dualwrite AS (
    <the application's statement, intact>
    RETURNING <its own RETURNING list, if any>, <source columns the mappings read>
    ), __dualwrite_src AS (SELECT <those columns under their own names> FROM __dualwrite)
    , __dualwrite_m1 AS (<sync: upsert/delete in the target | outbox: INSERT of the keys>)
    SELECT __dualwrite.*, <per mapping: rows it includes>  -- or SELECT count(*), <those>
                                                           --    when it asked for no rows

The application's own text is kept byte for byte: the rewrite only inserts text at the
statement's start (or before its main keyword when it starts with WITH) and at its end, at
positions the PostgreSQL parser reports. The analysis of a statement is cached by its
*normalized* text (literals replaced by placeholders), so clients that inline literal values
pay for parsing once per statement shape; only the cheap position split runs per statement.

Statements that cannot be rewritten safely get the mapping's ``unsupported`` policy:
``passthrough`` (forwarded unchanged, counted, recorded for the reconciler) or ``reject``
(replaced by a statement that raises a clear error, so nothing is written).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pglast import parser as pgparser

from core import metrics
from core.control import MappingStates, delete_call_sql
from core.errors import STATEMENT_REJECTED
from core.mapping import SRC, CompiledMapping, read_columns
from core.sqllex import Respelled
from core.sqltext import QualifiedName, quote_ident, utf8_literal
from proxy.classify import READ, first_keyword, statement_kind
from proxy.mirror_sql import outbox_capture_sql, upsert_sql, written_to_source_sql

CTE: Final = "__dualwrite"
SRC_CTE: Final = "__dualwrite_src"
COLUMN_PREFIX: Final = "__dualwrite_c"
#: the ``tableoid`` of a changed row, when the statement named its table unqualified
TABLE_COLUMN: Final = "__dualwrite_t"
#: the per-mapping counts of rows written to each target, after everything else
WRITTEN_PREFIX: Final = "__dualwrite_n"

PASS, REWRITE, UNMIRRORED, REJECT = "pass", "rewrite", "unmirrored", "reject"

_CACHE_COUNTS: Final = metrics.HOT.rewrite_cache

_WRITE_NODES: Final = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
_TAGS: Final = {"InsertStmt": b"INSERT 0 ", "UpdateStmt": b"UPDATE ", "DeleteStmt": b"DELETE "}
_OPERATIONS: Final = {"InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete"}
_KEYWORDS: Final = {"InsertStmt": "INSERT", "UpdateStmt": "UPDATE", "DeleteStmt": "DELETE_P"}

#: what PostgreSQL's scanner calls comments (they are kept as tokens by pglast's scan)
_COMMENT_TOKENS: Final = frozenset({"C_COMMENT", "SQL_COMMENT"})

_REASON_BY_OUTER: Final = {"PrepareStmt": "prepare", "ExplainStmt": "explain"}

REASONS: Final = {
    "copy": "COPY into a mapped table cannot be mirrored row by row",
    "where_current_of": "UPDATE/DELETE ... WHERE CURRENT OF cannot be rewritten",
    "merge": "MERGE into a mapped table cannot be rewritten",
    "truncate": "TRUNCATE of a mapped table is not mirrored",
    "writable_cte": "a data-modifying WITH clause writes a mapped table",
    "key_update": "the UPDATE assigns a column the target key is computed from",
    "rules": "the table has rules",
    "prepare": "SQL-level PREPARE of a write to a mapped table",
    "unparseable": "the statement could not be parsed",
    "explain": "EXPLAIN ANALYZE executes the write without a way to mirror it",
    "multiple_writes": "the statement writes a mapped table more than once",
    "lexing": (
        "the statement reads differently with standard_conforming_strings on and off, and a "
        "statement still in flight may be changing it"
    ),
}


@dataclass(frozen=True)
class StatementReply:
    """What the response repair needs to know about one rewritten statement."""

    #: command tag prefix the application expects (``UPDATE ``, ``INSERT 0 ``, ``DELETE ``)
    tag: bytes
    operation: str
    #: the application asked for rows (RETURNING); else the rewrite returns one count row
    returning: bool
    #: columns the rewrite appended to the application's RETURNING list (the source columns
    #: the mappings read, then one written-rows count per mapping)
    extra_columns: int
    #: each row ends with (and a no-RETURNING count row follows its count with) the number of
    #: rows written to each mapping's target, in this order
    mappings: tuple[str, ...]
    #: (schema, table) of targets written in the same statement (sync mode): their errors
    #: are mirror failures. Both parts: a target often has its source's table name.
    targets: frozenset[tuple[str, str]]


@dataclass(slots=True)
class Template:
    """The cached analysis of one statement shape (treated as immutable once built)."""

    action: str
    reason: str | None = None
    mappings: tuple[str, ...] = ()
    node: str = ""
    #: the statement begins with its own WITH clause: ours goes before its main keyword
    has_with: bool = False
    prefix: str = ""
    suffix: str = ""
    reply: StatementReply | None = None
    #: the plan every statement of this shape gets (built once, not per statement)
    plan: StatementPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.plan = StatementPlan(self.action, self)


# Built per statement on the hot path: plain slotted classes (a frozen dataclass's __init__
# goes through object.__setattr__ for every field).


@dataclass(slots=True)
class Insertion:
    """Text the rewrite inserted: at ``at`` (index into the rewritten text), ``length`` chars."""

    at: int
    length: int


@dataclass(slots=True)
class StatementPlan:
    """What happens to one statement of a Query or Parse."""

    action: str
    template: Template


@dataclass(slots=True)
class Rewritten:
    """The result for one Query or Parse text."""

    sql: str
    statements: tuple[StatementPlan, ...]
    insertions: tuple[Insertion, ...]

    @property
    def changed(self) -> bool:
        return bool(self.insertions) or any(s.action == REJECT for s in self.statements)

    def original_position(self, position: int) -> int | None:
        """Map a 1-based character position in the rewritten text back to the original."""
        shift = 0
        for insertion in self.insertions:
            if position - 1 < insertion.at:
                break
            if position - 1 < insertion.at + insertion.length:
                return None  # inside text the rewrite added
            shift += insertion.length
        return position - shift

    def respelled_from(self, respelled: Respelled) -> Rewritten:
        """This result, planned on ``respelled.text``, as a result for the text before it was
        respelled: the respelling's insertions join the rewrite's, so error positions map
        back to the application's own text."""
        moved: list[Insertion] = []
        added = 0  # length the rewrite inserted before the current respelled position
        ours = iter(self.insertions)
        pending = next(ours, None)
        for at, length in respelled.insertions:
            # a rewrite insertion at or before ``at`` (in respelled coordinates) shifts it
            while pending is not None and pending.at - added <= at:
                added += pending.length
                pending = next(ours, None)
            moved.append(Insertion(at + added, length))
        merged = sorted([*self.insertions, *moved], key=lambda i: i.at)
        return Rewritten(self.sql, self.statements, tuple(merged))


def _statement_slices(text: str, statements: int) -> tuple[slice, ...]:
    """Where each statement of ``text`` starts and ends (without the ``;`` and blanks).

    One statement without comments needs no parser: it spans the text minus surrounding
    blanks and semicolons (a statement cannot end in a bare ``;`` of its own). Anything else
    is split by PostgreSQL's parser.
    """
    if statements == 1 and "--" not in text and "/*" not in text:
        stop = len(text.rstrip(" \t\r\n\f\v;"))
        start = len(text) - len(text.lstrip(" \t\r\n\f\v"))
        if start < stop:
            return (slice(start, stop),)
    return tuple(pgparser.split(text, with_parser=True, only_slices=True))


def _single_read(sql: bytes) -> bool:
    """True for one statement that begins with a read-only keyword (not WITH)."""
    if statement_kind(sql) != READ or first_keyword(sql) == b"with":
        return False
    # A ';' before the end may start a second statement (or sit in a literal: then the
    # full analysis decides, which is only slower).
    return sql.rstrip(b" \t\r\n;").find(b";") < 0


def _without_comments(text: str) -> str:
    """The statement's tokens without comments (for the shape key), by PostgreSQL's own lexer.

    Comments may carry per-request data (sqlcommenter trace ids); keyed with them, every
    statement would be a new shape.
    """
    if "--" not in text and "/*" not in text:
        return text
    return " ".join(
        text[t.start : t.end + 1] for t in pgparser.scan(text) if t.name not in _COMMENT_TOKENS
    )


def _needles(name: str) -> tuple[bytes, ...]:
    """How a table name can appear in statement bytes, lower-cased the way ``candidate`` lowers
    them (ASCII only): as is, and quoted, where a ``"`` in the name is written twice."""
    raw = name.encode("utf-8")
    return tuple({raw.lower(), raw.replace(b'"', b'""').lower()})


def _explain_executes(fields: dict[str, Any]) -> bool:
    """EXPLAIN only runs the statement with the ANALYZE option."""
    for option in fields.get("options", []):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "analyze":
            arg = elem.get("arg")
            return arg is None or "false" not in json.dumps(arg).lower()
    return False


def _assigned_columns(node: str, fields: dict[str, Any]) -> set[str]:
    """Columns an UPDATE (or an INSERT's ON CONFLICT DO UPDATE) assigns."""
    if node == "UpdateStmt":
        targets = fields.get("targetList", [])
    elif node == "InsertStmt":
        targets = (fields.get("onConflictClause") or {}).get("targetList", [])
    else:
        return set()
    return {t["ResTarget"]["name"] for t in targets if "ResTarget" in t}


def _walk(node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (node type, fields) in a parse tree from parse_sql_json."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key[:1].isupper() and isinstance(value, dict):
                    yield key, value
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


class Rewriter:
    """Plans and builds rewrites for one sidecar's mappings; caches by statement shape."""

    def __init__(
        self,
        mappings: Sequence[CompiledMapping],
        *,
        states: MappingStates,
        cache_size: int = 4096,
    ) -> None:
        # A mapping captured from the WAL alone is not the rewrite's: its writes are relayed
        # untouched, as if the table were not mapped (the WAL reader captures them).
        self.mappings = [m for m in mappings if m.capture.rewrites_statements]
        self.states = states
        self.by_source: dict[QualifiedName, list[CompiledMapping]] = {}
        for mapping in self.mappings:
            assert mapping.source is not None
            self.by_source.setdefault(mapping.source, []).append(mapping)
        #: table name -> the mapped sources of that name, in any schema: what an unqualified
        #: name may mean in a session (its search_path and temp tables decide, per statement)
        self.by_name: dict[str, list[QualifiedName]] = {}
        for source in self.by_source:
            self.by_name.setdefault(source.name, []).append(source)
        #: lower-cased table names that make a statement worth a closer look
        self.needles = tuple({n for s in self.by_source for n in _needles(s.name)})
        self._shapes: OrderedDict[tuple[str, int], tuple[Template, ...] | None] = OrderedDict()
        self._texts: OrderedDict[tuple[str, int], Rewritten | None] = OrderedDict()
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0

    # --- entry points -------------------------------------------------------------------

    def candidate(self, sql: bytes, lowered: bytes | None = None) -> bool:
        """Cheap pre-filter: could this text write a mapped table at all?

        A single statement that starts with SELECT, VALUES, TABLE, SHOW or FETCH writes
        nothing (what functions it calls may, but no rewrite could see that); only text that
        names a mapped table, or spells a name with Unicode escapes, is looked at further.
        """
        if lowered is None:
            lowered = sql.lower()
        # U&"\0061..." spells any name: the parser resolves it, so let the parser look.
        # (bytes.find: ``in`` first tries the needle as an int and raises inside, ~5x slower)
        if lowered.find(b"u&") < 0:
            for needle in self.needles:
                if lowered.find(needle) >= 0:
                    break
            else:
                return False
        return not _single_read(sql)

    def rewrite(self, text: str, *, remember_text: bool = True) -> Rewritten | None:
        """Plan a Query's or Parse's SQL text; None when nothing in it concerns a mapping.

        ``remember_text``: keep the result under the exact text too. Worth it for prepared
        statements (the same text again and again), not for simple queries whose literals
        differ each time (they would only churn the cache; their shape is cached anyway).
        """
        key = (text, self.states.version)
        cached = self._texts.get(key, False)
        if cached is not False:
            self._texts.move_to_end(key)
            self.hits += 1
            _CACHE_COUNTS["hit"] += 1
            return cached  # type: ignore[return-value]
        result = self._rewrite_uncached(text)
        if remember_text:
            self._remember(self._texts, key, result)
        return result

    def unsupported_text(self, text: str, reason: str) -> Rewritten:
        """The whole text gets the ``unsupported`` policy of the mappings it may concern."""
        return self._whole_text(text, self._unsupported(reason, self._named_in(text)))

    def _rewrite_uncached(self, text: str) -> Rewritten | None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Bytes the client encoding's codec could not decode: no parse, no guess.
            return self._whole_text(text, self._unparseable(text))
        templates = self._templates(text)
        if templates is None:
            return None
        if all(t.action == PASS for t in templates):
            return None
        return self._splice(text, templates)

    # --- analysis (once per statement shape) --------------------------------------------------

    def _templates(self, text: str) -> tuple[Template, ...] | None:
        try:
            shape = pgparser.normalize(_without_comments(text))
        except pgparser.ParseError:
            return (self._unparseable(text),)
        key = (shape, self.states.version)
        cached = self._shapes.get(key, False)
        if cached is not False:
            self._shapes.move_to_end(key)
            self.hits += 1
            _CACHE_COUNTS["hit"] += 1
            return cached  # type: ignore[return-value]
        self.misses += 1
        _CACHE_COUNTS["miss"] += 1
        tree = json.loads(pgparser.parse_sql_json(text))
        templates = tuple(self._analyze(s.get("stmt", {})) for s in tree.get("stmts", []))
        result = templates or None
        self._remember(self._shapes, key, result)
        return result

    def _remember(self, cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        cache[key] = value
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def _unparseable(self, text: str) -> Template:
        return self._unsupported("unparseable", self._named_in(text))

    def _named_in(self, text: str) -> tuple[str, ...]:
        """Mappings whose source a text names literally (none: it may name any, as U&"...")."""
        lowered = text.encode("utf-8", "surrogateescape").lower()
        if b"u&" in lowered:
            return ()
        return tuple(
            m.name
            for source, maps in self.by_source.items()
            if any(needle in lowered for needle in _needles(source.name))
            for m in maps
        )

    def _sources(self, rangevar: dict[str, Any]) -> tuple[list[QualifiedName], bool]:
        """The mapped tables a relation name may mean, and whether the session decides which
        (an unqualified name: the row's ``tableoid`` tells, see :func:`written_to_source_sql`)."""
        schema = rangevar.get("schemaname")
        name = rangevar.get("relname", "")
        if schema:
            table = QualifiedName(schema, name)
            return ([table] if table in self.by_source else []), False
        return self.by_name.get(name, []), True

    def _mapped(self, rangevar: dict[str, Any] | None) -> list[CompiledMapping]:
        if not rangevar:
            return []
        sources, _ = self._sources(rangevar)
        return [m for source in sources for m in self.by_source[source]]

    def _analyze(self, stmt: dict[str, Any]) -> Template:
        """Decide what to do with one top-level statement (a parse_sql_json ``stmt``)."""
        if not stmt:
            return Template(PASS)
        node, fields = next(iter(stmt.items()))
        if node == "ExplainStmt" and not _explain_executes(fields):
            return Template(PASS)
        writes = self._mapped_writes(stmt)
        if node in _TAGS and self._mapped(fields.get("relation")):
            nested = [w for w in writes if w[1] is not fields]
            if nested:
                return self._unsupported("writable_cte", self._names(writes))
            return self._analyze_dml(node, fields)
        if not writes:
            return Template(PASS)
        kind = writes[0][0]
        reason = {
            "CopyStmt": "copy",
            "MergeStmt": "merge",
            "TruncateStmt": "truncate",
        }.get(kind, _REASON_BY_OUTER.get(node, "writable_cte"))
        return self._unsupported(reason, self._names(writes))

    @staticmethod
    def _names(writes: list[tuple[str, dict[str, Any], list[CompiledMapping]]]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m.name for _, _, maps in writes for m in maps))

    def _mapped_writes(
        self, stmt: dict[str, Any]
    ) -> list[tuple[str, dict[str, Any], list[CompiledMapping]]]:
        """Every node in the statement that writes a mapped table."""
        found = []
        for kind, fields in _walk(stmt):
            if kind in _WRITE_NODES or (kind == "CopyStmt" and fields.get("is_from")):
                mappings = self._mapped(fields.get("relation"))
                if mappings:
                    found.append((kind, fields, mappings))
            elif kind == "TruncateStmt":
                for rel in fields.get("relations", []):
                    mappings = self._mapped(rel.get("RangeVar"))
                    if mappings:
                        found.append((kind, fields, mappings))
        return found

    def _unsupported(self, reason: str, mappings: tuple[str, ...]) -> Template:
        policies = {
            m.config.unsupported for m in self.mappings if not mappings or m.name in mappings
        }
        action = REJECT if "reject" in policies else UNMIRRORED
        return Template(action, reason=reason, mappings=mappings)

    def _analyze_dml(self, node: str, fields: dict[str, Any]) -> Template:
        mappings = self._mapped(fields.get("relation"))
        names = tuple(m.name for m in mappings)
        if any(m.catalog is not None and m.catalog.source_has_rules for m in mappings):
            return self._unsupported("rules", names)
        where = fields.get("whereClause") or {}
        if "CurrentOfExpr" in where:
            return self._unsupported("where_current_of", names)
        assigned = _assigned_columns(node, fields)
        if any(assigned & m.key_mentioned for m in mappings):
            return self._unsupported("key_update", names)
        return self._rewrite_template(node, fields, mappings)

    def _rewrite_template(
        self, node: str, fields: dict[str, Any], mappings: list[CompiledMapping]
    ) -> Template:
        relation = fields["relation"]
        alias = (relation.get("alias") or {}).get("aliasname") or relation["relname"]
        ref = quote_ident(alias)
        columns = read_columns(mappings)
        sources, guarded = self._sources(relation)
        returning = bool((fields.get("returningClause") or {}).get("exprs")) or bool(
            fields.get("returningList")
        )
        added = [
            f"{self._returned(c, ref, sources if guarded else [])} AS {COLUMN_PREFIX}{i + 1}"
            for i, c in enumerate(columns)
        ]
        renamed = [f"{COLUMN_PREFIX}{i + 1} AS {quote_ident(c)}" for i, c in enumerate(columns)]
        if guarded:
            added.append(f"{ref}.tableoid AS {TABLE_COLUMN}")
            renamed.append(TABLE_COLUMN)
        additions, renames = ", ".join(added), ", ".join(renamed)
        mirrors, targets, deletes = self._mirror_ctes(node, mappings, guarded=guarded)
        # The one-row join makes the delete CTEs run; it changes neither rows nor count.
        done = f", (SELECT 1 FROM {', '.join(deletes)}) AS {CTE}_done" if deletes else ""
        # Per mapping, the changed rows it includes: what its target gets (the reply repair
        # reads them for dualwrite_rows_mirrored_total and strips them).
        written = ", ".join(
            f"pg_catalog.count(*) FILTER (WHERE {self._included(m, guarded)}) "
            f"AS {WRITTEN_PREFIX}{i + 1}"
            for i, m in enumerate(mappings)
        )
        outer = (
            f"SELECT {CTE}.*, {CTE}_n.* FROM {CTE}, "
            f"(SELECT {written} FROM {SRC_CTE} AS {SRC}) AS {CTE}_n{done}"
            if returning
            else f"SELECT pg_catalog.count(*), {written} FROM {SRC_CTE} AS {SRC}{done}"
        )
        has_with = bool(fields.get("withClause"))
        prefix = f",\n{CTE} AS (\n" if has_with else f"WITH {CTE} AS (\n"
        suffix = (
            f"\n{', ' if returning else 'RETURNING '}{additions}\n)"
            f", {SRC_CTE} AS (SELECT {renames} FROM {CTE})"
            f"{mirrors}\n{outer}"
        )
        reply = StatementReply(
            tag=_TAGS[node],
            operation=_OPERATIONS[node],
            returning=returning,
            extra_columns=len(added) + len(mappings) if returning else 0,
            mappings=tuple(m.name for m in mappings),
            targets=frozenset(targets),
        )
        return Template(
            REWRITE,
            mappings=reply.mappings,
            node=node,
            has_with=has_with,
            prefix=prefix,
            suffix=suffix,
            reply=reply,
        )

    def _returned(self, column: str, ref: str, sources: list[QualifiedName]) -> str:
        """How the rewrite returns a source column of the changed row ``ref``.

        ``ref.column`` when every table the name may mean has the column. An unqualified name
        may also mean a mapped table without it (a staged cutover mirrors ``accounts`` and
        ``v2.accounts``, whose columns differ), and naming a column the table lacks would fail
        the application's statement: then the value is read through the row as jsonb into a
        record of a table that has it (NULL for a row of a table without it, which no
        mapping reading the column mirrors: ``written_to_source_sql``)."""
        holders = [s for s in sources if column in self._source_columns(s)]
        if len(holders) == len(sources):
            return f"{ref}.{quote_ident(column)}"
        return (
            f"(pg_catalog.jsonb_populate_record(NULL::{holders[0].sql}, "
            f"pg_catalog.to_jsonb({ref}))).{quote_ident(column)}"
        )

    def _source_columns(self, source: QualifiedName) -> tuple[str, ...]:
        _, _, catalog = self.by_source[source][0].binding()
        return catalog.source_columns

    @staticmethod
    def _included(mapping: CompiledMapping, guarded: bool) -> str:
        """Whether a changed row (``src``) is one the mapping mirrors: its filter passes and,
        for a statement that named the table unqualified, the row is its source's."""
        if not guarded:
            return mapping.filter_sql()
        return f"{written_to_source_sql(mapping, TABLE_COLUMN)} AND {mapping.filter_sql()}"

    def _mirror_ctes(
        self, node: str, mappings: list[CompiledMapping], *, guarded: bool
    ) -> tuple[str, set[tuple[str, str]], list[str]]:
        """The CTEs after ``__dualwrite_src``; the target tables written in-statement; and the
        names of the CTEs that delete through a function (the outer query must read them,
        or PostgreSQL would not run them). ``guarded``: each mapping mirrors only the rows
        its own source holds (the statement named the table unqualified)."""
        parts: list[str] = []
        targets: set[tuple[str, str]] = set()
        outbox: list[tuple[CompiledMapping, str]] = []
        deletes: list[str] = []
        for mapping in mappings:
            rows = (
                f"(SELECT * FROM {SRC_CTE} WHERE {written_to_source_sql(mapping, TABLE_COLUMN)})"
                if guarded
                else SRC_CTE
            )
            sync = mapping.mode.statement_writes_target and not self.states.is_paused(mapping.name)
            if not sync:
                outbox.append((mapping, rows))
                continue
            assert mapping.target is not None
            targets.add((mapping.target.schema, mapping.target.name))
            n = len(parts)
            if node == "DeleteStmt":
                deletes.append(delete_call_sql(mapping, rows, only_filtered_out=False))
                continue
            parts.append(f"{CTE}_m{n} AS ({upsert_sql(mapping, rows)})")
            if mapping.filter is not None:
                deletes.append(delete_call_sql(mapping, rows, only_filtered_out=True))
        if outbox:
            parts.append(f"{CTE}_o AS ({outbox_capture_sql(outbox)})")
        names = [f"{CTE}_d{i}" for i in range(len(deletes))]
        parts += [f"{name} AS ({sql})" for name, sql in zip(names, deletes, strict=True)]
        return "".join(f",\n{p}" for p in parts), targets, names

    # --- splicing (per statement text) -------------------------------------------------------

    def _splice(self, text: str, templates: tuple[Template, ...]) -> Rewritten:
        try:
            slices = _statement_slices(text, len(templates))
        except pgparser.ParseError:
            slices = ()  # unparseable: the whole text is one unsupported statement
        if len(slices) != len(templates):
            # Unparseable text, or (cannot happen with one parser) a disagreement about
            # where statements are: never guess, apply the unsupported policy to all of it.
            return self._whole_text(text, self._unparseable(text))
        out: list[str] = []
        insertions: list[Insertion] = []
        plans: list[StatementPlan] = []
        written = 0  # length of the rewritten text so far
        cursor = 0
        for span, template in zip(slices, templates, strict=True):
            plans.append(template.plan)
            if template.action in (PASS, UNMIRRORED):
                continue
            start, stop = span.start, span.stop
            if template.action == REJECT:
                replacement = self._reject_sql(template)
                out.append(text[cursor:start])
                out.append(replacement)
                written += (start - cursor) + len(replacement)
                # The whole statement is ours now: positions inside it map to nothing.
                insertions.append(
                    Insertion(written - len(replacement), len(replacement) - (stop - start))
                )
                cursor = stop
                continue
            at = self._main_keyword(text, span, template) if template.has_with else start
            out.append(text[cursor:at])
            written += at - cursor
            insertions.append(Insertion(written, len(template.prefix)))
            out.append(template.prefix)
            written += len(template.prefix)
            out.append(text[at:stop])
            written += stop - at
            insertions.append(Insertion(written, len(template.suffix)))
            out.append(template.suffix)
            written += len(template.suffix)
            cursor = stop
        out.append(text[cursor:])
        return Rewritten("".join(out), tuple(plans), tuple(i for i in insertions if i.length > 0))

    def _whole_text(self, text: str, template: Template) -> Rewritten:
        return Rewritten(
            self._reject_sql(template) if template.action == REJECT else text,
            (StatementPlan(template.action, template),),
            (),
        )

    @staticmethod
    def _main_keyword(text: str, span: slice, template: Template) -> int:
        """Where the main INSERT/UPDATE/DELETE of a statement with its own WITH begins."""
        keyword = _KEYWORDS[template.node]
        depth = 0
        statement = text[span]
        for token in pgparser.scan(statement):
            if token.name == "ASCII_40":
                depth += 1
            elif token.name == "ASCII_41":
                depth -= 1
            elif depth == 0 and token.name == keyword:
                return int(span.start + token.start)
        raise ValueError("main statement keyword not found")

    @staticmethod
    def _reject_sql(template: Template) -> str:
        """A statement that fails with the policy's error, so nothing of the original runs."""
        return (
            "DO $dualwrite$ BEGIN RAISE EXCEPTION USING "
            f"ERRCODE = '{STATEMENT_REJECTED.sqlstate}', "
            f"MESSAGE = {utf8_literal(reject_message(template))}, "
            f"HINT = {utf8_literal(REJECT_HINT)}; END $dualwrite$"
        )


#: the hint of every rejection, the server-raised ones included (core/errors.py's table)
REJECT_HINT: Final = STATEMENT_REJECTED.hint or ""


def reject_message(template: Template) -> str:
    """The error message a rejected statement gets (same for simple and extended protocol)."""
    names = ", ".join(template.mappings) or "a mapping"
    return (
        f"dualwrite: statement rejected for mapping {names}: "
        f"{REASONS.get(template.reason or '', template.reason)}"
    )
