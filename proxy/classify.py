"""Tells read from write from other statements by their first keyword, without parsing them."""

from __future__ import annotations

import re
from typing import Final

READ: Final = "read"
WRITE: Final = "write"
OTHER: Final = "other"

_FIRST_WORD: Final = {
    b"select": READ,
    b"with": READ,
    b"values": READ,
    b"table": READ,
    b"show": READ,
    b"fetch": READ,
    b"insert": WRITE,
    b"update": WRITE,
    b"delete": WRITE,
    b"merge": WRITE,
    b"copy": WRITE,
    b"truncate": WRITE,
}
_SPACE: Final = b" \t\r\n\f\v("


def first_keyword(sql: bytes) -> bytes:
    """The first word of ``sql``, lower-cased, skipping blanks, parentheses and comments."""
    pos = 0
    end = len(sql)
    while pos < end:
        char = sql[pos]
        if char in _SPACE:
            pos += 1
        elif sql.startswith(b"--", pos):
            newline = sql.find(b"\n", pos)
            pos = end if newline < 0 else newline + 1
        elif sql.startswith(b"/*", pos):
            close = sql.find(b"*/", pos + 2)
            pos = end if close < 0 else close + 2
        else:
            break
    stop = pos
    while stop < end and (chr(sql[stop]).isalpha() or sql[stop] == ord("_")):
        stop += 1
    return sql[pos:stop].lower()


def statement_kind(sql: bytes) -> str:
    """``read``, ``write`` or ``other`` for metrics; COPY counts as a write either way."""
    # Fast path for the usual statement that starts with its keyword; comments fall back.
    # (Only a metrics label depends on this: statements are never rewritten from it.)
    lead = _LEAD.match(sql)
    if lead is not None:
        return _FIRST_WORD.get(lead.group(1).lower(), OTHER)
    return _FIRST_WORD.get(first_keyword(sql), OTHER)


_LEAD: Final = re.compile(rb"[ \t\r\n\f\v(]*([A-Za-z_]+)(?![A-Za-z0-9_$])")
