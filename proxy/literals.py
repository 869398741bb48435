"""Literals of one SQL statement as parameters: the statement's shape text with ``$n``, typed
the way PostgreSQL's parser types the constants it replaces.

A literal becomes a parameter only where a parameter means the same thing:

* integer literals are ``int4`` when they fit in 32 bits, else ``int8`` when they fit in 64
  bits, else ``numeric`` (PostgreSQL's ``make_const``); a leading minus sign that the parser
  folds into the constant goes with it; decimal literals are ``numeric``;
* string literals are ``unknown`` (type 0): the server resolves them from their context at
  Parse, as it resolves an unknown literal;
* everything else stays in the text: booleans, NULL, bit strings, ``E''``/``U&''`` strings and
  strings with a backslash (their meaning depends on standard_conforming_strings), type
  modifiers (``varchar(10)``), the literal of a prefix cast (``interval '1 day'``), positional
  ``ORDER BY 1`` / ``GROUP BY 1``, non-decimal integers.

A text that already has ``$`` in it (parameters, dollar quotes) is left alone, as is a text
with more than one statement.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from pglast import parser as pgparser

INT4: Final = 23
INT8: Final = 20
NUMERIC: Final = 1700
UNKNOWN: Final = 0

_INT4_RANGE: Final = range(-(2**31), 2**31)
_INT8_RANGE: Final = range(-(2**63), 2**63)
_DECIMAL_INT: Final = re.compile(r"-?[0-9]+")
_DECIMAL: Final = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NUMBER_TOKENS: Final = frozenset({"ICONST", "FCONST"})
_BLANKS: Final = frozenset(" \t\r\n\f\v")
_QUOTE: Final = "'"


@dataclass(frozen=True, slots=True)
class Literal:
    """One literal replaced by a parameter."""

    #: character offsets of the literal in the original text (``end`` exclusive)
    start: int
    end: int
    type_oid: int
    #: the parameter's value in text format
    value: str


@dataclass(frozen=True, slots=True)
class Parameterized:
    """A statement as its shape text plus the literals taken out of it."""

    shape: str
    literals: tuple[Literal, ...]

    @property
    def types(self) -> tuple[int, ...]:
        return tuple(lit.type_oid for lit in self.literals)

    def original_position(self, position: int) -> int | None:
        """A 1-based character position in the shape text as one in the original text; None
        when it falls inside a ``$n`` (which the original has no single position for)."""
        shift = 0
        for number, lit in enumerate(self.literals, start=1):
            at = lit.start - shift  # where ``$n`` starts in the shape (0-based)
            width = len(f"${number}")
            if position - 1 < at:
                break
            if position - 1 < at + width:
                return lit.start + 1 if position - 1 == at else None
            shift += (lit.end - lit.start) - width
        return position + shift

    def literal_position(self, number: int) -> int:
        """The 1-based character position of parameter ``$number``'s literal."""
        return self.literals[number - 1].start + 1


def parameterize(text: str) -> Parameterized | None:
    """The text with its literals as parameters; None when there is nothing to take out or
    the text does not qualify (see the module docstring).

    The analysis (a parse and a scan) runs once per normalized statement; a statement of a
    known shape is then split along that shape's fixed text with a few regular expressions.
    """
    if "$" in text:
        return None
    try:
        normalized = pgparser.normalize(text)
    except pgparser.ParseError:
        return None
    plan = _PLANS.get(normalized, _UNKNOWN)
    if plan is _UNKNOWN:
        full = analyze(text)
        if full is None and not _one_statement_with_constants(normalized):
            _remember(normalized, _NEVER)
        else:
            _remember(normalized, _plan(text, normalized, full))
        return full
    if plan is _NEVER:
        return None
    if plan is None:
        return analyze(text)
    assert isinstance(plan, _Plan)
    fast = _split(plan, text)
    return fast if fast is not None else analyze(text)


