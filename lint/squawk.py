"""squawk (the ``squawk-cli`` package) as the engine of the generic static rules.

squawk runs once per file on the text PostgreSQL's parser saw (psql additions blanked, same
lines), with its JSON reporter and an empty configuration of ours, so a ``.squawk.toml`` in
the working tree does not change what dualwrite reports. Its findings become ours: squawk's
lines are 0-based, ours 1-based; the severity, why and safe rewrite come from the table
below (squawk reports everything as a warning). squawk's rules that dualwrite's own rules
replace (with knowledge of transactions, SET LOCAL and the project's template) are excluded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from lint.findings import SQUAWK, Finding, Rule

SQUAWK_ENV = "DUALWRITE_SQUAWK"
TIMEOUT_SECONDS = 60.0

#: squawk's rules that dualwrite's own rules replace, with the rule that does
REPLACED = {
    "prefer-robust-stmts": "template-idempotent",
    "require-timeout-settings": "lock-timeout-missing",
    "require-lock-timeout": "lock-timeout-missing",
    "require-statement-timeout": "statement-timeout-missing",
    "ban-concurrent-index-creation-in-transaction": "concurrently-in-transaction",
}
#: squawk reports what its own parser rejects; PostgreSQL's parser (pglast) decides instead
SQUAWK_SYNTAX_ERROR = "syntax-error"

#: squawk rules squawk reports even about a table this same file created (no rows, no users)
_MOOT_ON_NEW_TABLES = frozenset(
    {
        "require-concurrent-index-creation",
        "require-concurrent-index-deletion",
        "constraint-missing-not-valid",
        "adding-foreign-key-constraint",
        "disallowed-unique-constraint",
        "adding-not-nullable-field",
        "adding-serial-primary-key-field",
        "changing-column-type",
        "adding-field-with-default",
        "adding-required-field",
        "ban-drop-column",
        "renaming-column",
    }
)

SQUAWK_RULES: dict[str, Rule] = {}


def _rule(id_: str, severity: str, summary: str, why: str, fix: str) -> None:
    SQUAWK_RULES[id_] = Rule(id_, severity, summary, why, fix, engine=SQUAWK)


_rule(
    "require-concurrent-index-creation",
    "error",
    "CREATE INDEX without CONCURRENTLY",
    "A plain CREATE INDEX holds a SHARE lock for the whole build: every INSERT, UPDATE and "
    "DELETE on the table waits (sales stop) until the index is built.",
    "CREATE INDEX CONCURRENTLY IF NOT EXISTS …, outside any transaction block; then check "
    "pg_index.indisvalid (a failed concurrent build leaves an INVALID index to drop and redo).",
)
_rule(
    "require-concurrent-index-deletion",
    "warning",
    "DROP INDEX without CONCURRENTLY",
    "DROP INDEX takes ACCESS EXCLUSIVE on the table: brief, but it queues behind every open "
    "transaction and everything queues behind it.",
    "DROP INDEX CONCURRENTLY IF EXISTS …, outside any transaction block.",
)
_rule(
    "require-concurrent-reindex",
    "error",
    "REINDEX without CONCURRENTLY",
    "REINDEX blocks writes to the table (and reads that would use the index) until done.",
    "REINDEX INDEX CONCURRENTLY …, outside any transaction block.",
)
_rule(
    "require-concurrent-partition-detach",
    "warning",
    "DETACH PARTITION without CONCURRENTLY",
    "A plain DETACH PARTITION takes ACCESS EXCLUSIVE on the parent table.",
    "ALTER TABLE … DETACH PARTITION … CONCURRENTLY, outside any transaction block.",
)
_rule(
    "constraint-missing-not-valid",
    "error",
    "A CHECK or FOREIGN KEY added without NOT VALID",
    "Adding a validated constraint scans the whole table while holding a lock that blocks "
    "writes (ACCESS EXCLUSIVE for CHECK).",
    "ADD CONSTRAINT … NOT VALID (instant), then in a separate transaction ALTER TABLE … "
    "VALIDATE CONSTRAINT … (SHARE UPDATE EXCLUSIVE: reads and writes continue).",
)
_rule(
    "adding-foreign-key-constraint",
    "error",
    "A FOREIGN KEY validated as it is added",
    "Validating a new foreign key scans the table under SHARE ROW EXCLUSIVE on both tables: "
    "writes to both stop for the scan.",
    "ADD CONSTRAINT … FOREIGN KEY … NOT VALID, then VALIDATE CONSTRAINT in a later transaction.",
)
_rule(
    "adding-not-nullable-field",
    "error",
    "SET NOT NULL on an existing column",
    "SET NOT NULL checks every row under ACCESS EXCLUSIVE: nothing reads or writes the table "
    "during the scan.",
    "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID; VALIDATE CONSTRAINT c; then SET NOT "
    "NULL (PostgreSQL 12+ uses the valid constraint and skips the scan); DROP CONSTRAINT c.",
)
_rule(
    "adding-required-field",
    "error",
    "A NOT NULL column without a default",
    "On a table with rows the ALTER fails; on an empty one, every INSERT of the running "
    "application that does not name the column fails from now on.",
    "Add the column nullable (or with a constant default), let dualwrite or a backfill fill "
    "it, then enforce NOT NULL with a validated CHECK.",
)
_rule(
    "adding-field-with-default",
    "error",
    "A column whose default must be computed per row",
    "A volatile default (random(), gen_random_uuid(), clock_timestamp()…) or a stored "
    "generated column makes PostgreSQL rewrite the table under ACCESS EXCLUSIVE.",
    "Add the column without that default, then ALTER COLUMN … SET DEFAULT (affects new rows "
    "only) and backfill existing rows in batches.",
)
_rule(
    "adding-serial-primary-key-field",
    "error",
    "A PRIMARY KEY built as it is added",
    "The unique index is built under ACCESS EXCLUSIVE: nothing reads or writes the table.",
    "CREATE UNIQUE INDEX CONCURRENTLY …; then ADD CONSTRAINT … PRIMARY KEY USING INDEX ….",
)
_rule(
    "disallowed-unique-constraint",
    "error",
    "A UNIQUE constraint built as it is added",
    "The unique index is built under ACCESS EXCLUSIVE: nothing reads or writes the table.",
    "CREATE UNIQUE INDEX CONCURRENTLY …; then ADD CONSTRAINT … UNIQUE USING INDEX ….",
)
_rule(
    "changing-column-type",
    "error",
    "ALTER COLUMN … TYPE",
    "Most type changes rewrite the table under ACCESS EXCLUSIVE, and every running query "
    "that reads the column may break on the new type.",
    "Expand-contract: a new column (or table), mirrored by dualwrite, backfilled and "
    "reconciled; move reads, then drop the old column in a contract step.",
)
_rule(
    "renaming-column",
    "error",
    "RENAME COLUMN",
    "Every running statement that names the old column fails the moment the rename commits.",
    "Add the new column, mirror writes into it (a dualwrite mapping), move reads, then drop "
    "the old one in a contract step.",
)
_rule(
    "renaming-table",
    "error",
    "RENAME TABLE",
    "Every running statement that names the old table fails the moment the rename commits.",
    "Create the new table, mirror it with dualwrite, move reads and writes, then drop the old "
    "one in a contract step.",
)
_rule(
    "ban-drop-column",
    "warning",
    "DROP COLUMN",
    "A running statement that still reads or writes the column fails after the drop. Without "
    "--live and traffic evidence nobody has shown that nothing does.",
    "Run `dualwrite lint --live` on the contract step: it checks the mappings and the traffic "
    "the sidecars recorded, and turns this into evidence either way.",
)
_rule(
    "ban-drop-table",
    "warning",
    "DROP TABLE",
    "A running statement that still uses the table fails after the drop. Without --live and "
    "traffic evidence nobody has shown that nothing does.",
    "Run `dualwrite lint --live` on the contract step: it checks the mappings and the traffic "
    "the sidecars recorded.",
)
_rule(
    "ban-drop-constraint",
    "warning",
    "DROP CONSTRAINT",
    "The guarantee it gave (a foreign key, a CHECK, uniqueness) is gone for every writer at "
    "once, including code still relying on it.",
    "Drop it only with the table it guards (contract), or once no code relies on it.",
)
_rule(
    "ban-drop-database",
    "error",
    "DROP DATABASE",
    "Everything in it is gone, for every application using it.",
    "Never in a migration script.",
)
_rule(
    "ban-drop-not-null",
    "warning",
    "DROP NOT NULL",
    "Code that relies on the column never being NULL (the new schema's readers) may break.",
    "Make sure every reader handles NULL first.",
)
_rule(
    "ban-truncate-cascade",
    "error",
    "TRUNCATE … CASCADE",
    "It empties every table that references this one, however many there are.",
    "TRUNCATE the tables you mean, by name.",
)
_rule(
    "ban-uncommitted-transaction",
    "error",
    "BEGIN without COMMIT",
    "The script ends with the transaction open: its locks stay held until the session ends.",
    "End the transaction with COMMIT.",
)
_rule(
    "transaction-nesting",
    "warning",
    "BEGIN inside a transaction, or COMMIT without BEGIN",
    "PostgreSQL has no nested transactions: the inner COMMIT commits everything so far.",
    "One BEGIN … COMMIT per block; use SAVEPOINT to nest.",
)
_rule(
    "ban-create-domain-with-constraint",
    "warning",
    "A domain with a constraint",
    "Later changes to the domain's constraint check every column that uses it, under locks.",
    "Put the constraint on the table columns instead.",
)
_rule(
    "ban-alter-domain-with-add-constraint",
    "warning",
    "ALTER DOMAIN … ADD CONSTRAINT",
    "It validates every column of every table using the domain, under locks.",
    "Add NOT VALID constraints to the tables instead.",
)
_rule(
    "require-enum-value-ordering",
    "info",
    "ALTER TYPE … ADD VALUE without BEFORE/AFTER",
    "The new value sorts last, which may not be what ORDER BY on the enum should give.",
    "Say where it goes: ADD VALUE 'x' BEFORE 'y' (or AFTER).",
)
_rule(
    "prefer-bigint-over-int",
    "info",
    "A 32-bit integer column",
    "int runs out at 2,147,483,647; widening it later rewrites the table.",
    "Use bigint.",
)
_rule(
    "prefer-bigint-over-smallint",
    "info",
    "A 16-bit integer column",
    "smallint runs out at 32,767; widening it later rewrites the table.",
    "Use bigint (or integer where the range is really bounded).",
)
_rule(
    "prefer-identity",
    "info",
    "A serial column",
    "serial's sequence is a separate object with its own ownership and grants.",
    "Use bigint GENERATED BY DEFAULT AS IDENTITY.",
)
_rule(
    "prefer-text-field",
    "info",
    "A varchar(n) column",
    "Raising n later takes ACCESS EXCLUSIVE; the length limit is better as a CHECK.",
    "Use text with CHECK (char_length(col) <= n).",
)
_rule(
    "prefer-timestamp-tz",
    "info",
    "A timestamp without time zone",
    "Values lose their offset: the same instant from two time zones stores two values.",
    "Use timestamptz.",
)
_rule(
    "ban-char-field",
    "info",
    "A char(n) column",
    "char pads with spaces, which compare and concatenate in surprising ways.",
    "Use text (with a CHECK on the length if needed).",
)


@dataclass(frozen=True)
class SquawkHit:
    """One squawk finding, 1-based."""

    rule: str
    line: int
    end_line: int
    message: str
    help: str | None


def squawk_binary() -> str:
    """The squawk executable of this Python's environment (or ``$DUALWRITE_SQUAWK``)."""
    import os  # noqa: PLC0415

    override = os.environ.get(SQUAWK_ENV)
    if override:
        if not Path(override).is_file():
            raise ConfigError(SQUAWK_ENV, f"{override}: no such file")
        return override
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (scripts / "squawk", Path(sys.executable).parent / "squawk"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("squawk")
    if found is None:
        raise ConfigError(
            "squawk", "the squawk binary is missing: pip install 'squawk-cli>=2.70,<3'"
        )
    return found


def version(binary: str) -> str:
    done = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
    )
    return done.stdout.strip().removeprefix("squawk ").strip()


