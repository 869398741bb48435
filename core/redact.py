"""Error texts that may be stored or logged: PostgreSQL's SQLSTATE and names kept, row values not.

A target that rejects a row answers with the row in its DETAIL (``Failing row contains (1,
bad@x, ...)``, ``Key (email)=(bad@x) already exists``) and, for data exceptions, with the value
in the message (``invalid input syntax for type integer: "abc"``). Those texts end up in
``dualwrite.dead_letters.error``, in run records and in log lines, where nobody agreed to keep
customer data. :func:`describe_error` keeps what an operator needs (SQLSTATE, message, the
constraint, column and table names) and shows values only for the columns the mapping lists
in ``compare.reveal_columns`` (the same rule as the reconciler's findings). A DETAIL whose values
cannot be attributed to columns (a whole failing row, an unknown shape) is redacted whole.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import asyncpg

from core.mapping import CompiledMapping

REDACTED = "[redacted]"
#: ``Key (a, b)=(1, x) already exists.`` and its relatives (FK, exclusion)
_KEY_DETAIL = re.compile(r"^Key \((?P<columns>[^()]*)\)=\((?P<values>.*?)\)(?P<rest> [^=]*)$", re.S)
_FAILING_ROW = re.compile(r"^Failing row contains \(.*\)\.?$", re.S)
#: quoted spans in a message: values for data exceptions and raised errors
_QUOTED = re.compile(r"\"(?:[^\"]|\"\")*\"|'(?:[^']|'')*'")
#: SQLSTATE classes whose message text can carry a value: data exceptions, PL/pgSQL RAISE,
#: internal errors
_VALUE_IN_MESSAGE = ("22", "P0", "XX")
#: longest description kept (the dead-letter table and log lines bound it anyway)
MAX_LENGTH = 2000


def describe_error(exc: BaseException, mapping: CompiledMapping | None = None) -> str:
    """One line for a stored or logged error, values redacted as the mapping's reveal rule says."""
    if not isinstance(exc, asyncpg.PostgresError):
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}"[:MAX_LENGTH]
    reveal = mapping.config.compare.reveal_columns if mapping is not None else []
    state = str(getattr(exc, "sqlstate", None) or "XX000")
    message = str(exc.args[0]) if exc.args else type(exc).__name__
    if state.startswith(_VALUE_IN_MESSAGE):
        message = _QUOTED.sub(_mask_quoted, message)
    parts = [f"{state}: {message}"]
    names = {
        "constraint": getattr(exc, "constraint_name", None),
        "column": getattr(exc, "column_name", None),
        "table": getattr(exc, "table_name", None),
    }
    parts += [f"{what} {name}" for what, name in names.items() if name]
    detail = getattr(exc, "detail", None)
    if detail:
        parts.append(f"DETAIL: {redact_detail(str(detail), reveal)}")
    return "; ".join(parts)[:MAX_LENGTH]


def redact_detail(detail: str, reveal: Collection[str] = ()) -> str:
    """PostgreSQL's DETAIL with the values of unrevealed columns replaced by ``[redacted]``."""
    key = _KEY_DETAIL.match(detail)
    if key is not None:
        columns = [c.strip().strip('"') for c in key["columns"].split(",")]
        if all(c in reveal for c in columns) and "=" not in key["rest"]:
            return detail
        return f"Key ({key['columns']})=({REDACTED}){key['rest']}"
    if _FAILING_ROW.match(detail):
        return f"Failing row contains ({REDACTED})."
    return REDACTED


def _mask_quoted(match: re.Match[str]) -> str:
    quote = match.group(0)[0]
    return f"{quote}{REDACTED}{quote}"
