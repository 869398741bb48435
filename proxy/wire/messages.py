"""Reads and builds the PostgreSQL v3 messages the proxy must look inside or make itself.

Everything here is a pure function of bytes: the relay hands in a frame's body and gets back
fields, or hands in fields and gets back a whole frame ready to send. Messages the proxy only
forwards never come here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from core import errors
from core.errors import ProtocolViolation
from proxy.wire.frames import frame

# Frontend (client -> server) type bytes.
BIND: Final = ord("B")
CLOSE: Final = ord("C")
COPY_DATA: Final = ord("d")
COPY_DONE: Final = ord("c")
COPY_FAIL: Final = ord("f")
DESCRIBE: Final = ord("D")
EXECUTE: Final = ord("E")
FLUSH: Final = ord("H")
FUNCTION_CALL: Final = ord("F")
PARSE: Final = ord("P")
PASSWORD: Final = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse
QUERY: Final = ord("Q")
SYNC: Final = ord("S")
TERMINATE: Final = ord("X")

# Backend (server -> client) type bytes.
AUTHENTICATION: Final = ord("R")
BACKEND_KEY_DATA: Final = ord("K")
BIND_COMPLETE: Final = ord("2")
CLOSE_COMPLETE: Final = ord("3")
COMMAND_COMPLETE: Final = ord("C")
COPY_IN_RESPONSE: Final = ord("G")
COPY_OUT_RESPONSE: Final = ord("H")
COPY_BOTH_RESPONSE: Final = ord("W")
DATA_ROW: Final = ord("D")
EMPTY_QUERY_RESPONSE: Final = ord("I")
ERROR_RESPONSE: Final = ord("E")
FUNCTION_CALL_RESPONSE: Final = ord("V")
NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
NO_DATA: Final = ord("n")
NOTICE_RESPONSE: Final = ord("N")
NOTIFICATION_RESPONSE: Final = ord("A")
PARAMETER_DESCRIPTION: Final = ord("t")
PARAMETER_STATUS: Final = ord("S")
PARSE_COMPLETE: Final = ord("1")
PORTAL_SUSPENDED: Final = ord("s")
READY_FOR_QUERY: Final = ord("Z")
ROW_DESCRIPTION: Final = ord("T")

# Startup-phase request codes (the int32 after the length of an untyped first packet).
PROTOCOL_V3: Final = 3 << 16
CANCEL_REQUEST_CODE: Final = 80877102
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104

AUTH_OK: Final = 0
AUTH_SASL: Final = 10


def sasl_without_plus(body: bytes) -> bytes:
    """An AuthenticationSASL frame offering only the mechanisms without channel binding."""
    mechanisms = [name for name in body[4:].split(b"\x00") if name]
    kept = [name for name in mechanisms if not name.endswith(b"-PLUS")]
    return frame(b"R", body[:4] + b"".join(name + b"\x00" for name in kept) + b"\x00")

_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")


def _cstring(body: bytes, pos: int, end: int | None = None) -> tuple[bytes, int]:
    """Read a NUL-terminated string at ``pos`` (before ``end``, when the frame ends there
    inside a larger buffer); return it and the position after the NUL."""
    nul = body.find(b"\x00", pos, end)
    if nul < 0:
        raise ProtocolViolation("unterminated string in message")
    return body[pos:nul], nul + 1


def cstring_at(buf: bytes, pos: int, end: int) -> bytes:
    """The NUL-terminated string at ``pos`` of a frame that ends at ``end``."""
    return _cstring(buf, pos, end)[0]


def bind_names(buf: bytes, pos: int, end: int) -> tuple[bytes, bytes]:
    """(portal, statement) of the Bind whose body starts at ``pos`` and ends at ``end``."""
    portal, after = _cstring(buf, pos, end)
    return portal, _cstring(buf, after, end)[0]


def _int16(body: bytes, pos: int) -> int:
    if pos + 2 > len(body):
        raise ProtocolViolation("message too short")
    return int(_INT16.unpack_from(body, pos)[0])


def _int32(body: bytes, pos: int) -> int:
    if pos + 4 > len(body):
        raise ProtocolViolation("message too short")
    return int(_INT32.unpack_from(body, pos)[0])


# ---------------------------------------------------------------------------------------------
# Startup phase


@dataclass(frozen=True, slots=True)
class StartupPacket:
    """The untyped first packet: a StartupMessage or one of the special requests."""

    code: int
    body: bytes  # everything after the code

    @property
    def is_startup(self) -> bool:
        return self.code >> 16 == 3

    def parameters(self) -> dict[str, str]:
        """The name/value pairs of a StartupMessage (user, database, options, ...)."""
        params: dict[str, str] = {}
        pos = 0
        body = self.body
        while pos < len(body) and body[pos] != 0:
            name, pos = _cstring(body, pos)
            value, pos = _cstring(body, pos)
            params[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return params


def parse_startup_packet(raw: bytes) -> StartupPacket:
    """Parse a complete untyped packet (length included in ``raw``)."""
    if len(raw) < 8:
        raise ProtocolViolation("invalid startup packet length")
    return StartupPacket(_int32(raw, 4), raw[8:])


def startup_packet_length(head: bytes, max_length: int) -> int:
    """Validate the length field of an untyped packet from its first 4 bytes."""
    length = int(_INT32.unpack_from(head, 0)[0])
    if length < 8 or length > max_length:
        raise ProtocolViolation(f"invalid length of startup packet: {length}")
    return length


def build_startup_message(params: Mapping[str, str], version: int = PROTOCOL_V3) -> bytes:
    body = b"".join(k.encode() + b"\x00" + v.encode() + b"\x00" for k, v in params.items())
    body = _INT32.pack(version) + body + b"\x00"
    return _INT32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class CancelKey:
    """What identifies a backend to a CancelRequest: its pid and secret key bytes."""

    pid: int
    secret: bytes


def parse_cancel_request(packet: StartupPacket) -> CancelKey:
    if len(packet.body) < 8:
        raise ProtocolViolation("invalid cancel request")
    return CancelKey(_int32(packet.body, 0), packet.body[4:])


def build_cancel_request(key: CancelKey) -> bytes:
    body = _INT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(key.pid) + key.secret
    return _INT32.pack(len(body) + 4) + body


def build_ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)


def parse_backend_key_data(body: bytes) -> CancelKey:
    return CancelKey(_int32(body, 0), body[4:])


def auth_code(body: bytes) -> int:
    return _int32(body, 0)


# ---------------------------------------------------------------------------------------------
# Frontend messages the proxy reads


def parse_query(body: bytes) -> bytes:
    """The SQL text of a Query message, without its terminating NUL."""
    sql, _ = _cstring(body, 0)
    return sql


def build_query(sql: bytes) -> bytes:
    return frame(b"Q", sql + b"\x00")


@dataclass(frozen=True, slots=True)
class Parse:
    name: bytes
    sql: bytes
    param_types: tuple[int, ...]


def parse_parse(body: bytes) -> Parse:
    name, pos = _cstring(body, 0)
    sql, pos = _cstring(body, pos)
    count = _int16(body, pos)
    pos += 2
    if count < 0 or pos + 4 * count > len(body):
        raise ProtocolViolation("invalid Parse message")
    types = struct.unpack_from(f"!{count}I", body, pos) if count else ()
    return Parse(name, sql, tuple(types))


def build_parse(name: bytes, sql: bytes, param_types: Sequence[int] = ()) -> bytes:
    body = (
        name
        + b"\x00"
        + sql
        + b"\x00"
        + _INT16.pack(len(param_types))
        + b"".join(_UINT32.pack(t) for t in param_types)
    )
    return frame(b"P", body)


@dataclass(frozen=True, slots=True)
class BindHead:
    """The parts of a Bind the proxy needs: names, and where the result formats start."""

    portal: bytes
    statement: bytes
    result_formats: tuple[int, ...]
    result_formats_at: int  # offset in the body of the result-format count


def parse_bind(body: bytes) -> BindHead:
    portal, pos = _cstring(body, 0)
    statement, pos = _cstring(body, pos)
    nformats = _int16(body, pos)
    if nformats < 0:  # checked before use: a negative count would move ``pos`` backwards
        raise ProtocolViolation("invalid Bind message")
    pos += 2 + 2 * nformats
    nparams = _int16(body, pos)
    if nparams < 0:
        raise ProtocolViolation("invalid Bind message")
    pos += 2
    for _ in range(nparams):
        size = _int32(body, pos)
        pos += 4 + (size if size > 0 else 0)
    at = pos
    nresults = _int16(body, pos)
    pos += 2
    if nresults < 0 or pos + 2 * nresults > len(body):
        raise ProtocolViolation("invalid Bind message")
    results = struct.unpack_from(f"!{nresults}h", body, pos) if nresults else ()
    return BindHead(portal, statement, tuple(results), at)


def bind_parameters(body: bytes) -> tuple[tuple[int, ...], tuple[bytes | None, ...]]:
    """A Bind's parameters: one format code per value (0 text, 1 binary) and the values."""
    _, pos = _cstring(body, 0)
    _, pos = _cstring(body, pos)
    nformats = _int16(body, pos)
    if nformats < 0 or pos + 2 + 2 * nformats > len(body):
        raise ProtocolViolation("invalid Bind message")
    codes = struct.unpack_from(f"!{nformats}h", body, pos + 2) if nformats else ()
    pos += 2 + 2 * nformats
    nparams = _int16(body, pos)
    if nparams < 0 or nformats not in (0, 1, nparams):
        raise ProtocolViolation("invalid Bind message")
    pos += 2
    values: list[bytes | None] = []
    for _ in range(nparams):
        size = _int32(body, pos)
        pos += 4
        if size < 0:
            values.append(None)
            continue
        if pos + size > len(body):
            raise ProtocolViolation("invalid Bind message")
        values.append(body[pos : pos + size])
        pos += size
    formats = codes if nformats == nparams else (codes[0] if codes else 0,) * nparams
    return tuple(formats), tuple(values)