def analyze(text: str) -> Parameterized | None:
    """``parameterize`` from scratch: the parser's constants, typed and placed."""
    if "$" in text:
        return None
    try:
        tree = json.loads(pgparser.parse_sql_json(text))
    except pgparser.ParseError:
        return None
    statements = tree.get("stmts", [])
    if len(statements) != 1:
        return None
    consts: list[dict[str, Any]] = []
    _collect(statements[0].get("stmt", {}), consts)
    if not consts:
        return None
    # The parser's locations are byte offsets into the UTF-8 text, the scanner's are
    # characters (as are the positions PostgreSQL reports).
    source = text.encode("utf-8", "surrogatepass") if not text.isascii() else None
    tokens = {t.start: t for t in pgparser.scan(text)}
    literals = []
    for const in sorted(consts, key=lambda c: int(c["location"])):
        at = int(const["location"])
        if source is not None:
            at = len(source[:at].decode("utf-8", "surrogatepass"))
        literal = _literal(text, at, const, tokens)
        if literal is not None:
            literals.append(literal)
    if not literals:
        return None
    pieces: list[str] = []
    cursor = 0
    for number, lit in enumerate(literals, start=1):
        pieces += [text[cursor : lit.start], f"${number}"]
        cursor = lit.end
    pieces.append(text[cursor:])
    return Parameterized("".join(pieces), tuple(literals))


def _collect(node: Any, out: list[dict[str, Any]]) -> None:
    """Every A_Const a parameter could replace, in any order."""
    if isinstance(node, list):
        for item in node:
            _collect(item, out)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "A_Const":
            if isinstance(value, dict) and "location" in value:
                out.append(value)
        elif key == "TypeName":
            continue  # type modifiers and array bounds are not expressions
        elif key == "TypeCast" and isinstance(value, dict):
            _collect_cast(value, out)
        elif key == "SortBy" and isinstance(value, dict):
            _collect({k: v for k, v in value.items() if not _is_const(v)}, out)
        elif key == "groupClause" and isinstance(value, list):
            _collect([item for item in value if not _is_const(item)], out)
        elif isinstance(value, dict | list):
            _collect(value, out)


def _collect_cast(cast: dict[str, Any], out: list[dict[str, Any]]) -> None:
    arg = cast.get("arg")
    if _is_const(arg):
        const = arg["A_Const"]  # type: ignore[index]
        type_at = int((cast.get("typeName") or {}).get("location", -1))
        if 0 <= type_at < int(const.get("location", -1)):
            return  # ``interval '1 day'``: the literal is part of the type's syntax
    _collect({k: v for k, v in cast.items() if k != "typeName"}, out)


def _is_const(node: Any) -> bool:
    return isinstance(node, dict) and "A_Const" in node


def _literal(source: str, at: int, const: dict[str, Any], tokens: dict[int, Any]) -> Literal | None:
    """The parameter for the constant at ``at``, or None when it stays in the text."""
    token = tokens.get(at)
    if token is None:
        return None
    if "sval" in const:
        if token.name != "SCONST" or source[at] != _QUOTE:
            return None
        end = token.end + 1
        if "\\" in source[at:end]:
            return None
        return Literal(at, end, UNKNOWN, const["sval"].get("sval", ""))
    if "ival" not in const and "fval" not in const:
        return None  # boolean, NULL, bit string
    if token.name == "ASCII_45":  # a minus sign the parser folded into the constant
        number = _next_token(tokens, token.end + 1, source)
        if number is None or number.name not in _NUMBER_TOKENS:
            return None
        end = number.end + 1
    elif token.name in _NUMBER_TOKENS:
        end = token.end + 1
    else:
        return None
    return _typed_number(at, end, "".join(source[at:end].split()))


def _typed_number(at: int, end: int, number_text: str) -> Literal | None:
    """A numeric literal typed as PostgreSQL's make_const types it."""
    if _DECIMAL_INT.fullmatch(number_text):
        value = int(number_text)
        if value in _INT4_RANGE:
            return Literal(at, end, INT4, number_text)
        if value in _INT8_RANGE:
            return Literal(at, end, INT8, number_text)
        return Literal(at, end, NUMERIC, number_text)
    if _DECIMAL.fullmatch(number_text):
        return Literal(at, end, NUMERIC, number_text)
    return None  # 0x1F, 1_000 and the like: the server decides what they are


def _next_token(tokens: dict[int, Any], after: int, source: str) -> Any:
    pos = after
    while pos < len(source) and source[pos] in _BLANKS:
        pos += 1
    return tokens.get(pos)


# --- the fast path: statements of a known shape -------------------------------------------------

_PLAN_CACHE_SIZE: Final = 4096
_STRING: Final = re.compile(r"'(?:[^']|'')*'")
#: a numeric constant as PostgreSQL's lexer reads one, with a minus the parser folds into it
_NUMBER: Final = re.compile(
    r"-?[ \t\r\n\f\v]*(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?"
)
_PLACEHOLDER: Final = re.compile(r"\$[0-9]+")
STRING, NUMBER, OTHER = "string", "number", "other"


