"""Message parsers and builders against hand-written PostgreSQL v3 bytes, and fuzzed input."""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import errors
from core.errors import ProtocolViolation
from proxy.wire import messages as m
from proxy.wire.frames import frame_end

# ---------------------------------------------------------------------------------------------
# Golden bytes, written out by hand from the protocol documentation (Message Formats).
# Each is a whole frame: type byte, int32 length counting itself, body.

QUERY = b"Q\x00\x00\x00\x0dSELECT 1\x00"

# Parse "s1": SELECT $1::int, $2 with parameter types int4 (23) and text (25)
PARSE = (
    b"P\x00\x00\x00\x24"
    b"s1\x00"
    b"SELECT $1::int, $2\x00"
    b"\x00\x02"
    b"\x00\x00\x00\x17"
    b"\x00\x00\x00\x19"
)
PARSE_UNNAMED = b"P\x00\x00\x00\x10\x00SELECT 1\x00\x00\x00"

# Bind portal "p1" to "s1": parameter formats text, text, binary; parameters '42', NULL and
# int4 7 (binary); result formats binary, text, binary
BIND_RESULT_FORMATS_AT = 34
BIND = (
    b"B\x00\x00\x00\x2e"
    b"p1\x00"
    b"s1\x00"
    b"\x00\x03" b"\x00\x00" b"\x00\x00" b"\x00\x01"
    b"\x00\x03"
    b"\x00\x00\x00\x02" b"42"
    b"\xff\xff\xff\xff"
    b"\x00\x00\x00\x04" b"\x00\x00\x00\x07"
    b"\x00\x03" b"\x00\x01" b"\x00\x00" b"\x00\x01"
)

DESCRIBE_STATEMENT = b"D\x00\x00\x00\x08Ss1\x00"
DESCRIBE_PORTAL = b"D\x00\x00\x00\x06P\x00"
CLOSE_STATEMENT = b"C\x00\x00\x00\x08Ss1\x00"
EXECUTE = b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
EXECUTE_P1_100 = b"E\x00\x00\x00\x0bp1\x00\x00\x00\x00\x64"
SYNC = b"S\x00\x00\x00\x04"
TERMINATE = b"X\x00\x00\x00\x04"

STARTUP = (
    b"\x00\x00\x00\x21"
    b"\x00\x03\x00\x00"
    b"user\x00alice\x00"
    b"database\x00pos\x00"
    b"\x00"
)
SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
GSSENC_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x30"
CANCEL_REQUEST = b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\xde\xad\xbe\xef"

ERROR = (
    b"E\x00\x00\x00\x3e"
    b"SERROR\x00"
    b"VERROR\x00"
    b"C42P01\x00"
    b'Mrelation "nope" does not exist\x00'
    b"P15\x00"
    b"\x00"
)

# RowDescription: id int4 (table 16384, column 1), name text (table 16384, column 2)
ROW_DESCRIPTION_FIELD_ID = (
    b"id\x00" b"\x00\x00\x40\x00" b"\x00\x01" b"\x00\x00\x00\x17" b"\x00\x04"
    b"\xff\xff\xff\xff" b"\x00\x00"
)
ROW_DESCRIPTION_FIELD_NAME = (
    b"name\x00" b"\x00\x00\x40\x00" b"\x00\x02" b"\x00\x00\x00\x19" b"\xff\xff"
    b"\xff\xff\xff\xff" b"\x00\x00"
)
ROW_DESCRIPTION = (
    b"T\x00\x00\x00\x32" b"\x00\x02" + ROW_DESCRIPTION_FIELD_ID + ROW_DESCRIPTION_FIELD_NAME
)

# DataRow: '1', NULL, '' (an empty string is not NULL)
DATA_ROW = b"D\x00\x00\x00\x13\x00\x03\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00\x00\x00"
COMMAND_COMPLETE = b"C\x00\x00\x00\x0fINSERT 0 3\x00"
READY_IDLE = b"Z\x00\x00\x00\x05I"
PARAMETER_STATUS = b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
BACKEND_KEY_DATA = b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef"
AUTHENTICATION_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
AUTHENTICATION_SASL = b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00"

