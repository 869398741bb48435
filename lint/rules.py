"""dualwrite's own rules: the project's migration template, and what squawk does not check for
PostgreSQL 15 (read from pglast's parse tree and the statement facts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lint.facts import (
    INDEX,
    REWRITE,
    SCAN,
    Change,
    Facts,
    Relation,
    blocks_writes,
    enum_name,
)
from lint.findings import Finding, Rule
from lint.script import Script, Statement

HEADER_KEYS = ("description", "strategy", "rollback")
STRATEGIES = ("expand", "contract")

RULES: dict[str, Rule] = {}


def _rule(id_: str, severity: str, summary: str, why: str, fix: str, needs: str = "") -> Rule:
    rule = Rule(id_, severity, summary, why, fix, needs=needs)
    RULES[id_] = rule
    return rule


SYNTAX_ERROR = _rule(
    "syntax-error",
    "error",
    "The file does not parse as PostgreSQL SQL",
    "PostgreSQL would stop at this statement; nothing after it was checked either.",
    "Fix the statement (psql meta-commands and :variables are understood).",
)
TEMPLATE_HEADER = _rule(
    "template-header",
    "error",
    "The migration header is missing or incomplete",
    "Reviewers, the on-call engineer and the auditor need to know what the script does, which "
    "side of expand-contract it is, and how to undo it before it runs in production.",
    "Start the file with comment lines `-- description: …`, `-- strategy: expand` (or "
    "`contract`) and `-- rollback: …` (the SQL or the steps that undo it).",
)
TEMPLATE_IDEMPOTENT = _rule(
    "template-idempotent",
    "error",
    "A statement cannot be run twice",
    "A script that stops half-way (a lock timeout, a failed validation) must be re-run as it "
    "is; a statement that fails the second time (object exists, object missing) blocks the "
    "re-run in the middle of an incident.",
    "Use IF NOT EXISTS / IF EXISTS / OR REPLACE; for ADD CONSTRAINT, CREATE POLICY and "
    "CREATE TRIGGER run `DROP … IF EXISTS` first or guard the statement in a DO block "
    "(`IF NOT EXISTS (SELECT FROM pg_constraint …) THEN … END IF`); INSERT with ON CONFLICT.",
)
CONCURRENTLY_IN_TRANSACTION = _rule(
    "concurrently-in-transaction",
    "error",
    "CONCURRENTLY (or VACUUM) inside a transaction block",
    "PostgreSQL refuses CREATE/DROP INDEX CONCURRENTLY, REINDEX CONCURRENTLY, DETACH "
    "PARTITION CONCURRENTLY and VACUUM inside BEGIN … COMMIT or a DO block: the script fails "
    "there, after the statements before it have taken their locks.",
    "Run the statement outside any transaction block (after COMMIT, never inside DO), and "
    "never with psql --single-transaction.",
)
LOCK_TIMEOUT_MISSING = _rule(
    "lock-timeout-missing",
    "error",
    "A statement that blocks writes runs without lock_timeout",
    "The DDL waits for its lock behind any long transaction, and while it waits every sale "
    "that touches the table queues behind the DDL: a minute-long outage from a statement "
    "that itself takes milliseconds.",
    "SET lock_timeout = '2s' (or SET LOCAL inside the transaction) before it, and retry the "
    "script when it times out.",
)
STATEMENT_TIMEOUT_MISSING = _rule(
    "statement-timeout-missing",
    "warning",
    "A statement that scans, rewrites or indexes a table runs without statement_timeout",
    "Without a bound a scan or rewrite that takes far longer than predicted holds its lock "
    "until someone notices.",
    "SET statement_timeout before it, to a bound you accept (or 0 explicitly, for an index "
    "built CONCURRENTLY that may take hours).",
)
EXPAND_CONTRACT_MIXED = _rule(
    "expand-contract-mixed",
    "error",
    "Expand and contract in one file (or the header's strategy says otherwise)",
    "The contract step may only run once the dual-write window proved the new schema (GO) and "
    "nothing reads the old one; in one file with the expand step it runs before any of that "
    "can be true.",
    "Split the script: expand (create, add) now; contract (drop, rename, change type) in its "
    "own file after cutover, checked with `dualwrite lint --live`.",
)
TEMPLATE_VALIDATION = _rule(
    "template-validation",
    "error",
    "No validation that raises on failure",
    "A check that only prints (RAISE NOTICE, a SELECT) lets psql carry on when the data is "
    "wrong; the script must stop itself.",
    "Add a DO block that checks the result and `RAISE EXCEPTION` (or ASSERT) when it is wrong, "
    "or `ALTER TABLE … VALIDATE CONSTRAINT`; run psql with ON_ERROR_STOP=1.",
)
AUTO_INCREMENT_COLUMN = _rule(
    "adding-auto-increment-column",
    "error",
    "A serial or identity column is added to an existing table",
    "PostgreSQL fills the new column for every existing row: the whole table is rewritten "
    "under ACCESS EXCLUSIVE, so nothing reads or writes it until that is done.",
    "Add a plain bigint column, attach a sequence default (`SET DEFAULT nextval(…)`) for new "
    "rows, and backfill existing rows in batches.",
)
EXCLUSION_CONSTRAINT = _rule(
    "adding-exclusion-constraint",
    "error",
    "An exclusion constraint is added to an existing table",
    "It builds its index and checks every row under ACCESS EXCLUSIVE, and unlike CHECK or "
    "FOREIGN KEY it cannot be added NOT VALID.",
    "Create the table with the constraint and copy the data into it (expand-contract), or "
    "enforce the rule in a trigger while the constraint is built on the new table.",
)
TABLE_REWRITE = _rule(
    "table-rewrite-command",
    "error",
    "VACUUM FULL, CLUSTER, SET TABLESPACE/LOGGED/UNLOGGED or REFRESH MATERIALIZED VIEW",
    "Each writes a new copy of the table under ACCESS EXCLUSIVE: reads and writes stop for the "
    "whole copy.",
    "Use pg_repack (or pg_squeeze) for VACUUM FULL and CLUSTER, REFRESH MATERIALIZED VIEW "
    "CONCURRENTLY (needs a unique index), and a new table filled by dualwrite instead of "
    "SET TABLESPACE / SET LOGGED.",
)
PREFER_JSONB = _rule(
    "prefer-jsonb",
    "warning",
    "A json column",
    "json has no equality operator: SELECT DISTINCT, UNION and GROUP BY over it fail, and "
    "every read parses the text again.",
    "Use jsonb.",
)
BACKFILL_IN_DDL_TRANSACTION = _rule(
    "backfill-in-ddl-transaction",
    "error",
    "Data is changed in the transaction that altered the table",
    "The ALTER's lock is held until COMMIT, so the table stays blocked for the whole "
    "backfill, not just for the DDL.",
    "COMMIT the DDL first; backfill afterwards in its own transactions, in batches.",
)
UNBATCHED_BACKFILL = _rule(
    "unbatched-backfill",
    "warning",
    "UPDATE or DELETE of every row in one statement",
    "One transaction locks every row it touches until it ends, writes the whole table's WAL at "
    "once (replicas lag) and leaves as many dead tuples behind.",
    "Backfill in batches of a few thousand keys (`WHERE id > $last AND id <= $last + 5000`), "
    "committing each, throttled.",
)
LOCK_TABLE = _rule(
    "lock-table",
    "warning",
    "An explicit LOCK TABLE",
    "The lock is held to the end of the transaction; at SHARE or above every write to the "
    "table waits for it.",
    "Let each statement take the lock it needs, with lock_timeout set; if you must lock, lock "
    "for as short a transaction as possible.",
)
WIDE_INDEX = _rule(
    "index-too-many-columns",
    "info",
    "A non-unique index on more than three columns",
    "Wide non-unique indexes are rarely used beyond their first columns and cost every write.",
    "Index the columns that narrow the result most (two or three).",
)
UNKNOWN_DISABLE = _rule(
    "disable-unknown-rule",
    "warning",
    "A dualwrite-lint comment disables a rule that does not exist",
    "A misspelt rule id disables nothing, so the finding it meant to accept is still there, or "
    "worse, the author believes a rule is off that is on.",
    "Use a rule id from docs/lint-rules.md.",
)
PSQL_INCLUDE = _rule(
    "psql-include",
    "warning",
    "A psql \\i or \\ir include",
    "The included file runs as part of this script but is not linted with it.",
    "Lint the included file too (pass it on the command line), or inline it.",
)
DYNAMIC_SQL = _rule(
    "dynamic-sql",
    "info",
    "A DO block runs dynamic SQL (EXECUTE)",
    "The statements it builds at run time cannot be checked.",
    "Write the statements out, or lint what they expand to.",
)
MAPPING_STILL_USES = _rule(
    "mapping-still-uses",
    "error",
    "The contract step drops or renames what a mapping still reads or writes",
    "The sidecar rewrites every write to the mapping's source into one statement that also "
    "reads these columns and writes the target: once they are gone, every such write fails.",
    "Remove the mapping from the configuration and restart the sidecars first (runbook step "
    "8), then run the contract step.",
    needs="config",
)
TRAFFIC_STILL_REFERENCES = _rule(
    "traffic-still-references",
    "error",
    "The contract step drops or renames what application traffic still uses",
    "A statement the application ran within --since (default 7 days) names this table or "
    "column: after the contract step it fails.",
    "Move those statements to the new schema and deploy; lint again once the --since window "
    "has passed without them.",
    needs="live",
)
TRAFFIC_UNREFERENCED = _rule(
    "traffic-unreferenced",
    "info",
    "Evidence: no application statement used what the contract step removes",
    "Recorded so the review has the evidence, not a guess: the sidecars analysed the traffic "
    "of the whole window and no statement referenced it.",
    "Nothing to change.",
    needs="live",
)
LOCK_QUEUE = _rule(
    "lock-queue",
    "warning",
    "Right now this statement would queue behind open transactions",
    "Transactions holding a lock that conflicts with this statement's lock are open now: the "
    "statement would wait for them, and with a blocking lock everything behind it would wait "
    "too.",
    "Run it when they are gone (or end them), with lock_timeout set so a wait fails fast.",
    needs="live",
)


@dataclass
class Context:
    """What the rules need while walking one script in order."""

    script: Script
    facts: list[Facts]
    #: relations created by this file so far (nobody else has rows in them)
    created: set[tuple[str | None, str]] = field(default_factory=set)
    findings: list[Finding] = field(default_factory=list)

    def is_new(self, relation: Relation) -> bool:
        return (relation.schema, relation.name) in self.created or (
            None,
            relation.name,
        ) in self.created

    def add(self, rule: Rule, statement: Statement | None, message: str, line: int = 1) -> None:
        self.findings.append(
            Finding(
                rule=rule.id,
                severity=rule.severity,
                path=self.script.path,
                line=statement.line if statement is not None else line,
                end_line=statement.end_line if statement is not None else None,
                message=message,
                why=rule.why,
                fix=rule.fix,
                statement=statement.index if statement is not None else None,
            )
        )


def check(script: Script, facts: list[Facts], known_rules: set[str]) -> list[Finding]:
    """Every dualwrite rule over one parsed script (squawk's run separately)."""
    context = Context(script, facts)
    _file_rules(context, known_rules)
    _walk(context)
    _template_rules(context)
    return context.findings


def _file_rules(context: Context, known_rules: set[str]) -> None:
    script = context.script
    for rule, line in script.disabled.items():
        if rule not in known_rules:
            context.add(UNKNOWN_DISABLE, None, f"unknown rule {rule!r} in a disable comment", line)
    for meta in script.meta:
        if meta.name in ("\\i", "\\ir", "\\include", "\\include_relative"):
            context.add(
                PSQL_INCLUDE, None, f"{meta.text}: the included file is not linted", meta.line
            )


def _walk(context: Context) -> None:
    """The rules that depend on what came before: timeouts, transactions, new tables."""
    lock_timeout = _Setting()
    statement_timeout = _Setting()
    transaction_locks: dict[int, dict[Relation, str]] = {}
    for statement, facts in zip(context.script.statements, context.facts, strict=True):
        if statement.kind == "TransactionStmt" and not statement.in_transaction:
            kind = enum_name(getattr(statement.node, "kind", ""))
            if kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE"):
                lock_timeout.end_transaction()
                statement_timeout.end_transaction()
        if facts.setting is not None:
            name, value, local = facts.setting
            in_tx = statement.in_transaction
            if name == "lock_timeout":
                lock_timeout.apply(value, local=local, in_transaction=in_tx, zero_is_off=True)
            elif name == "statement_timeout":
                statement_timeout.apply(value, local=local, in_transaction=in_tx, zero_is_off=False)
        for relation in facts.creates:
            context.created.add((relation.schema, relation.name))
        existing = {r: mode for r, mode in facts.locks.items() if not context.is_new(r)}
        _statement_rules(context, statement, facts, existing)
        if any(blocks_writes(mode) for mode in existing.values()) and not lock_timeout.active:
            context.add(
                LOCK_TIMEOUT_MISSING,
                statement,
                f"{_verb(statement)} takes {_modes(existing)} with no lock_timeout set",
            )
        heavy = facts.work in (REWRITE, SCAN, INDEX) and facts.relation is not None
        if (
            heavy
            and facts.relation is not None
            and not context.is_new(facts.relation)
            and not statement_timeout.active
        ):
            context.add(
                STATEMENT_TIMEOUT_MISSING,
                statement,
                f"{_verb(statement)} ({facts.work} of {facts.relation}) runs with no "
                "statement_timeout set",
            )
        if statement.transaction:
            held = transaction_locks.setdefault(statement.transaction, {})
            if facts.dml and facts.relation is not None and blocks_writes(held.get(facts.relation)):
                context.add(
                    BACKFILL_IN_DDL_TRANSACTION,
                    statement,
                    f"{_verb(statement)} changes {facts.relation} while this transaction holds "
                    f"{held[facts.relation]} on it",
                )
            for relation, mode in existing.items():
                if blocks_writes(mode):
                    held[relation] = mode


def _statement_rules(
    context: Context, statement: Statement, facts: Facts, existing: dict[Relation, str]
) -> None:
    if facts.concurrently and (statement.in_transaction or statement.inner):
        where = "a DO block" if statement.inner else "BEGIN … COMMIT"
        context.add(CONCURRENTLY_IN_TRANSACTION, statement, f"CONCURRENTLY inside {where}")
    if statement.kind == "VacuumStmt" and (statement.in_transaction or statement.inner):
        context.add(CONCURRENTLY_IN_TRANSACTION, statement, "VACUUM inside a transaction block")
    for table, column in facts.added_columns:
        type_name = _type_name(column)
        if type_name == "json":
            context.add(PREFER_JSONB, statement, f"column {column.colname} of {table} is json")
        if not context.is_new(table) and _auto_increment(column, type_name):
            context.add(
                AUTO_INCREMENT_COLUMN,
                statement,
                f"{table}.{column.colname} ({type_name or 'identity'}) on an existing table",
            )
    relation = facts.relation
    on_existing = relation is not None and not context.is_new(relation)
    for kind, _not_valid, name in facts.added_constraints:
        if kind == "CONSTR_EXCLUSION" and on_existing:
            context.add(
                EXCLUSION_CONSTRAINT,
                statement,
                f"exclusion constraint {name or '(unnamed)'} on existing table {relation}",
            )
    if facts.rewrite_command and on_existing:
        context.add(TABLE_REWRITE, statement, f"{facts.rewrite_command} rewrites {relation}")
    if facts.whole_table_dml and on_existing:
        context.add(UNBATCHED_BACKFILL, statement, f"{_verb(statement)} of every row of {relation}")
    if facts.explicit_lock and existing:
        context.add(LOCK_TABLE, statement, f"LOCK TABLE {_modes(existing)}")
    if facts.index_columns > 3 and not facts.unique_index:
        context.add(WIDE_INDEX, statement, f"non-unique index on {facts.index_columns} columns")
    body = statement.body
    if body is not None and body.dynamic:
        context.add(DYNAMIC_SQL, statement, "the DO block runs dynamic SQL (EXECUTE)")


def _template_rules(context: Context) -> None:
    _header(context)
    _idempotent(context)
    _mixed(context)
    _validation(context)


def _header(context: Context) -> None:
    header = context.script.header
    missing = [key for key in HEADER_KEYS if not header.get(key)]
    if missing:
        context.add(TEMPLATE_HEADER, None, f"header lacks {', '.join(missing)}")
    strategy = header.get("strategy", "").split()[0].lower() if header.get("strategy") else ""
    if strategy and strategy not in STRATEGIES:
        context.add(TEMPLATE_HEADER, None, f"strategy is {strategy!r}: use expand or contract")


def _idempotent(context: Context) -> None:
    guarded: set[tuple[str, str]] = set()
    for statement, facts in zip(context.script.statements, context.facts, strict=True):
        guarded |= _dropped_if_exists(statement)
        if facts.idempotent is not False or _guarded(statement, context, guarded):
            continue
        context.add(TEMPLATE_IDEMPOTENT, statement, f"{_verb(statement)} fails when run twice")


def _guarded(statement: Statement, context: Context, guarded: set[tuple[str, str]]) -> bool:
    """A statement made re-runnable by what surrounds it."""
    if statement.inner:
        do = _enclosing_do(context.script, statement)
        return do is not None and do.body is not None and bool(do.body.conditions)
    node = statement.node
    if statement.kind == "CreatePolicyStmt":
        return ("policy", str(getattr(node, "policy_name", ""))) in guarded
    if statement.kind == "CreateTrigStmt":
        return ("trigger", str(getattr(node, "trigname", ""))) in guarded
    if statement.kind == "AlterTableStmt":
        names = [
            getattr(cmd.def_, "conname", None)
            for cmd in getattr(node, "cmds", ()) or ()
            if enum_name(cmd.subtype) == "AT_AddConstraint"
        ]
        return bool(names) and all(("constraint", str(n)) in guarded for n in names if n)
    return False


def _dropped_if_exists(statement: Statement) -> set[tuple[str, str]]:
    node = statement.node
    found: set[tuple[str, str]] = set()
    if statement.kind == "DropStmt" and getattr(node, "missing_ok", False):
        kind = enum_name(getattr(node, "removeType", "")).removeprefix("OBJECT_").lower()
        for obj in getattr(node, "objects", ()) or ():
            names = [getattr(n, "sval", "") for n in obj] if isinstance(obj, tuple | list) else []
            if names:
                found.add((kind, names[-1]))
    if statement.kind == "AlterTableStmt":
        for cmd in getattr(node, "cmds", ()) or ():
            if enum_name(cmd.subtype) == "AT_DropConstraint" and cmd.missing_ok:
                found.add(("constraint", str(cmd.name)))
    return found


def _enclosing_do(script: Script, statement: Statement) -> Statement | None:
    for candidate in reversed(script.statements[: statement.index]):
        if not candidate.inner:
            return candidate if candidate.kind == "DoStmt" else None
    return None


def _mixed(context: Context) -> None:
    created: set[tuple[str | None, str]] = set()
    expand: list[Statement] = []
    contract: list[Statement] = []
    for statement, facts in zip(context.script.statements, context.facts, strict=True):
        if facts.change is Change.EXPAND:
            expand.append(statement)
        elif facts.change is Change.CONTRACT and not _only_new(facts, created):
            contract.append(statement)
        created |= {(r.schema, r.name) for r in facts.creates}
    strategy = (context.script.header.get("strategy") or "").split()
    declared = strategy[0].lower() if strategy else ""
    if expand and contract:
        first = contract[0] if declared != "contract" else expand[0]
        context.add(
            EXPAND_CONTRACT_MIXED,
            first,
            f"{len(expand)} expand and {len(contract)} contract statements in one file "
            f"(first contract statement: line {contract[0].line})",
        )
    elif declared == "expand" and contract:
        context.add(EXPAND_CONTRACT_MIXED, contract[0], "strategy: expand, but this contracts")
    elif declared == "contract" and expand:
        context.add(EXPAND_CONTRACT_MIXED, expand[0], "strategy: contract, but this expands")


def _only_new(facts: Facts, created: set[tuple[str | None, str]]) -> bool:
    """A contract statement about relations this file itself created (a rename of a new table)."""
    touched = (
        facts.drops_tables
        + [r for r, _ in facts.drops_columns]
        + [r for r, _ in facts.renames_tables]
        + [r for r, _, _ in facts.renames_columns]
        + [r for r, _ in facts.type_changes]
    )
    return bool(touched) and all(
        (r.schema, r.name) in created or (None, r.name) in created for r in touched
    )


def _validation(context: Context) -> None:
    statements = context.script.statements
    if not statements:
        return
    validates = False
    silent: list[Statement] = []
    for statement in statements:
        body = statement.body
        if body is not None:
            if body.raises:
                validates = True
            elif body.reports or body.conditions:
                silent.append(statement)
        if statement.kind == "AlterTableStmt" and any(
            enum_name(cmd.subtype) == "AT_ValidateConstraint"
            for cmd in getattr(statement.node, "cmds", ()) or ()
        ):
            validates = True
    for statement in silent:
        context.add(
            TEMPLATE_VALIDATION, statement, "this DO block checks but never raises an exception"
        )
    if not validates and not silent:
        context.add(TEMPLATE_VALIDATION, None, "no DO block raises and no constraint is validated")


# --- small helpers ----------------------------------------------------------------------------


@dataclass
class _Setting:
    """A GUC's state along the script: set for the session, or for the current transaction."""

    session: bool = False
    local: bool = False

    @property
    def active(self) -> bool:
        return self.session or self.local

    def apply(
        self, value: str | None, *, local: bool, in_transaction: bool, zero_is_off: bool
    ) -> None:
        on = value is not None and not (zero_is_off and value.strip().strip("'") in ("0", ""))
        if local:
            self.local = on and in_transaction  # SET LOCAL outside a transaction does nothing
        else:
            self.session = on
            self.local = False

    def end_transaction(self) -> None:
        self.local = False


def _verb(statement: Statement) -> str:
    words = statement.text.split()
    return " ".join(words[:3]) if words else statement.kind


def _modes(locks: dict[Relation, str]) -> str:
    return ", ".join(f"{mode} on {relation}" for relation, mode in sorted(locks.items()))


def _type_name(column: object) -> str:
    type_name = getattr(column, "typeName", None)
    names = [getattr(n, "sval", "") for n in (type_name.names if type_name else ())]
    return names[-1] if names else ""


def _auto_increment(column: object, type_name: str) -> bool:
    if type_name in ("serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"):
        return True
    return any(
        enum_name(getattr(c, "contype", "")) == "CONSTR_IDENTITY"
        for c in getattr(column, "constraints", ()) or ()
    )
