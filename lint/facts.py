"""What one statement does to the database: the table it locks and how, the work done under the
lock (rewrite, scan, index build), what it creates, drops or renames, and whether it can run twice.

These facts are read from PostgreSQL's parse tree (pglast) and feed the rules, the live
predictions (lock mode, duration) and the contract checks. Lock modes follow PostgreSQL 15's
documentation of ALTER TABLE, CREATE INDEX and explicit locking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pglast import ast

from lint.script import Statement

#: PostgreSQL's table lock modes, weakest first
LOCK_MODES = (
    "ACCESS SHARE",
    "ROW SHARE",
    "ROW EXCLUSIVE",
    "SHARE UPDATE EXCLUSIVE",
    "SHARE",
    "SHARE ROW EXCLUSIVE",
    "EXCLUSIVE",
    "ACCESS EXCLUSIVE",
)
AEL = "ACCESS EXCLUSIVE"
SUE = "SHARE UPDATE EXCLUSIVE"
SRE = "SHARE ROW EXCLUSIVE"
#: LockStmt.mode numbers (lockdefs.h) to names
_LOCK_NUMBERS = {i + 1: name for i, name in enumerate(LOCK_MODES)}
#: functions a column default may call without forcing a table rewrite (stable or immutable)
_NON_VOLATILE_DEFAULTS = frozenset(
    {
        "now",
        "current_timestamp",
        "statement_timestamp",
        "transaction_timestamp",
        "lower",
        "upper",
        "coalesce",
        "jsonb_build_object",
        "json_build_object",
        "to_jsonb",
        "make_interval",
    }
)
_SERIAL_TYPES = frozenset({"serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"})

# --- work done under the lock --------------------------------------------------------------
REWRITE = "rewrite"  # every row written again
SCAN = "scan"  # every row read (validation)
INDEX = "index"  # an index built from every row
ROWS = "rows"  # a data change touching every row (no WHERE)


def blocks_writes(mode: str | None) -> bool:
    """The mode conflicts with ROW EXCLUSIVE: INSERT, UPDATE and DELETE wait behind it."""
    return mode is not None and LOCK_MODES.index(mode) >= LOCK_MODES.index("SHARE")


def blocks_reads(mode: str | None) -> bool:
    return mode == AEL


def stronger(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if LOCK_MODES.index(a) >= LOCK_MODES.index(b) else b


@dataclass(frozen=True, order=True)
class Relation:
    """A table name as written in the script (schema None: unqualified)."""

    schema: str | None
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}" if self.schema else self.name

    @staticmethod
    def of(node: ast.RangeVar | None) -> Relation | None:
        if node is None or not node.relname:
            return None
        return Relation(node.schemaname or None, node.relname)


class Change(Enum):
    """Which side of expand-contract a statement belongs to."""

    EXPAND = "expand"
    CONTRACT = "contract"


@dataclass
class Facts:
    """What one statement does (see the module docstring)."""

    #: the table it locks (the first, for statements naming several)
    relation: Relation | None = None
    #: every table it locks, with the mode
    locks: dict[Relation, str] = field(default_factory=dict)
    #: the strongest lock it takes on ``relation``
    lock: str | None = None
    #: REWRITE, SCAN, INDEX, ROWS or None
    work: str | None = None
    change: Change | None = None
    #: relations (tables, views, indexes' tables excluded) it creates
    creates: list[Relation] = field(default_factory=list)
    drops_tables: list[Relation] = field(default_factory=list)
    drops_columns: list[tuple[Relation, str]] = field(default_factory=list)
    renames_tables: list[tuple[Relation, str]] = field(default_factory=list)
    renames_columns: list[tuple[Relation, str, str]] = field(default_factory=list)
    type_changes: list[tuple[Relation, str]] = field(default_factory=list)
    #: columns it adds, with their type name (for the json and auto-increment rules)
    added_columns: list[tuple[Relation, ast.ColumnDef]] = field(default_factory=list)
    #: constraint kinds it adds (CONSTR_FOREIGN, CONSTR_EXCLUSION…) with NOT VALID or not
    added_constraints: list[tuple[str, bool, str | None]] = field(default_factory=list)
    #: None when running it twice is not a question (SELECT, SET…)
    idempotent: bool | None = None
    #: CONCURRENTLY (cannot run inside a transaction block)
    concurrently: bool = False
    #: a setting it changes: (name, value or None for RESET, local)
    setting: tuple[str, str | None, bool] | None = None
    #: a data change without WHERE (every row)
    whole_table_dml: bool = False
    #: plain DML (INSERT/UPDATE/DELETE)
    dml: bool = False
    #: the rewrite command's name (VACUUM FULL, CLUSTER, SET TABLESPACE…)
    rewrite_command: str | None = None
    #: index columns, for a non-unique index
    index_columns: int = 0
    unique_index: bool = False
    #: explicit LOCK TABLE
    explicit_lock: bool = False

    def lock_on(self, relation: Relation, mode: str | None, work: str | None = None) -> None:
        if mode is not None:
            self.locks[relation] = stronger(self.locks.get(relation), mode) or mode
        if self.relation is None:
            self.relation = relation
        if relation == self.relation:
            self.lock = stronger(self.lock, mode)
            if work is not None and (self.work is None or _WORK_RANK[work] > _WORK_RANK[self.work]):
                self.work = work


_WORK_RANK = {ROWS: 1, SCAN: 2, INDEX: 3, REWRITE: 4}


def enum_name(value: Any) -> str:
    """A pglast enum member's name (some fields come back as plain ints or strings)."""
    return str(getattr(value, "name", value))


