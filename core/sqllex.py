"""Where PostgreSQL's scanner ends string literals, under either standard_conforming_strings.

pglast lexes as a server with ``standard_conforming_strings = on``. With it off, a backslash
in a plain ``'...'`` literal escapes the next character (as in ``E'...'``), so the same text
can end its literals elsewhere: ``'a\\'`` + newline + ``'`` is one literal to one setting and
a literal plus the start of another to the other. :func:`neutral_text` respells a text so it
means the same under both settings, which makes it safe to parse with pglast and to send to
a server whatever the session's setting: a plain literal that holds a backslash becomes an
``E'...'`` literal (its backslashes doubled when they were literal). Every change is an
insertion, so positions in the respelled text map back to the original.

``backslash_quote`` does not change where a literal ends: it only decides whether ``\\'`` is
an error, and a lexing error runs nothing. The scanner rules mirrored here are scan.l's
(PostgreSQL 15): comments (nested ``/* */``), quoted and ``U&`` identifiers, dollar quotes,
``E``/``B``/``X``/``N``/``U&`` literals and the continuation of a literal across a newline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

_HORIZONTAL: Final = " \t\f"
_NEWLINE: Final = "\n\r"


@dataclass(frozen=True, slots=True)
class Respelled:
    """A text respelled by :func:`neutral_text`: the new text and where it inserted what."""

    text: str
    #: (position in ``text``, length) of every insertion, in order
    insertions: tuple[tuple[int, int], ...]

    def original_index(self, index: int) -> int:
        """The index in the original text of ``text[index]`` (an inserted char: the next one)."""
        shift = 0
        for at, length in self.insertions:
            if index < at:
                break
            if index < at + length:
                return at - shift
            shift += length
        return index - shift


def _ident_start(char: str) -> bool:
    return (char.isascii() and (char.isalpha() or char == "_")) or ord(char) >= 0x80


def _ident_char(char: str) -> bool:
    return _ident_start(char) or char.isdigit() or char == "$"


class Unlexable(Exception):
    """The server's scanner raises an error here (so nothing of the text runs)."""