def run_squawk(binary: str, path: str, sql: str, *, pg_version: int) -> list[SquawkHit]:
    """squawk's findings on ``sql`` (reported as ``path``), minus the rules we replace."""
    with resources.as_file(resources.files("lint") / "squawk.toml") as config:
        done = subprocess.run(
            [
                binary,
                "--reporter",
                "json",
                "--config",
                str(config),
                "--pg-version",
                f"{pg_version}.0",
                "--stdin-filepath",
                path,
                "--exclude",
                ",".join(sorted(REPLACED)),
            ],
            input=sql,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_SECONDS,
            check=False,
        )
    if done.returncode not in (0, 1):
        raise ConfigError("squawk", f"squawk exited {done.returncode}: {done.stderr.strip()}")
    return parse_output(done.stdout)


def parse_output(stdout: str) -> list[SquawkHit]:
    try:
        data: Any = json.loads(stdout or "[]")
    except json.JSONDecodeError as exc:
        raise ConfigError("squawk", f"unreadable JSON from squawk: {exc}") from None
    hits = []
    for item in data:
        rule = str(item.get("rule_name", ""))
        line = int(item.get("line", 0)) + 1
        hits.append(
            SquawkHit(
                rule=rule,
                line=line,
                end_line=int(item.get("line_end", line - 1)) + 1,
                message=str(item.get("message", "")),
                help=item.get("help"),
            )
        )
    return hits


def to_finding(hit: SquawkHit, path: str, statement: int | None) -> Finding:
    """Our finding for a squawk hit: our severity, why and fix when we know the rule."""
    rule = SQUAWK_RULES.get(hit.rule)
    if rule is None:
        return Finding(
            rule=hit.rule,
            severity="warning",
            path=path,
            line=hit.line,
            end_line=hit.end_line,
            message=hit.message,
            why=hit.message,
            fix=hit.help or f"see squawk's documentation of {hit.rule}",
            engine=SQUAWK,
            statement=statement,
        )
    return Finding(
        rule=rule.id,
        severity=rule.severity,
        path=path,
        line=hit.line,
        end_line=hit.end_line,
        message=hit.message,
        why=rule.why,
        fix=rule.fix,
        engine=SQUAWK,
        statement=statement,
    )


def moot_on_new_tables(rule: str) -> bool:
    return rule in _MOOT_ON_NEW_TABLES