@dataclass(frozen=True, slots=True)
class _Slot:
    """One constant of a normalized statement: what kind, and whether it is a parameter."""

    kind: str
    param: bool
    #: for OTHER (true, NULL, B'1', E'x'): the exact text, which the fast path requires
    text: str


@dataclass(frozen=True, slots=True)
class _Plan:
    """A normalized statement: its fixed text between the constants, and the constants."""

    segments: tuple[str, ...]
    slots: tuple[_Slot, ...]
    #: the whole statement as one regular expression: a group per STRING or NUMBER slot
    pattern: re.Pattern[str] | None = None
    #: (group number, slot) of each slot that is a parameter
    params: tuple[tuple[int, _Slot], ...] = ()
    #: the shape text when no slot's text varies between statements (every STRING and NUMBER
    #: slot is a parameter), else None (built per statement)
    shape: str | None = None


def _compiled(segments: tuple[str, ...], slots: tuple[_Slot, ...]) -> _Plan:
    parts: list[str] = []
    params: list[tuple[int, _Slot]] = []
    shape: list[str] = []
    group = 0
    for segment, slot in zip(segments, slots, strict=False):
        parts.append(re.escape(segment))
        shape.append(segment)
        if slot.kind == OTHER:
            parts.append(re.escape(slot.text))
            shape.append(slot.text)
            continue
        group += 1
        parts.append(f"({(_STRING if slot.kind == STRING else _NUMBER).pattern})")
        if slot.param:
            params.append((group, slot))
            shape.append(f"${len(params)}")
        else:
            shape.append("")  # varies: built per statement
    parts.append(re.escape(segments[-1]))
    shape.append(segments[-1])
    fixed = all(slot.param or slot.kind == OTHER for slot in slots)
    return _Plan(
        segments,
        slots,
        re.compile("".join(parts), re.S),
        tuple(params),
        "".join(shape) if fixed else None,
    )


_UNKNOWN: Final = object()
#: a shape that never has parameters: several statements, or no constants
_NEVER: Final = _Plan((), ())
_PLANS: dict[str, _Plan | None] = {}


def _one_statement_with_constants(normalized: str) -> bool:
    if _PLACEHOLDER.search(normalized) is None:
        return False
    try:
        return len(pgparser.split(normalized, with_parser=True, only_slices=True)) == 1
    except pgparser.ParseError:
        return False


def known_shape(text: str) -> bool:
    """True when statements shaped like ``text`` take the fast path."""
    try:
        plan = _PLANS.get(pgparser.normalize(text))
    except pgparser.ParseError:
        return False
    return plan is not None and plan is not _NEVER


def _remember(normalized: str, plan: _Plan | None) -> None:
    if len(_PLANS) >= _PLAN_CACHE_SIZE:
        del _PLANS[next(iter(_PLANS))]  # the oldest: dicts keep insertion order
    _PLANS[normalized] = plan


def _plan(text: str, normalized: str, full: Parameterized | None) -> _Plan | None:
    """Line ``text`` up with its normalized form; None when they do not line up exactly."""
    if full is None:
        return None
    segments = _PLACEHOLDER.split(normalized)
    tokens = {t.start: t for t in pgparser.scan(text)}
    params = {lit.start: lit.end for lit in full.literals}
    slots = []
    pos = 0
    for segment in segments[:-1]:
        if not text.startswith(segment, pos):
            return None
        pos += len(segment)
        token = tokens.get(pos)
        if token is None:
            return None
        kind, end = OTHER, token.end + 1
        if token.name == "SCONST" and text[pos] == _QUOTE:
            kind = STRING
        elif token.name in _NUMBER_TOKENS:
            kind = NUMBER
        elif token.name == "ASCII_45":
            number = _next_token(tokens, token.end + 1, text)
            if number is None or number.name not in _NUMBER_TOKENS:
                return None
            kind, end = NUMBER, number.end + 1
        slots.append(_Slot(kind, params.get(pos) == end, text[pos:end]))
        pos = end
    if text[pos:] != segments[-1]:
        return None
    return _compiled(tuple(segments), tuple(slots))


