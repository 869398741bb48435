"""core/errors.py's table: every ErrorResponse the proxy sends of its own is a valid frame with
the entry's SQLSTATE, severity and filled-in message."""

from __future__ import annotations

import re

import pytest

from core import errors
from core.errors import CLIENT_ERRORS, ClientError, MessageTooLarge, ProtocolViolation
from proxy.wire import messages as m
from proxy.wire.frames import FrameScanner, type_table

_SQLSTATE = re.compile(r"^[0-9A-Z]{5}$")


def decode(response: bytes) -> dict[str, str]:
    """The fields of one ErrorResponse frame, checked to be exactly one whole frame."""
    scan = FrameScanner(type_table(range(256))).feed(response)
    buf, ready, kinds = scan[0], scan[1], scan[2]
    assert ready == len(response) == len(buf)
    assert kinds == bytes((m.ERROR_RESPONSE,))
    assert response.endswith(b"\x00\x00")
    return {chr(code): value.decode() for code, value in m.parse_fields(response[5:])}


@pytest.mark.parametrize("name", sorted(CLIENT_ERRORS))
def test_every_entry_encodes_a_valid_error_response(name: str) -> None:
    entry = CLIENT_ERRORS[name]
    assert getattr(errors, name) is entry
    assert _SQLSTATE.match(entry.sqlstate)
    assert entry.severity in ("ERROR", "FATAL")
    values = {field: f"<{field}>" for field in entry.fields}
    fields = decode(entry.response(**values))
    assert fields["C"] == entry.sqlstate
    assert fields["S"] == fields["V"] == entry.severity
    assert fields["M"] == entry.text(**values)
    assert "{" not in fields["M"]
    for value in values.values():
        assert value in fields["M"]
    if entry.hint is not None:
        assert fields["H"] == entry.hint
    else:
        assert "H" not in fields


def test_the_table_has_the_sqlstates_the_proxy_answers_with() -> None:
    codes = {entry.sqlstate for entry in CLIENT_ERRORS.values()}
    assert codes == {"57P01", "57P03", "53300", "08P01", "0A000", "08006", "XX000"}


def test_a_missing_field_is_an_error_not_a_half_filled_message() -> None:
    with pytest.raises(KeyError):
        errors.UNSUPPORTED_PROTOCOL.response(major=4)


def test_detail_and_non_ascii_text_are_encoded() -> None:
    entry = ClientError("22000", "bad value {value}", severity="ERROR")
    fields = decode(entry.response(value="é", detail="Key (id)=(1)"))
    assert (fields["M"], fields["D"]) == ("bad value é", "Key (id)=(1)")


def test_raised_protocol_errors_answer_from_the_table() -> None:
    fields = decode(ProtocolViolation("invalid startup packet length").response())
    assert (fields["C"], fields["V"], fields["M"]) == (
        "08P01",
        "FATAL",
        "invalid startup packet length",
    )
    fields = decode(MessageTooLarge(1 << 20, 4096).response())
    assert fields["C"] == "08P01"
    assert fields["M"] == "message of 1048576 bytes exceeds the limit of 4096 bytes"