TYPED_FRAMES = [
    *(QUERY, PARSE, PARSE_UNNAMED, BIND, DESCRIBE_STATEMENT, DESCRIBE_PORTAL, CLOSE_STATEMENT),
    *(EXECUTE, EXECUTE_P1_100, SYNC, TERMINATE, ERROR, ROW_DESCRIPTION, DATA_ROW),
    *(COMMAND_COMPLETE, READY_IDLE, PARAMETER_STATUS, BACKEND_KEY_DATA, AUTHENTICATION_OK),
    AUTHENTICATION_SASL,
]


def body(raw: bytes) -> bytes:
    return raw[5:]


@pytest.mark.parametrize("raw", TYPED_FRAMES, ids=lambda raw: chr(raw[0]))
def test_golden_lengths_are_right(raw: bytes) -> None:
    # The hand-written length fields agree with the bytes that follow them.
    assert frame_end(raw, 0) == len(raw)


@pytest.mark.parametrize("raw", [STARTUP, SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST])
def test_golden_startup_lengths_are_right(raw: bytes) -> None:
    assert m.startup_packet_length(raw[:4], 10000) == len(raw)


# --- frontend -----------------------------------------------------------------------------


def test_query() -> None:
    assert m.parse_query(body(QUERY)) == b"SELECT 1"
    assert m.build_query(b"SELECT 1") == QUERY


def test_parse() -> None:
    parsed = m.parse_parse(body(PARSE))
    assert parsed == m.Parse(b"s1", b"SELECT $1::int, $2", (23, 25))
    assert m.build_parse(b"s1", b"SELECT $1::int, $2", [23, 25]) == PARSE


def test_parse_unnamed_without_types() -> None:
    assert m.parse_parse(body(PARSE_UNNAMED)) == m.Parse(b"", b"SELECT 1", ())
    assert m.build_parse(b"", b"SELECT 1") == PARSE_UNNAMED


def test_parse_type_oids_are_unsigned() -> None:
    raw = m.build_parse(b"", b"x", [0xFFFFFFFF])
    assert m.parse_parse(body(raw)).param_types == (0xFFFFFFFF,)


def test_bind() -> None:
    head = m.parse_bind(body(BIND))
    assert head == m.BindHead(b"p1", b"s1", (1, 0, 1), BIND_RESULT_FORMATS_AT)
    assert body(BIND)[head.result_formats_at :] == b"\x00\x03\x00\x01\x00\x00\x00\x01"


def test_build_bind() -> None:
    assert m.build_bind(b"", b"s1") == b"B\x00\x00\x00\x0e\x00s1\x00\x00\x00\x00\x00\x00\x00"
    assert m.parse_bind(body(m.build_bind(b"p", b"s"))) == m.BindHead(b"p", b"s", (), 8)


def test_bind_with_extra_result_columns_per_column_formats() -> None:
    head = m.parse_bind(body(BIND))
    rebuilt = m.bind_with_extra_result_columns(body(BIND), head, 2)
    assert rebuilt == (
        b"B\x00\x00\x00\x32"
        + BIND[5 : 5 + BIND_RESULT_FORMATS_AT]  # names, parameter formats and values intact
        + b"\x00\x05\x00\x01\x00\x00\x00\x01\x00\x00\x00\x00"
    )
    again = m.parse_bind(body(rebuilt))
    assert again.result_formats == (1, 0, 1, 0, 0)
    assert again.result_formats_at == BIND_RESULT_FORMATS_AT


@pytest.mark.parametrize("formats", [b"\x00\x00", b"\x00\x01\x00\x01"], ids=["none", "one"])
def test_bind_with_extra_result_columns_shared_format_is_unchanged(formats: bytes) -> None:
    # Zero codes (all text) or one code (applies to all columns) already cover extra columns.
    raw_body = b"\x00s1\x00\x00\x00\x00\x00" + formats
    head = m.parse_bind(raw_body)
    assert m.bind_with_extra_result_columns(raw_body, head, 3) == b"B" + struct.pack(
        "!i", len(raw_body) + 4
    ) + raw_body


