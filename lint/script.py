"""A migration script as the linter reads it: psql's additions set aside, statements with lines.

psql meta-commands (``\\set``, ``\\gexec``, ``\\i``…) and psql variables (``:name``,
``:'name'``) are not SQL: they are blanked out (same length, so every offset and line still
points into the file as written) before PostgreSQL's parser (pglast) sees the text, and a
meta-command that ends a statement (``SELECT … \\gexec``) ends it there. The SQL inside a
``DO`` block is parsed too (PL/pgSQL), so the statements it runs and whether it raises are
known.
"""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pglast import ast
from pglast.parser import ParseError, parse_plpgsql_json, parse_sql

#: ``-- dualwrite-lint: disable=rule-a, rule-b`` anywhere in a file
_DISABLE = re.compile(
    r"--\s*dualwrite-lint:\s*disable\s*=\s*([A-Za-z0-9_-]+(?:\s*,\s*[A-Za-z0-9_-]+)*)"
)
_HEADER_KEY = re.compile(r"^--\s*([A-Za-z][A-Za-z _-]*?)\s*:\s*(.*)$")
_IDENT_START = re.compile(r"[A-Za-z_\"']")
#: PL/pgSQL RAISE levels (PostgreSQL's elog.h): ERROR and above abort the script
_ELOG_ERROR = 21


@dataclass(frozen=True)
class MetaCommand:
    line: int
    text: str

    @property
    def name(self) -> str:
        return self.text.split(None, 1)[0] if self.text.strip() else "\\"


@dataclass
class Statement:
    """One top-level SQL statement of the file (or one run by a DO block, ``inner=True``)."""

    index: int
    node: ast.Node
    text: str
    #: character offsets into the file, and 1-based lines
    start: int
    end: int
    line: int
    end_line: int
    #: inside BEGIN … COMMIT written in the file
    in_transaction: bool = False
    #: which explicit transaction block (0: none)
    transaction: int = 0
    #: run by a DO block (the lines are the DO block's)
    inner: bool = False
    #: for a DO block: what its PL/pgSQL body does
    body: DoBody | None = None

    @property
    def kind(self) -> str:
        return type(self.node).__name__


@dataclass
class DoBody:
    """What a DO block's PL/pgSQL body does, as far as the linter needs to know."""

    #: SQL statements it runs (not dynamic EXECUTE), in order
    statements: list[str] = field(default_factory=list)
    #: it can abort: RAISE at level EXCEPTION, bare RAISE or ASSERT
    raises: bool = False
    #: RAISE at a level that does not abort (NOTICE, WARNING…)
    reports: bool = False
    #: it runs dynamic SQL (EXECUTE), which cannot be analysed
    dynamic: bool = False
    #: the conditions of its IF statements (a guarded statement is idempotent)
    conditions: list[str] = field(default_factory=list)


@dataclass
class Script:
    """A parsed migration file."""

    path: str
    text: str
    #: the text PostgreSQL's parser saw (psql additions blanked)
    sql: str
    statements: list[Statement]
    meta: list[MetaCommand]
    #: ``key: value`` pairs of the leading comment block (keys lower-cased)
    header: dict[str, str]
    #: rule ids disabled by comments, and the line of each comment
    disabled: dict[str, int]
    #: (message, line) when the file does not parse; statements then holds what came before
    parse_error: tuple[str, int] | None = None
    _line_starts: list[int] = field(default_factory=list, repr=False)

    def line_of(self, offset: int) -> int:
        """1-based line of a character offset."""
        return bisect.bisect_right(self._line_starts, offset)

    @property
    def line_count(self) -> int:
        return len(self._line_starts)


def read_script(path: str | Path) -> Script:
    """Read and parse a file; raise OSError or UnicodeDecodeError when it cannot be read."""
    text = Path(path).read_text(encoding="utf-8")
    return parse_script(str(path), text)