def facts_of(statement: Statement) -> Facts:
    """The facts of one statement (empty Facts for statements the rules need nothing from)."""
    facts = Facts()
    handler = _HANDLERS.get(statement.kind)
    if handler is not None:
        handler(statement.node, facts)
    return facts


# --- per statement kind ---------------------------------------------------------------------


def _create(node: ast.CreateStmt, facts: Facts) -> None:
    relation = Relation.of(node.relation)
    if relation is not None:
        facts.creates.append(relation)
    facts.change = Change.EXPAND
    facts.idempotent = bool(node.if_not_exists)
    for element in node.tableElts or ():
        if isinstance(element, ast.ColumnDef) and relation is not None:
            facts.added_columns.append((relation, element))
    for element in node.tableElts or ():
        for constraint in _constraints(element):
            if enum_name(constraint.contype) == "CONSTR_FOREIGN":
                referenced = Relation.of(constraint.pktable)
                if referenced is not None:
                    facts.locks[referenced] = stronger(facts.locks.get(referenced), SRE) or SRE


def _constraints(element: Any) -> list[ast.Constraint]:
    if isinstance(element, ast.Constraint):
        return [element]
    if isinstance(element, ast.ColumnDef):
        return [c for c in element.constraints or () if isinstance(c, ast.Constraint)]
    return []


def _create_as(node: ast.CreateTableAsStmt, facts: Facts) -> None:
    into = node.into
    relation = Relation.of(into.rel) if into is not None else None
    if relation is not None:
        facts.creates.append(relation)
    facts.change = Change.EXPAND
    facts.idempotent = bool(node.if_not_exists)


def _index(node: ast.IndexStmt, facts: Facts) -> None:
    relation = Relation.of(node.relation)
    facts.concurrently = bool(node.concurrent)
    facts.change = Change.EXPAND
    facts.idempotent = bool(node.if_not_exists)
    facts.unique_index = bool(node.unique or node.primary)
    facts.index_columns = len(node.indexParams or ())
    if relation is not None:
        facts.lock_on(relation, SUE if node.concurrent else "SHARE", INDEX)