def bind_with_extra_result_columns(body: bytes, head: BindHead, extra: int) -> bytes:
    """Rebuild a Bind whose per-column result formats must cover ``extra`` more columns.

    With zero or one format code the codes already apply to every column, so the Bind goes
    out unchanged; with one code per column the added columns are requested as text.
    """
    if len(head.result_formats) <= 1 or extra <= 0:
        return frame(b"B", body)
    formats = head.result_formats + (0,) * extra
    new_body = (
        body[: head.result_formats_at]
        + _INT16.pack(len(formats))
        + struct.pack(f"!{len(formats)}h", *formats)
    )
    return frame(b"B", new_body)


def parse_describe_or_close(body: bytes) -> tuple[int, bytes]:
    """(kind, name) of a Describe or Close: kind is ord('S') or ord('P')."""
    if not body:
        raise ProtocolViolation("invalid Describe/Close message")
    name, _ = _cstring(body, 1)
    return body[0], name


def parse_execute(body: bytes) -> tuple[bytes, int]:
    portal, pos = _cstring(body, 0)
    return portal, _int32(body, pos)


def build_bind(portal: bytes, statement: bytes) -> bytes:
    return frame(b"B", portal + b"\x00" + statement + b"\x00" + b"\x00\x00\x00\x00\x00\x00")