def parse_script(
    path: str, text: str, blanked: tuple[str, list[MetaCommand]] | None = None
) -> Script:
    """Parse migration text: statements with lines, header, disabled rules, meta-commands.

    ``blanked`` is :func:`blank_psql`'s result when the caller already has it.
    """
    sql, meta = blanked if blanked is not None else blank_psql(text)
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
    script = Script(
        path=path,
        text=text,
        sql=sql,
        statements=[],
        meta=meta,
        header=parse_header(text),
        disabled=_disabled(text, line_starts),
        _line_starts=line_starts,
    )
    try:
        raw = parse_sql(sql)
    except ParseError as exc:
        message, offset = str(exc.args[0]), int(exc.args[1]) if len(exc.args) > 1 else 0
        script.parse_error = (message, script.line_of(max(offset - 1, 0)))
        return script
    script.statements = _statements(script, raw)
    return script


def _disabled(text: str, line_starts: list[int]) -> dict[str, int]:
    disabled: dict[str, int] = {}
    for match in _DISABLE.finditer(text):
        line = bisect.bisect_right(line_starts, match.start())
        for rule in match.group(1).split(","):
            if rule.strip():
                disabled.setdefault(rule.strip().lower(), line)
    return disabled


def parse_header(text: str) -> dict[str, str]:
    """The leading ``-- key: value`` comment block; indented ``--`` lines continue a value."""
    header: dict[str, str] = {}
    key = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if not line.startswith("--"):
            break
        match = _HEADER_KEY.match(line)
        if match is not None and not match.group(1).lower().startswith("dualwrite-lint"):
            key = match.group(1).strip().lower()
            header[key] = match.group(2).strip()
        elif key is not None and line[2:].strip():
            header[key] = f"{header[key]} {line[2:].strip()}".strip()
    return header


# --- psql ---------------------------------------------------------------------------------


#: what the psql scanner stops at: comments, quotes, dollar quotes, backslashes, colons, ';'
_PSQL_TOKEN = re.compile(
    r"--|/\*|(?<![A-Za-z0-9_$])[eE]'|'|\"|\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$|\\|:|;"
)


def blank_psql(text: str) -> tuple[str, list[MetaCommand]]:
    """``text`` with psql meta-commands and variables replaced by spaces (same length)."""
    out = list(text)
    meta: list[MetaCommand] = []
    i, n = 0, len(text)
    pending = False  # SQL since the last ';' that a meta-command would end
    while i < n:
        match = _PSQL_TOKEN.search(text, i)
        if match is None:
            break
        start, lexeme = match.start(), match.group(0)
        if text[i:start].strip():
            pending = True
        if lexeme == "--":
            i = _until(text, "\n", start)
        elif lexeme == "/*":
            i = _block_comment_end(text, start)
        elif lexeme in ("'", '"') or lexeme in ("e'", "E'"):
            i = _quoted_end(text, start)
            pending = True
        elif lexeme.startswith("$"):
            close = text.find(lexeme, start + len(lexeme))
            i = n if close < 0 else close + len(lexeme)
            pending = True
        elif lexeme == "\\":
            end = _until(text, "\n", start)
            meta.append(MetaCommand(text.count("\n", 0, start) + 1, text[start:end].strip()))
            out[start:end] = " " * (end - start)
            if pending:
                out[start] = ";"  # psql sends the buffer: the statement ends here
                pending = False
            i = end
        elif lexeme == ":":
            after = text[start + 1 : start + 2]
            before = text[start - 1 : start]
            if after and after != ":" and before != ":" and _IDENT_START.match(after):
                out[start] = " "  # :name, :'name', :"name" become a name, a string, an identifier
            pending = True
            i = start + 1
        else:  # ';'
            pending = False
            i = start + 1
    return "".join(out), meta


def _until(text: str, needle: str, start: int) -> int:
    end = text.find(needle, start)
    return len(text) if end < 0 else end