def _alter_table(node: ast.AlterTableStmt, facts: Facts) -> None:
    relation = Relation.of(node.relation)
    if relation is None:
        return
    if enum_name(node.objtype) not in ("OBJECT_TABLE", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"):
        facts.lock_on(relation, AEL)
        facts.idempotent = True
        return
    idempotent = True
    for cmd in node.cmds or ():
        if isinstance(cmd, ast.AlterTableCmd):
            idempotent &= _alter_cmd(relation, cmd, facts)
    facts.idempotent = idempotent


def _alter_cmd(relation: Relation, cmd: ast.AlterTableCmd, facts: Facts) -> bool:
    """Record one ALTER TABLE subcommand; True if running it twice does no harm."""
    subtype = enum_name(cmd.subtype)
    if subtype == "AT_AddColumn":
        column = cmd.def_
        assert isinstance(column, ast.ColumnDef)
        facts.added_columns.append((relation, column))
        facts.change = facts.change or Change.EXPAND
        facts.lock_on(relation, AEL, _added_column_work(column, facts))
        return bool(cmd.missing_ok)
    if subtype == "AT_DropColumn":
        facts.drops_columns.append((relation, cmd.name or ""))
        facts.change = Change.CONTRACT
        facts.lock_on(relation, AEL)
        return bool(cmd.missing_ok)
    if subtype == "AT_AlterColumnType":
        facts.type_changes.append((relation, cmd.name or ""))
        facts.change = Change.CONTRACT
        facts.lock_on(relation, AEL, REWRITE)
        return True
    if subtype == "AT_SetNotNull":
        facts.lock_on(relation, AEL, SCAN)
        return True
    if subtype == "AT_AddConstraint":
        constraint = cmd.def_
        assert isinstance(constraint, ast.Constraint)
        _added_constraint(relation, constraint, facts)
        return False
    if subtype == "AT_ValidateConstraint":
        facts.lock_on(relation, SUE, SCAN)
        return True
    if subtype == "AT_DropConstraint":
        facts.lock_on(relation, AEL)
        return bool(cmd.missing_ok)
    if subtype in ("AT_SetTableSpace", "AT_SetLogged", "AT_SetUnLogged", "AT_SetAccessMethod"):
        facts.rewrite_command = {
            "AT_SetTableSpace": "SET TABLESPACE",
            "AT_SetLogged": "SET LOGGED",
            "AT_SetUnLogged": "SET UNLOGGED",
            "AT_SetAccessMethod": "SET ACCESS METHOD",
        }[subtype]
        facts.lock_on(relation, AEL, REWRITE)
        return True
    if subtype in (
        "AT_SetStatistics",
        "AT_ClusterOn",
        "AT_DropCluster",
        "AT_SetOptions",
        "AT_ResetOptions",
        "AT_AttachPartition",
        "AT_SetRelOptions",
        "AT_ResetRelOptions",
    ):
        facts.lock_on(relation, SUE)
        return True
    if subtype == "AT_DetachPartition":
        partition = cmd.def_
        concurrent = isinstance(partition, ast.PartitionCmd) and bool(partition.concurrent)
        facts.concurrently = facts.concurrently or concurrent
        facts.lock_on(relation, SUE if concurrent else AEL)
        return True
    if subtype.startswith(
        ("AT_EnableTrig", "AT_DisableTrig", "AT_EnableAlwaysTrig", "AT_EnableReplicaTrig")
    ):
        facts.lock_on(relation, SRE)
        return True
    facts.lock_on(relation, AEL)
    return True


def _added_column_work(column: ast.ColumnDef, facts: Facts) -> str | None:
    """A new column rewrites the table when PostgreSQL must compute a value per row."""
    type_name = column.typeName
    names = [getattr(n, "sval", "") for n in (type_name.names or () if type_name else ())]
    if names and names[-1] in _SERIAL_TYPES:
        return REWRITE
    work = None
    for constraint in _constraints(column):
        kind = enum_name(constraint.contype)
        if kind in ("CONSTR_IDENTITY",) or (
            kind == "CONSTR_GENERATED" and constraint.generated_kind != "v"
        ):
            return REWRITE
        if kind == "CONSTR_DEFAULT" and _volatile(constraint.raw_expr):
            return REWRITE
        if kind in ("CONSTR_CHECK", "CONSTR_FOREIGN") and not constraint.skip_validation:
            work = SCAN
        if kind == "CONSTR_FOREIGN":
            facts.added_constraints.append((kind, bool(constraint.skip_validation), None))
        if kind in ("CONSTR_UNIQUE", "CONSTR_PRIMARY"):
            work = INDEX
    return work


def _volatile(expr: Any) -> bool:
    """A default PostgreSQL evaluates per row (a function not known to be stable)."""
    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if isinstance(node, tuple | list):
            for item in node:
                visit(item)
        elif isinstance(node, ast.FuncCall):
            name = getattr((node.funcname or ())[-1], "sval", "")
            if name not in _NON_VOLATILE_DEFAULTS:
                found = True
            visit(node.args)
        elif isinstance(node, ast.Node):
            for attr in node:
                visit(getattr(node, attr))

    visit(expr)
    return found


def _added_constraint(relation: Relation, constraint: ast.Constraint, facts: Facts) -> None:
    kind = enum_name(constraint.contype)
    not_valid = bool(constraint.skip_validation)
    facts.added_constraints.append((kind, not_valid, constraint.conname))
    facts.change = facts.change or Change.EXPAND
    if kind == "CONSTR_FOREIGN":
        facts.lock_on(relation, SRE, None if not_valid else SCAN)
        referenced = Relation.of(constraint.pktable)
        if referenced is not None:
            facts.locks[referenced] = stronger(facts.locks.get(referenced), SRE) or SRE
    elif kind == "CONSTR_CHECK":
        facts.lock_on(relation, AEL, None if not_valid else SCAN)
    elif kind in ("CONSTR_UNIQUE", "CONSTR_PRIMARY", "CONSTR_EXCLUSION"):
        facts.lock_on(relation, AEL, None if constraint.indexname else INDEX)
    else:
        facts.lock_on(relation, AEL)


def _drop(node: ast.DropStmt, facts: Facts) -> None:
    kind = enum_name(node.removeType)
    facts.idempotent = bool(node.missing_ok)
    facts.concurrently = bool(node.concurrent)
    for obj in node.objects or ():
        names = [getattr(n, "sval", "") for n in obj] if isinstance(obj, tuple | list) else []
        if not names:
            continue
        relation = Relation(names[-2] if len(names) > 1 else None, names[-1])
        if kind in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"):
            facts.drops_tables.append(relation)
            facts.change = Change.CONTRACT
            facts.lock_on(relation, AEL)
        elif kind == "OBJECT_INDEX":
            # The table is not named; the index's own name stands in until --live resolves it.
            facts.lock_on(relation, SUE if node.concurrent else AEL)
        elif kind in ("OBJECT_SCHEMA", "OBJECT_SEQUENCE", "OBJECT_TYPE", "OBJECT_FUNCTION"):
            facts.change = Change.CONTRACT
        elif kind in ("OBJECT_POLICY", "OBJECT_TRIGGER", "OBJECT_RULE") and len(names) > 1:
            table = Relation(names[-3] if len(names) > 2 else None, names[-2])
            facts.lock_on(table, AEL)


def _rename(node: ast.RenameStmt, facts: Facts) -> None:
    kind = enum_name(node.renameType)
    relation = Relation.of(node.relation)
    facts.idempotent = bool(node.missing_ok)
    if relation is None:
        return
    if kind in ("OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"):
        facts.renames_tables.append((relation, node.newname or ""))
        facts.change = Change.CONTRACT
    elif kind == "OBJECT_COLUMN":
        facts.renames_columns.append((relation, node.subname or "", node.newname or ""))
        facts.change = Change.CONTRACT
    facts.lock_on(relation, AEL)


def _truncate(node: ast.TruncateStmt, facts: Facts) -> None:
    facts.change = Change.CONTRACT
    facts.idempotent = True
    for rel in node.relations or ():
        relation = Relation.of(rel)
        if relation is not None:
            facts.lock_on(relation, AEL)


def _vacuum(node: ast.VacuumStmt, facts: Facts) -> None:
    full = any(
        isinstance(o, ast.DefElem) and o.defname == "full" and _truthy(o.arg)
        for o in node.options or ()
    )
    facts.idempotent = True
    for rel in node.rels or ():
        relation = Relation.of(getattr(rel, "relation", None))
        if relation is not None:
            facts.lock_on(relation, AEL if full else SUE, REWRITE if full else None)
    if full:
        facts.rewrite_command = "VACUUM FULL"


def _truthy(arg: Any) -> bool:
    if arg is None:
        return True
    value = (
        getattr(arg, "sval", None) or getattr(arg, "ival", None) or getattr(arg, "boolval", None)
    )
    return str(value).lower() not in ("0", "false", "off", "no")


def _cluster(node: ast.ClusterStmt, facts: Facts) -> None:
    facts.rewrite_command = "CLUSTER"
    facts.idempotent = True
    relation = Relation.of(node.relation)
    if relation is not None:
        facts.lock_on(relation, AEL, REWRITE)


def _refresh(node: ast.RefreshMatViewStmt, facts: Facts) -> None:
    facts.idempotent = True
    relation = Relation.of(node.relation)
    if not node.concurrent:
        facts.rewrite_command = "REFRESH MATERIALIZED VIEW"
    if relation is not None:
        facts.lock_on(relation, "EXCLUSIVE" if node.concurrent else AEL, REWRITE)


def _reindex(node: ast.ReindexStmt, facts: Facts) -> None:
    concurrent = any(
        isinstance(p, ast.DefElem) and p.defname == "concurrently" for p in node.params or ()
    )
    facts.concurrently = concurrent
    facts.idempotent = True
    relation = Relation.of(node.relation)
    if relation is not None:
        facts.lock_on(relation, SUE if concurrent else "SHARE", INDEX)


def _lock(node: ast.LockStmt, facts: Facts) -> None:
    facts.explicit_lock = True
    facts.idempotent = True
    mode = _LOCK_NUMBERS.get(int(node.mode or 8), AEL)
    for rel in node.relations or ():
        relation = Relation.of(rel)
        if relation is not None:
            facts.lock_on(relation, mode)


def _update(node: ast.UpdateStmt, facts: Facts) -> None:
    _dml(node.relation, node.whereClause is None, facts)
    facts.idempotent = True


def _delete(node: ast.DeleteStmt, facts: Facts) -> None:
    _dml(node.relation, node.whereClause is None, facts)
    facts.idempotent = True


def _insert(node: ast.InsertStmt, facts: Facts) -> None:
    _dml(node.relation, False, facts)
    conflict = node.onConflictClause
    facts.idempotent = conflict is not None


def _dml(rel: ast.RangeVar | None, whole_table: bool, facts: Facts) -> None:
    facts.dml = True
    facts.whole_table_dml = whole_table
    relation = Relation.of(rel)
    if relation is not None:
        facts.lock_on(relation, "ROW EXCLUSIVE", ROWS if whole_table else None)


def _set(node: ast.VariableSetStmt, facts: Facts) -> None:
    name = (node.name or "").lower()
    kind = enum_name(node.kind)
    value: str | None = None
    if kind == "VAR_SET_VALUE" and node.args:
        const = node.args[0]
        inner = getattr(const, "val", None)
        value = str(getattr(inner, "sval", None) or getattr(inner, "ival", 0))
    elif kind == "VAR_SET_DEFAULT":
        value = None
    facts.setting = (name, value, bool(node.is_local))


def _select(node: ast.SelectStmt, facts: Facts) -> None:
    """``SELECT set_config('lock_timeout', '2s', false)`` is a SET."""
    for target in node.targetList or ():
        call = getattr(target, "val", None)
        if not isinstance(call, ast.FuncCall) or not call.args or len(call.args) < 2:
            continue
        if getattr((call.funcname or ())[-1], "sval", "") != "set_config":
            continue
        name, value = (getattr(getattr(a, "val", None), "sval", None) for a in call.args[:2])
        local = len(call.args) > 2 and bool(
            getattr(getattr(call.args[2], "val", None), "boolval", False)
        )
        if name:
            facts.setting = (str(name).lower(), None if value is None else str(value), local)


def _create_named(if_not_exists_field: str | None, replace_field: str | None = None) -> Any:
    def handler(node: Any, facts: Facts) -> None:
        facts.change = Change.EXPAND
        facts.idempotent = bool(
            (if_not_exists_field and getattr(node, if_not_exists_field, False))
            or (replace_field and getattr(node, replace_field, False))
        )
        view = getattr(node, "view", None)
        relation = Relation.of(view) if isinstance(view, ast.RangeVar) else None
        if relation is not None:
            facts.creates.append(relation)

    return handler


def _create_trigger(node: ast.CreateTrigStmt, facts: Facts) -> None:
    facts.change = Change.EXPAND
    facts.idempotent = bool(node.replace)
    relation = Relation.of(node.relation)
    if relation is not None:
        facts.lock_on(relation, SRE)


def _create_policy(node: ast.CreatePolicyStmt, facts: Facts) -> None:
    facts.change = Change.EXPAND
    facts.idempotent = False  # unless a DROP POLICY IF EXISTS precedes it (see rules)
    relation = Relation.of(node.table)
    if relation is not None:
        facts.lock_on(relation, AEL)


def _alter_enum(node: ast.AlterEnumStmt, facts: Facts) -> None:
    facts.change = Change.EXPAND
    facts.idempotent = bool(node.skipIfNewValExists) or node.oldVal is not None


def _comment_or_grant(_node: Any, facts: Facts) -> None:
    facts.idempotent = True


_HANDLERS: dict[str, Any] = {
    "CreateStmt": _create,
    "CreateTableAsStmt": _create_as,
    "IndexStmt": _index,
    "AlterTableStmt": _alter_table,
    "DropStmt": _drop,
    "RenameStmt": _rename,
    "TruncateStmt": _truncate,
    "VacuumStmt": _vacuum,
    "ClusterStmt": _cluster,
    "RefreshMatViewStmt": _refresh,
    "ReindexStmt": _reindex,
    "LockStmt": _lock,
    "UpdateStmt": _update,
    "DeleteStmt": _delete,
    "InsertStmt": _insert,
    "VariableSetStmt": _set,
    "SelectStmt": _select,
    "CreateSchemaStmt": _create_named("if_not_exists"),
    "CreateSeqStmt": _create_named("if_not_exists"),
    "CreateExtensionStmt": _create_named("if_not_exists"),
    "ViewStmt": _create_named(None, "replace"),
    "CreateFunctionStmt": _create_named(None, "replace"),
    "CreateEnumStmt": _create_named(None),
    "CreateDomainStmt": _create_named(None),
    "CreateTrigStmt": _create_trigger,
    "CreatePolicyStmt": _create_policy,
    "AlterEnumStmt": _alter_enum,
    "CommentStmt": _comment_or_grant,
    "GrantStmt": _comment_or_grant,
}
