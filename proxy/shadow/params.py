"""A captured Bind's parameters as SQL literals, so the replay can EXECUTE them.

Text-format values are passed on as they were sent: PostgreSQL applies the parameter type's
input function to the literal, as it did for the application. Binary-format values are turned
into the same type's text form first, for the types drivers send in binary (asyncpg sends most
in binary); any other binary type is :class:`UnsupportedParameter` and the replay counts an
error rather than guess.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Final

_EPOCH_DATE: Final = date(2000, 1, 1)
_EPOCH: Final = datetime(2000, 1, 1)
_NUMERIC_NAN: Final = 0xC000
_NUMERIC_NEG: Final = 0x4000


class UnsupportedParameter(Exception):
    """A binary parameter of a type the replay cannot turn into text."""


def _integer(data: bytes) -> str:
    return str(int.from_bytes(data, "big", signed=True))


def _unsigned(data: bytes) -> str:
    return str(int.from_bytes(data, "big", signed=False))


def _float(data: bytes) -> str:
    value = struct.unpack("!f" if len(data) == 4 else "!d", data)[0]
    return repr(float(value)) if value == value else "NaN"  # noqa: PLR0124 - NaN check


def _bool(data: bytes) -> str:
    return "t" if data != b"\x00" else "f"


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _jsonb(data: bytes) -> str:
    if not data or data[0] != 1:
        raise UnsupportedParameter("jsonb of an unknown binary version")
    return data[1:].decode("utf-8")


def _bytea(data: bytes) -> str:
    return "\\x" + data.hex()


def _uuid(data: bytes) -> str:
    return str(uuid.UUID(bytes=data))


def _date(data: bytes) -> str:
    return (_EPOCH_DATE + timedelta(days=int.from_bytes(data, "big", signed=True))).isoformat()


def _timestamp(data: bytes) -> str:
    micros = int.from_bytes(data, "big", signed=True)
    return (_EPOCH + timedelta(microseconds=micros)).isoformat()


def _timestamptz(data: bytes) -> str:
    return _timestamp(data) + "+00"


def _numeric(data: bytes) -> str:
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", data)
    if sign == _NUMERIC_NAN:
        return "NaN"
    whole = 0
    for digit in struct.unpack_from(f"!{ndigits}H", data, 8):
        whole = whole * 10000 + digit
    # exact: a Decimal built from its digits and exponent is not rounded to a context
    value = Decimal((0, tuple(int(c) for c in str(whole)), 4 * (weight - ndigits + 1)))
    text = f"{value:.{dscale}f}"
    return "-" + text if sign == _NUMERIC_NEG else text


#: binary decoders by the type's name as format_type() spells it
_BINARY: Final[dict[str, Callable[[bytes], str]]] = {
    "smallint": _integer,
    "integer": _integer,
    "bigint": _integer,
    "oid": _unsigned,
    "real": _float,
    "double precision": _float,
    "boolean": _bool,
    "text": _text,
    "character varying": _text,
    "character": _text,
    "name": _text,
    "unknown": _text,
    "json": _text,
    "xml": _text,
    "citext": _text,
    "jsonb": _jsonb,
    "bytea": _bytea,
    "uuid": _uuid,
    "date": _date,
    "timestamp without time zone": _timestamp,
    "timestamp with time zone": _timestamptz,
    "numeric": _numeric,
}


def needs_types(formats: Sequence[int]) -> bool:
    """Some value is binary: the parameters' types are needed to read it."""
    return any(formats)


def literals(
    formats: Sequence[int],
    values: Sequence[bytes | None],
    types: Sequence[str],
    codec: str,
) -> list[str]:
    """One SQL literal per parameter (``NULL`` or a quoted string)."""
    out: list[str] = []
    for index, (fmt, value) in enumerate(zip(formats, values, strict=True)):
        if value is None:
            out.append("NULL")
            continue
        kind = types[index] if index < len(types) else "unknown"
        text = text_of(fmt, value, kind, codec)
        out.append("'" + text.replace("'", "''") + "'")
    return out


def text_of(fmt: int, value: bytes, kind: str, codec: str) -> str:
    """One parameter value in its type's text form (``kind`` as format_type() spells it)."""
    if fmt == 0:
        return value.decode(codec, "surrogateescape")
    decode = _BINARY.get(kind)
    if decode is None:
        raise UnsupportedParameter(f"binary parameter of type {kind}")
    return decode(value)


__all__ = ["UnsupportedParameter", "literals", "needs_types", "text_of"]