def _block_comment_end(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/*", i):
            depth += 1
            i += 2
        elif text.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def _quoted_end(text: str, start: int) -> int:
    escapes = text[start] in "eE"
    i = start + 1 if escapes else start
    quote = text[i]
    i += 1
    while i < len(text):
        ch = text[i]
        if escapes and ch == "\\":
            i += 2
            continue
        if ch == quote:
            if text.startswith(quote, i + 1):
                i += 2
                continue
            return i + 1
        i += 1
    return len(text)


# --- statements -----------------------------------------------------------------------------


def _statements(script: Script, raw: Any) -> list[Statement]:
    statements: list[Statement] = []
    transaction, depth = 0, 0
    for item in raw:
        node = item.stmt
        if node is None:
            continue
        start = item.stmt_location or 0
        end = start + item.stmt_len if item.stmt_len else len(script.sql)
        text = script.sql[start:end].strip()
        if isinstance(node, ast.TransactionStmt):
            depth, transaction = _transaction(node, depth, transaction)
        statement = Statement(
            index=len(statements),
            node=node,
            text=text,
            start=start,
            end=end,
            line=script.line_of(start),
            end_line=script.line_of(max(end - 1, start)),
            in_transaction=depth > 0 and not isinstance(node, ast.TransactionStmt),
            transaction=transaction if depth > 0 else 0,
        )
        statements.append(statement)
        if isinstance(node, ast.DoStmt):
            statement.body = do_body(node)
            statements += _inner(statement, statement.body, len(statements))
    return statements


def _transaction(node: ast.TransactionStmt, depth: int, transaction: int) -> tuple[int, int]:
    kind = str(getattr(node.kind, "name", node.kind))
    if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
        return depth + 1, transaction + 1 if depth == 0 else transaction
    if kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK", "TRANS_STMT_PREPARE"):
        return max(depth - 1, 0), transaction
    return depth, transaction


def _inner(do: Statement, body: DoBody, index: int) -> list[Statement]:
    """The statements a DO block runs, as statements at the DO block's lines."""
    inner: list[Statement] = []
    for text in body.statements:
        try:
            parsed = parse_sql(text)
        except ParseError:
            continue
        for item in parsed:
            if item.stmt is None:
                continue
            inner.append(
                Statement(
                    index=index + len(inner),
                    node=item.stmt,
                    text=text,
                    start=do.start,
                    end=do.end,
                    line=do.line,
                    end_line=do.end_line,
                    in_transaction=True,  # a DO block is one statement: always one transaction
                    transaction=do.transaction,
                    inner=True,
                )
            )
    return inner


def do_body(node: ast.DoStmt) -> DoBody:
    """Parse a DO block's PL/pgSQL (other languages: an empty body)."""
    code, language = "", "plpgsql"
    for arg in node.args or ():
        if isinstance(arg, ast.DefElem) and isinstance(arg.arg, ast.String):
            if arg.defname == "as":
                code = arg.arg.sval or ""
            elif arg.defname == "language":
                language = (arg.arg.sval or "").lower()
    body = DoBody()
    if language != "plpgsql" or not code:
        body.dynamic = bool(code)
        return body
    tag = "$dwlint$"
    while tag in code:
        tag = tag[:-1] + "x$"
    try:
        tree = json.loads(parse_plpgsql_json(f"DO {tag}{code}{tag}"))
    except (ParseError, ValueError):
        body.dynamic = True
        return body
    _walk_plpgsql(tree, body)
    return body


def _walk_plpgsql(node: Any, body: DoBody) -> None:
    if isinstance(node, list):
        for item in node:
            _walk_plpgsql(item, body)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "PLpgSQL_stmt_execsql":
            query = value.get("sqlstmt", {}).get("PLpgSQL_expr", {}).get("query")
            if query:
                body.statements.append(query)
        elif key == "PLpgSQL_stmt_raise":
            level = value.get("elog_level", _ELOG_ERROR)
            if level >= _ELOG_ERROR:
                body.raises = True
            else:
                body.reports = True
        elif key == "PLpgSQL_stmt_assert":
            body.raises = True
        elif key == "PLpgSQL_stmt_dynexecute":
            body.dynamic = True
        elif key == "PLpgSQL_stmt_if":
            cond = value.get("cond", {}).get("PLpgSQL_expr", {}).get("query")
            if cond:
                body.conditions.append(cond)
        _walk_plpgsql(value, body)