class _Scanner:
    """One pass over a text; collects the insertions that make it setting-independent."""

    def __init__(self, text: str, standard: bool) -> None:
        self.text = text
        self.standard = standard
        self.pos = 0
        #: (index in the original, inserted text)
        self.edits: list[tuple[int, str]] = []

    def run(self) -> None:
        text, end = self.text, len(self.text)
        while self.pos < end:
            char = text[self.pos]
            if char == "-" and text.startswith("--", self.pos):
                self._line_comment()
            elif char == "/" and text.startswith("/*", self.pos):
                self._block_comment()
            elif char == '"':
                self._quoted(self.pos + 1, '"')
            elif char == "'":
                self._plain_literal(self.pos, national=False)
            elif char == "$":
                self._dollar()
            elif _ident_start(char):
                self._word()
            elif char.isdigit():
                self._number()
            else:
                self.pos += 1

    # --- tokens without literals -------------------------------------------------------------

    def _line_comment(self) -> None:
        text = self.text
        stop = len(text)
        for newline in _NEWLINE:
            found = text.find(newline, self.pos)
            if 0 <= found < stop:
                stop = found
        self.pos = stop

    def _block_comment(self) -> None:
        text, depth, pos = self.text, 0, self.pos
        while pos < len(text):
            if text.startswith("/*", pos):
                depth += 1
                pos += 2
            elif text.startswith("*/", pos):
                depth -= 1
                pos += 2
                if depth == 0:
                    self.pos = pos
                    return
            else:
                pos += 1
        raise Unlexable("unterminated /* comment")

    def _quoted(self, start: int, quote: str) -> int:
        """Skip a quoted body whose quote is doubled inside; return the index after it."""
        text, pos = self.text, start
        while True:
            found = text.find(quote, pos)
            if found < 0:
                raise Unlexable(f"unterminated {quote} quote")
            if text.startswith(quote * 2, found):
                pos = found + 2
                continue
            self.pos = found + 1
            return self.pos

    def _dollar(self) -> None:
        text, pos = self.text, self.pos + 1
        while pos < len(text) and _ident_char(text[pos]) and text[pos] != "$":
            if pos == self.pos + 1 and text[pos].isdigit():
                break  # $1: a parameter
            pos += 1
        if pos < len(text) and text[pos] == "$":
            delimiter = text[self.pos : pos + 1]
            close = text.find(delimiter, pos + 1)
            if close < 0:
                raise Unlexable("unterminated dollar-quoted string")
            self.pos = close + len(delimiter)
        else:
            self.pos += 1
            while self.pos < len(text) and text[self.pos].isdigit():
                self.pos += 1

    def _number(self) -> None:
        text, pos = self.text, self.pos
        while pos < len(text) and (text[pos].isalnum() or text[pos] in "_."):
            pos += 1
        self.pos = pos

    def _word(self) -> None:
        text, pos = self.text, self.pos
        first, following = text[pos], text[pos + 1 : pos + 2]
        upper = first.upper()
        if following == "'" and upper == "E":
            self._escape_literal(pos + 1)
        elif following == "'" and upper in "BX":
            self._bit_literal(pos + 1)
        elif following == "'" and upper == "N":
            self._plain_literal(pos + 1, national=True)
        elif upper == "U" and following == "&" and text[pos + 2 : pos + 3] == "'":
            if not self.standard:
                raise Unlexable("unsafe use of string constant with Unicode escapes")
            self._bit_literal(pos + 2)  # no backslash escapes while lexing: as a bit string
        elif upper == "U" and following == "&" and text[pos + 2 : pos + 3] == '"':
            self._quoted(pos + 3, '"')
        else:
            pos += 1
            while pos < len(text) and _ident_char(text[pos]):
                pos += 1
            self.pos = pos

    # --- literals ---------------------------------------------------------------------------

    def _segment_end(self, start: int, escapes: bool) -> int:
        """Index of the quote that ends the literal segment opened at ``start`` (a quote)."""
        text, pos = self.text, start + 1
        while pos < len(text):
            char = text[pos]
            if char == "\\" and escapes:
                pos += 2
            elif char == "'":
                if text.startswith("''", pos):
                    pos += 2
                else:
                    return pos
            else:
                pos += 1
        raise Unlexable("unterminated quoted string")

    def _continuation(self, close: int) -> int | None:
        """Where the next segment of a literal opens, if one continues it across a newline."""
        text, pos, newline = self.text, close + 1, False
        while pos < len(text):
            char = text[pos]
            if char in _HORIZONTAL:
                pos += 1
            elif char in _NEWLINE:
                newline = True
                pos += 1
            elif text.startswith("--", pos):
                while pos < len(text) and text[pos] not in _NEWLINE:
                    pos += 1
            else:
                break
        return pos if newline and text[pos : pos + 1] == "'" else None

    def _segments(self, start: int, escapes: bool) -> list[tuple[int, int]]:
        """(open quote, close quote) of every segment of the literal opened at ``start``."""
        segments = []
        opening: int | None = start
        while opening is not None:
            close = self._segment_end(opening, escapes)
            segments.append((opening, close))
            opening = self._continuation(close)
        self.pos = segments[-1][1] + 1
        return segments

    def _escape_literal(self, start: int) -> None:
        self._segments(start, escapes=True)

    def _bit_literal(self, start: int) -> None:
        self._segments(start, escapes=False)

    def _plain_literal(self, start: int, *, national: bool) -> None:
        """A literal whose backslashes mean what the setting says: respelled as E'...'."""
        segments = self._segments(start, escapes=not self.standard)
        text = self.text
        if not any("\\" in text[a:b] for a, b in segments):
            return  # the same literal under both settings
        # N'...' is the keyword NCHAR before a plain literal: NCHAR E'...' says the same.
        self.edits.append((start, "CHAR E" if national else "E"))
        if self.standard:
            for a, b in segments:
                self.edits += [(i + 1, "\\") for i in range(a + 1, b) if text[i] == "\\"]


def neutral_text(text: str, *, standard_conforming_strings: bool) -> Respelled | None:
    """``text`` respelled to mean the same under both settings, as a server with the given
    setting reads it; None when it already does.

    Raises :class:`Unlexable` when that server's scanner rejects the text (then nothing of it
    runs, and nothing may be added to it either: an open literal could swallow added text).
    """
    if "\\" not in text:
        return None
    edits = _edits(text, standard_conforming_strings)
    if not edits:
        return None
    out: list[str] = []
    insertions: list[tuple[int, int]] = []
    cursor = 0
    written = 0
    for at, inserted in sorted(edits, key=lambda edit: edit[0]):
        out.append(text[cursor:at])
        written += at - cursor
        insertions.append((written, len(inserted)))
        out.append(inserted)
        written += len(inserted)
        cursor = at
    out.append(text[cursor:])
    return Respelled("".join(out), tuple(insertions))


def _edits(text: str, standard: bool) -> list[tuple[int, str]]:
    scanner = _Scanner(text, standard)
    scanner.run()
    return scanner.edits


def lexes_alike(text: str) -> bool:
    """True when both settings of standard_conforming_strings lex ``text`` alike: the same
    literals, with the same values (no plain literal holds a backslash), or the same error.

    The two scans only part at a plain literal with a backslash, which one of them records
    before going on (or both fail on, and then nothing runs under either setting).
    """
    if "\\" not in text:
        return True
    for standard in (True, False):
        scanner = _Scanner(text, standard)
        try:
            scanner.run()
        except Unlexable:
            pass
        if scanner.edits:
            return False
    return True