def test_bind_with_no_extra_columns_is_unchanged() -> None:
    head = m.parse_bind(body(BIND))
    assert m.bind_with_extra_result_columns(body(BIND), head, 0) == BIND


def test_describe_close_execute() -> None:
    assert m.parse_describe_or_close(body(DESCRIBE_STATEMENT)) == (ord("S"), b"s1")
    assert m.parse_describe_or_close(body(DESCRIBE_PORTAL)) == (ord("P"), b"")
    assert m.parse_describe_or_close(body(CLOSE_STATEMENT)) == (ord("S"), b"s1")
    assert m.parse_execute(body(EXECUTE)) == (b"", 0)
    assert m.parse_execute(body(EXECUTE_P1_100)) == (b"p1", 100)
    assert m.build_execute() == EXECUTE
    assert m.build_execute(b"p1", 100) == EXECUTE_P1_100


def test_sync_and_terminate() -> None:
    assert m.SYNC_MESSAGE == SYNC
    assert m.TERMINATE_MESSAGE == TERMINATE


# --- startup phase ------------------------------------------------------------------------


def test_startup_message() -> None:
    packet = m.parse_startup_packet(STARTUP)
    assert packet.code == m.PROTOCOL_V3 == 196608
    assert packet.is_startup
    assert packet.parameters() == {"user": "alice", "database": "pos"}
    assert m.build_startup_message({"user": "alice", "database": "pos"}) == STARTUP


def test_startup_parameters_keep_spaces_and_bad_utf8() -> None:
    raw = m.build_startup_message({"options": "-c search_path=a,b", "application_name": "x"})
    raw = raw[:-1] + b"client\x00\xff\x00" + b"\x00"
    raw = struct.pack("!i", len(raw)) + raw[4:]
    params = m.parse_startup_packet(raw).parameters()
    assert params["options"] == "-c search_path=a,b"
    assert params["client"] == "\ufffd"


def test_ssl_and_gssenc_requests() -> None:
    assert m.build_ssl_request() == SSL_REQUEST
    ssl = m.parse_startup_packet(SSL_REQUEST)
    assert (ssl.code, ssl.body, ssl.is_startup) == (m.SSL_REQUEST_CODE, b"", False)
    assert m.parse_startup_packet(GSSENC_REQUEST).code == m.GSSENC_REQUEST_CODE


def test_cancel_request() -> None:
    packet = m.parse_startup_packet(CANCEL_REQUEST)
    assert packet.code == m.CANCEL_REQUEST_CODE
    key = m.parse_cancel_request(packet)
    assert key == m.CancelKey(1234, b"\xde\xad\xbe\xef")
    assert m.build_cancel_request(key) == CANCEL_REQUEST
    assert m.parse_backend_key_data(body(BACKEND_KEY_DATA)) == key


def test_cancel_request_too_short() -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_cancel_request(m.StartupPacket(m.CANCEL_REQUEST_CODE, b"\x00\x00\x04\xd2"))