def _split(plan: _Plan, text: str) -> Parameterized | None:
    """A statement of a known shape as parameters; None when it does not fit the shape."""
    if plan.shape is None or plan.pattern is None:
        return _split_slowly(plan, text)
    found = plan.pattern.fullmatch(text)
    if found is None:
        return None
    literals: list[Literal] = []
    for group, slot in plan.params:
        literal = found.group(group)
        start, end = found.span(group)
        if slot.kind == STRING:
            if "\\" in literal:
                return None
            literals.append(Literal(start, end, UNKNOWN, literal[1:-1].replace("''", "'")))
        else:
            typed = _typed_number(start, end, "".join(literal.split()))
            if typed is None:
                return None
            literals.append(typed)
    if not literals:
        return None
    return Parameterized(plan.shape, tuple(literals))


def _split_slowly(plan: _Plan, text: str) -> Parameterized | None:
    """``_split`` for a shape with literals that stay in the text (they vary by statement)."""
    pieces: list[str] = []
    literals: list[Literal] = []
    pos = 0
    for segment, slot in zip(plan.segments, plan.slots, strict=False):
        if not text.startswith(segment, pos):
            return None
        pieces.append(segment)
        pos += len(segment)
        if slot.kind == OTHER:
            if not text.startswith(slot.text, pos):
                return None
            pieces.append(slot.text)
            pos += len(slot.text)
            continue
        found = (_STRING if slot.kind == STRING else _NUMBER).match(text, pos)
        if found is None:
            return None
        end = found.end()
        literal = found.group()
        if not slot.param:
            pieces.append(literal)
        elif slot.kind == STRING:
            if "\\" in literal:
                return None
            literals.append(Literal(pos, end, UNKNOWN, literal[1:-1].replace("''", "'")))
            pieces.append(f"${len(literals)}")
        else:
            typed = _typed_number(pos, end, "".join(literal.split()))
            if typed is None:
                return None
            literals.append(typed)
            pieces.append(f"${len(literals)}")
        pos = end
    if text[pos:] != plan.segments[-1] or not literals:
        return None
    pieces.append(plan.segments[-1])
    return Parameterized("".join(pieces), tuple(literals))


# --- the hot path: a statement text of a known shape, in the client's bytes ---------------------
#
# ``parameterize`` costs a ``pglast.normalize`` per statement. For a text already seen in a shape
# that was prepared, the frontend needs only the shape, the parameter types and the values, and
# ``split_known`` gets them with no parse: a cheap hint (the bytes without digits and without
# what lies between quotes) finds the shapes seen under that hint, and one anchored regular
# expression per shape, built from a text the analysis split, must match the whole text. The
# expression is the shape's fixed text byte for byte, with a group per parameter that matches
# exactly one token of PostgreSQL's lexer: a plain ``'...'`` string (``''`` inside) or a
# decimal number (with the minus sign the parser folded into it, when it did) followed by no
# identifier character and no dot. The text before each group is identical to the analysed
# text's, so the lexer reaches each group at a token boundary in the same state, and reads
# the group as one literal of the same kind; everything between groups is the same tokens.
# Hence a match is the analysis's answer, which ``remember_known`` checks once per shape.
# Texts with a backslash anywhere (their reading depends on standard_conforming_strings) or a
# ``$`` (which the analysis leaves alone) never match, and only client encodings in which an
# ASCII byte is always that character qualify.

#: client encodings (Python codec names) in which every byte < 0x80 is that ASCII character
FAST_CODECS: Final = frozenset({"utf-8", "latin-1", "iso8859-15", "cp1252"})
_KNOWN_CACHE_SIZE: Final = 4096
#: shapes kept under one hint (texts whose only difference is a digit in a name share one)
_PER_HINT: Final = 4
_DIGITS: Final = b"0123456789"
_SQ: Final = b"'"
_STRING_GROUP: Final = rb"('(?:[^']|'')*')"
_NUMBER_BODY: Final = (
    rb"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?(?![A-Za-z0-9_$\x80-\xff.])"
)
_NUMBER_GROUP: Final = b"(" + _NUMBER_BODY + b")"
_SIGNED_GROUP: Final = rb"(-[ \t\r\n\f\v]*" + _NUMBER_BODY + b")"


@dataclass(slots=True)
class _Known:
    """One prepared-eligible shape: the expression its texts match, and its parameters."""

    pattern: re.Pattern[bytes]
    shape: str
    #: per parameter: a string (else a number)
    strings: tuple[bool, ...]