def build_close(kind: int, name: bytes) -> bytes:
    """A Close of a statement (``ord('S')``) or portal (``ord('P')``)."""
    return frame(b"C", bytes((kind,)) + name + b"\x00")


def frame_of(typ: int, body: bytes) -> bytes:
    """Rebuild a frame from its type byte value and body."""
    return frame(bytes((typ,)), body)


def build_execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return frame(b"E", portal + b"\x00" + _INT32.pack(max_rows))


def build_bind_text(portal: bytes, statement: bytes, params: Sequence[bytes]) -> bytes:
    """A Bind with every parameter and every result column in text format."""
    body = [portal, b"\x00", statement, b"\x00\x00\x00", _INT16.pack(len(params))]
    for value in params:
        body += [_INT32.pack(len(value)), value]
    body.append(b"\x00\x00")
    return frame(b"B", b"".join(body))


def build_describe(kind: int, name: bytes) -> bytes:
    """A Describe of a statement (``ord('S')``) or portal (``ord('P')``)."""
    return frame(b"D", bytes((kind,)) + name + b"\x00")


SYNC_MESSAGE: Final = frame(b"S", b"")
TERMINATE_MESSAGE: Final = frame(b"X", b"")

# ---------------------------------------------------------------------------------------------
# Backend messages the proxy reads or makes


def ready_for_query(status: bytes) -> bytes:
    return frame(b"Z", status)


def command_complete(tag: bytes) -> bytes:
    return frame(b"C", tag + b"\x00")


def parse_command_complete(body: bytes) -> bytes:
    tag, _ = _cstring(body, 0)
    return tag


NO_DATA_MESSAGE: Final = frame(b"n", b"")


def parse_fields(body: bytes) -> list[tuple[int, bytes]]:
    """The (code, value) fields of an ErrorResponse or NoticeResponse, in order."""
    fields: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = body[pos]
        value, pos = _cstring(body, pos + 1)
        fields.append((code, value))
    return fields


def error_sqlstate(body: bytes) -> bytes:
    for code, value in parse_fields(body):
        if code == errors.FIELD_CODE:
            return value
    return b""


def parse_parameter_status(body: bytes) -> tuple[bytes, bytes]:
    name, pos = _cstring(body, 0)
    value, _ = _cstring(body, pos)
    return name, value


def row_description_count(body: bytes) -> int:
    return _int16(body, 0)


def trim_row_description(body: bytes, keep: int) -> bytes:
    """A RowDescription frame holding only the first ``keep`` of its fields."""
    pos = 2
    for _ in range(keep):
        _, pos = _cstring(body, pos)
        pos += 18  # table oid, attnum, type oid, typlen, typmod, format
    if pos > len(body):
        raise ProtocolViolation("RowDescription too short")
    return frame(b"T", _INT16.pack(keep) + body[2:pos])


def trim_data_row(body: bytes, keep: int) -> bytes:
    """A DataRow frame holding only the first ``keep`` of its columns."""
    pos = 2
    for _ in range(keep):
        size = _int32(body, pos)
        pos += 4 + (size if size > 0 else 0)
    if pos > len(body):
        raise ProtocolViolation("DataRow too short")
    return frame(b"D", _INT16.pack(keep) + body[2:pos])


def data_row_values(body: bytes) -> list[bytes | None]:
    """All column values of a DataRow (None for SQL NULL)."""
    count = _int16(body, 0)
    pos = 2
    values: list[bytes | None] = []
    for _ in range(count):
        size = _int32(body, pos)
        pos += 4
        if size < 0:
            values.append(None)
        elif pos + size > len(body):
            raise ProtocolViolation("DataRow too short")
        else:
            values.append(body[pos : pos + size])
            pos += size
    return values


def command_tag_rows(tag: bytes) -> int | None:
    """The row count at the end of a command tag (``UPDATE 3`` -> 3), if any."""
    _, _, last = tag.rpartition(b" ")
    return int(last) if last.isdigit() else None