@pytest.mark.parametrize("length", [0, 7, 10001, -1])
def test_startup_packet_length_bounds(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid length"):
        m.startup_packet_length(struct.pack("!i", length), 10000)


def test_startup_packet_too_short() -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_startup_packet(b"\x00\x00\x00\x08\x00\x03")


def test_authentication() -> None:
    assert m.auth_code(body(AUTHENTICATION_OK)) == m.AUTH_OK
    assert m.auth_code(body(AUTHENTICATION_SASL)) == 10


# --- backend ------------------------------------------------------------------------------


def test_error_response_fields() -> None:
    fields = m.parse_fields(body(ERROR))
    assert fields == [
        (errors.FIELD_SEVERITY, b"ERROR"),
        (errors.FIELD_SEVERITY_NONLOCALIZED, b"ERROR"),
        (errors.FIELD_CODE, b"42P01"),
        (errors.FIELD_MESSAGE, b'relation "nope" does not exist'),
        (errors.FIELD_POSITION, b"15"),
    ]
    assert m.error_sqlstate(body(ERROR)) == b"42P01"
    assert errors.build_fields(fields) == body(ERROR)


def test_error_response_builder() -> None:
    built = errors.encode_error_response("42P01", 'relation "nope" does not exist')
    assert built == b"E\x00\x00\x00\x3a" + body(ERROR)[: -len(b"P15\x00\x00")] + b"\x00"
    full = errors.encode_error_response(
        "23505", "duplicate", severity="FATAL", detail="Key (id)=(1)", hint="é"
    )
    assert frame_end(full, 0) == len(full)
    assert m.parse_fields(body(full)) == [
        (errors.FIELD_SEVERITY, b"FATAL"),
        (errors.FIELD_SEVERITY_NONLOCALIZED, b"FATAL"),
        (errors.FIELD_CODE, b"23505"),
        (errors.FIELD_MESSAGE, b"duplicate"),
        (errors.FIELD_DETAIL, b"Key (id)=(1)"),
        (errors.FIELD_HINT, "é".encode()),
    ]


def test_error_without_sqlstate_and_unterminated_fields() -> None:
    assert m.error_sqlstate(b"SERROR\x00\x00") == b""
    assert m.parse_fields(b"") == []
    with pytest.raises(ProtocolViolation):
        m.parse_fields(b"SERROR")


def test_row_description() -> None:
    assert m.row_description_count(body(ROW_DESCRIPTION)) == 2
    assert m.trim_row_description(body(ROW_DESCRIPTION), 1) == (
        b"T\x00\x00\x00\x1b\x00\x01" + ROW_DESCRIPTION_FIELD_ID
    )
    assert m.trim_row_description(body(ROW_DESCRIPTION), 2) == ROW_DESCRIPTION
    assert m.trim_row_description(body(ROW_DESCRIPTION), 0) == b"T\x00\x00\x00\x06\x00\x00"


def test_trim_row_description_beyond_its_fields() -> None:
    with pytest.raises(ProtocolViolation):
        m.trim_row_description(body(ROW_DESCRIPTION), 3)
    with pytest.raises(ProtocolViolation):  # the last field cut short
        m.trim_row_description(body(ROW_DESCRIPTION)[:-1], 2)


def test_data_row() -> None:
    assert m.data_row_values(body(DATA_ROW)) == [b"1", None, b""]
    assert m.trim_data_row(body(DATA_ROW), 2) == (
        b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff"
    )
    assert m.trim_data_row(body(DATA_ROW), 3) == DATA_ROW
    assert m.data_row_values(b"\x00\x00") == []


def test_data_row_cut_short() -> None:
    # A value running past the end of the message is an error, never a shorter value.
    short = body(DATA_ROW)[:-1]
    with pytest.raises(ProtocolViolation):
        m.data_row_values(short)
    with pytest.raises(ProtocolViolation):
        m.trim_data_row(short, 3)
    with pytest.raises(ProtocolViolation):
        m.data_row_values(b"\x00\x01\x00\x00\x00\x05abc")
    with pytest.raises(ProtocolViolation):
        m.trim_data_row(b"\x00\x01\x00\x00\x00\x05abc", 1)


def test_command_complete() -> None:
    assert m.parse_command_complete(body(COMMAND_COMPLETE)) == b"INSERT 0 3"
    assert m.command_complete(b"INSERT 0 3") == COMMAND_COMPLETE
    assert m.command_complete(b"UPDATE 2") == b"C\x00\x00\x00\x0dUPDATE 2\x00"


@pytest.mark.parametrize(
    ("tag", "rows"),
    [
        (b"INSERT 0 3", 3),
        (b"UPDATE 0", 0),
        (b"DELETE 12", 12),
        (b"SELECT 1000000", 1000000),
        (b"MERGE 4", 4),
        (b"COPY 5", 5),
        (b"FETCH 2", 2),
        (b"BEGIN", None),
        (b"CREATE TABLE", None),
        (b"", None),
        (b"UPDATE 1x", None),
        (b"UPDATE -1", None),
    ],
)
def test_command_tag_rows(tag: bytes, rows: int | None) -> None:
    assert m.command_tag_rows(tag) == rows


def test_ready_for_query_and_small_frames() -> None:
    assert m.ready_for_query(b"I") == READY_IDLE
    assert m.ready_for_query(b"E") == b"Z\x00\x00\x00\x05E"
    assert m.NO_DATA_MESSAGE == b"n\x00\x00\x00\x04"
    assert m.parse_parameter_status(body(PARAMETER_STATUS)) == (b"client_encoding", b"UTF8")


# ---------------------------------------------------------------------------------------------
# Truncation and fuzzing: malformed input raises ProtocolViolation, nothing else.


@pytest.mark.parametrize(
    ("parser", "raw"),
    [
        (m.parse_parse, PARSE),
        (m.parse_bind, BIND),
        (m.parse_execute, EXECUTE_P1_100),
        (m.parse_describe_or_close, DESCRIBE_STATEMENT),
        (m.parse_query, QUERY),
        (m.parse_command_complete, COMMAND_COMPLETE),
        (m.parse_parameter_status, PARAMETER_STATUS),
        (m.data_row_values, DATA_ROW),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_every_truncation_is_a_protocol_violation(
    parser: Callable[[bytes], object], raw: bytes
) -> None:
    full = body(raw)
    parser(full)
    for cut in range(len(full)):
        with pytest.raises(ProtocolViolation):
            parser(full[:cut])


@pytest.mark.parametrize("count", [-1, -2, -32768])
def test_bind_negative_format_count(count: int) -> None:
    # Used to move the read position backwards: struct.error, or a bogus parse read from
    # the end of the message.
    raw_body = b"p\x00s\x00" + struct.pack("!h", count) + b"\x00" * 12
    with pytest.raises(ProtocolViolation):
        m.parse_bind(raw_body)


@pytest.mark.parametrize(
    "raw_body",
    [
        b"\x00s\x00\x00\x00\xff\xff\x00\x00",  # negative parameter count
        b"\x00s\x00\x00\x00\x00\x00\xff\xff",  # negative result-format count
        b"\x00s\x00\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00",  # value longer than the rest
        b"\x00s\x00\x00\x00\x00\x00\x00\x02\x00\x01",  # two result formats, one present
    ],
)
def test_bind_bad_counts(raw_body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_bind(raw_body)


@pytest.mark.parametrize(
    "raw_body",
    [b"\x00x\x00\xff\xff", b"\x00x\x00\x00\x02\x00\x00\x00\x17", b"\x00x\x00"],
    ids=["negative", "short", "no count"],
)
def test_parse_bad_counts(raw_body: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        m.parse_parse(raw_body)


def _startup_parameters(raw: bytes) -> object:
    return m.parse_startup_packet(raw).parameters()


def _cancel(raw: bytes) -> object:
    return m.parse_cancel_request(m.StartupPacket(m.CANCEL_REQUEST_CODE, raw))


PARSERS: Sequence[Callable[[bytes], object]] = [
    m.parse_parse,
    m.parse_bind,
    m.parse_query,
    m.parse_describe_or_close,
    m.parse_execute,
    m.parse_fields,
    m.error_sqlstate,
    m.parse_command_complete,
    m.parse_parameter_status,
    m.data_row_values,
    m.row_description_count,
    m.parse_backend_key_data,
    m.auth_code,
    m.parse_startup_packet,
    _startup_parameters,
    _cancel,
    lambda raw: m.trim_row_description(raw, 1),
    lambda raw: m.trim_data_row(raw, 2),
]

#: pieces that make the counts and lengths interesting: negative, zero, huge, NUL, cut short
_PIECES = st.sampled_from(
    [b"\x00", b"\xff", b"a", b"\x00\x01", b"\x00\x03", b"\xff\xff", b"\x80\x00",
     b"\x00\x00\x00\x02", b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"]
)
fuzz_bodies = st.one_of(
    st.binary(max_size=40),
    st.lists(_PIECES, max_size=14).map(b"".join),
    st.builds(
        lambda raw, cut, junk: raw[:cut] + junk,
        st.sampled_from([body(PARSE), body(BIND), body(DATA_ROW), body(ROW_DESCRIPTION)]),
        st.integers(0, 60),
        st.lists(_PIECES, max_size=4).map(b"".join),
    ),
)


@settings(max_examples=800, deadline=None)
@given(raw=fuzz_bodies)
def test_parsers_parse_or_raise_protocol_violation(raw: bytes) -> None:
    for parser in PARSERS:
        try:
            parser(raw)
        except ProtocolViolation:
            pass


# --- round trips through a test-side Bind encoder ------------------------------------------


def encode_bind(
    portal: bytes,
    statement: bytes,
    param_formats: Sequence[int],
    params: Sequence[bytes | None],
    result_formats: Sequence[int],
) -> bytes:
    out = portal + b"\x00" + statement + b"\x00"
    out += struct.pack(f"!h{len(param_formats)}h", len(param_formats), *param_formats)
    out += struct.pack("!h", len(params))
    for value in params:
        out += b"\xff\xff\xff\xff" if value is None else struct.pack("!i", len(value)) + value
    return out + struct.pack(f"!h{len(result_formats)}h", len(result_formats), *result_formats)


names = st.binary(max_size=8).map(lambda raw: raw.replace(b"\x00", b"n"))
formats = st.lists(st.integers(0, 1), max_size=6)


@settings(max_examples=200, deadline=None)
@given(
    portal=names,
    statement=names,
    param_formats=formats,
    params=st.lists(st.one_of(st.none(), st.binary(max_size=10)), max_size=6),
    result_formats=formats,
    extra=st.integers(0, 3),
)
def test_bind_round_trip(
    portal: bytes,
    statement: bytes,
    param_formats: list[int],
    params: list[bytes | None],
    result_formats: list[int],
    extra: int,
) -> None:
    raw = encode_bind(portal, statement, param_formats, params, result_formats)
    head = m.parse_bind(raw)
    assert (head.portal, head.statement) == (portal, statement)
    assert head.result_formats == tuple(result_formats)
    assert raw[head.result_formats_at :] == struct.pack(
        f"!h{len(result_formats)}h", len(result_formats), *result_formats
    )
    rebuilt = m.bind_with_extra_result_columns(raw, head, extra)
    assert frame_end(rebuilt, 0) == len(rebuilt)
    if len(result_formats) > 1 and extra:
        want = encode_bind(portal, statement, param_formats, params, result_formats + [0] * extra)
    else:
        want = raw
    assert rebuilt[5:] == want


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.one_of(st.none(), st.binary(max_size=12)), max_size=8),
    keep=st.integers(0, 8),
)
def test_data_row_round_trip(values: list[bytes | None], keep: int) -> None:
    raw_body = struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values
    )
    assert m.data_row_values(raw_body) == values
    if keep <= len(values):
        trimmed = m.trim_data_row(raw_body, keep)
        assert m.data_row_values(trimmed[5:]) == values[:keep]
        assert frame_end(trimmed, 0) == len(trimmed)
    else:
        with pytest.raises(ProtocolViolation):
            m.trim_data_row(raw_body, keep)


@settings(max_examples=100, deadline=None)
@given(name=names, sql=names, types=st.lists(st.integers(0, 2**32 - 1), max_size=5))
def test_parse_round_trip(name: bytes, sql: bytes, types: list[int]) -> None:
    raw = m.build_parse(name, sql, types)
    assert frame_end(raw, 0) == len(raw)
    assert m.parse_parse(raw[5:]) == m.Parse(name, sql, tuple(types))