@dataclass(slots=True)
class Known:
    """A statement split along a known shape: what a Bind needs, and how to find positions."""

    shape: str
    types: tuple[int, ...]
    #: the parameters' values in text format, in the client's encoding
    values: tuple[bytes, ...]
    #: the match of the shape's expression on the statement (a group per literal)
    match: re.Match[bytes]

    def parameterized(self, codec: str) -> Parameterized:
        """The same split as :func:`parameterize` gives (character positions, str values);
        only errors need it."""
        sql = self.match.string
        literals = []
        for group, (value, type_oid) in enumerate(zip(self.values, self.types, strict=True)):
            start, end = self.match.span(group + 1)
            at = len(sql[:start].decode(codec, "replace"))
            width = len(sql[start:end].decode(codec, "replace"))
            literals.append(Literal(at, at + width, type_oid, value.decode(codec, "replace")))
        return Parameterized(self.shape, tuple(literals))


_KNOWN: dict[bytes, tuple[_Known, ...]] = {}
#: shapes whose texts the hot path does not take (so they are not looked at again)
_REFUSED: dict[str, None] = {}


def _hint(sql: bytes) -> bytes:
    """Equal for texts that differ only in their literals (and for a few more)."""
    text = sql.translate(None, _DIGITS)
    if text.find(_SQ) >= 0:
        text = _SQ.join(text.split(_SQ)[0::2])
    return text


def _number_type(value: bytes) -> int:
    """:func:`_typed_number`'s type for a decimal number's bytes."""
    digits = value[1:] if value[:1] == b"-" else value
    if digits.isdigit():
        if len(digits) < 10:
            return INT4
        number = int(value)
        return INT4 if number in _INT4_RANGE else INT8 if number in _INT8_RANGE else NUMERIC
    return NUMERIC


def split_known(sql: bytes) -> Known | None:
    """``sql`` split along a shape :func:`remember_known` learnt; None when it fits none."""
    found = _KNOWN.get(_hint(sql))
    if found is None or sql.find(b"\\") >= 0 or sql.find(b"$") >= 0:
        return None  # (texts the analysis does not take either)
    for known in found:
        match = known.pattern.fullmatch(sql)
        if match is not None:
            return _split_match(known, match)
    return None


def _split_match(known: _Known, match: re.Match[bytes]) -> Known:
    values: list[bytes] = []
    types: list[int] = []
    for group, string in zip(match.groups(), known.strings, strict=True):
        if string:
            values.append(group[1:-1].replace(b"''", b"'"))
            types.append(UNKNOWN)
        else:
            value = b"".join(group.split()) if group[:1] == b"-" else group
            values.append(value)
            types.append(_number_type(value))
    return Known(known.shape, tuple(types), tuple(values), match)


def remember_known(sql: bytes, codec: str, params: Parameterized) -> bool:
    """Learn the shape of ``sql`` (whose analysis is ``params``) for :func:`split_known`;
    False when the hot path cannot take texts of this shape."""
    if codec not in FAST_CODECS or b"\\" in sql or params.shape in _REFUSED:
        return False
    if len(_REFUSED) >= _KNOWN_CACHE_SIZE:
        del _REFUSED[next(iter(_REFUSED))]
    try:
        text = sql.decode(codec)
    except UnicodeDecodeError:
        return False
    parts: list[bytes] = []
    strings: list[bool] = []
    cursor = 0
    for lit in params.literals:
        before = text[lit.start - 1 : lit.start]
        if before and (before.isalnum() or before in "_$&.'\"" or not before.isascii()):
            _REFUSED[params.shape] = None
            return False  # E'', U&'', a name that could run into the literal: not here
        parts.append(re.escape(text[cursor : lit.start].encode(codec)))
        first = text[lit.start : lit.start + 1]
        if lit.type_oid == UNKNOWN:
            if first != _QUOTE:
                _REFUSED[params.shape] = None
                return False
            parts.append(_STRING_GROUP)
        else:
            parts.append(_SIGNED_GROUP if first == "-" else _NUMBER_GROUP)
        strings.append(lit.type_oid == UNKNOWN)
        cursor = lit.end
    parts.append(re.escape(text[cursor:].encode(codec)))
    known = _Known(re.compile(b"".join(parts)), params.shape, tuple(strings))
    match = known.pattern.fullmatch(sql)
    if match is None or _split_match(known, match).parameterized(codec) != params:
        _REFUSED[params.shape] = None  # a string continued across a newline, say
        return False
    hint = _hint(sql)
    kept = tuple(k for k in _KNOWN.pop(hint, ()) if k.shape != known.shape)
    if len(_KNOWN) >= _KNOWN_CACHE_SIZE:
        del _KNOWN[next(iter(_KNOWN))]  # the oldest hint: dicts keep insertion order
    _KNOWN[hint] = (known, *kept[: _PER_HINT - 1])
    return True
