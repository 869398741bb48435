"""The relay core (proxy/relay.py) driven byte by byte: what it forwards, the effects it asks
for, and the moves between its states. No sockets, no event loop."""

from __future__ import annotations

import struct

import pytest

from core import errors
from core.errors import TOO_MANY_CLIENTS
from proxy.relay import (
    NO_EFFECTS,
    TRANSITIONS,
    CancelKeyKnown,
    Close,
    Connect,
    EndUpstream,
    Event,
    ForwardCancel,
    Relay,
    Started,
    State,
    ToClient,
    ToServer,
    TransitionError,
)
from proxy.wire import messages as m
from proxy.wire.frames import frame
from tests.support.relay_core import (
    AUTH_OK,
    BACKEND_KEY,
    StubHost,
    new_core,
    parameter_status,
    split,
    to_ready,
)

STARTUP = m.build_startup_message({"user": "u", "database": "d", "application_name": "a"})
QUERY = m.build_query(b"SELECT 1")
REPLY = (
    frame(b"T", b"\x00\x01n\x00" + b"\x00" * 9 + b"\x17\x00\x04\xff\xff\xff\xff\x00\x00")
    + frame(b"D", b"\x00\x01\x00\x00\x00\x011")
    + m.command_complete(b"SELECT 1")
    + m.ready_for_query(b"I")
)
TERMINATE = m.TERMINATE_MESSAGE


def error_fields(data: bytes) -> tuple[str, str, str]:
    """(severity, SQLSTATE, message) of one ErrorResponse frame."""
    assert data[0] == m.ERROR_RESPONSE
    assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
    fields = dict(m.parse_fields(data[5:]))
    return (
        fields[errors.FIELD_SEVERITY_NONLOCALIZED].decode(),
        fields[errors.FIELD_CODE].decode(),
        fields[errors.FIELD_MESSAGE].decode(),
    )


def bytewise_client(core: Relay, data: bytes) -> tuple[bytes, list[object]]:
    forwarded, effects = b"", []
    for i in range(len(data)):
        forward, then = core.from_client(data[i : i + 1])
        forwarded += bytes(forward)
        effects += then
    return forwarded, effects


def bytewise_server(core: Relay, data: bytes) -> tuple[bytes, list[object]]:
    forwarded, effects = b"", []
    for i in range(len(data)):
        forward, then = core.from_server(data[i : i + 1])
        forwarded += bytes(forward)
        effects += then
    return forwarded, effects


def ready_core() -> Relay:
    core = new_core()
    to_ready(core)
    return core


# --- transitions as data ------------------------------------------------------------------


def test_every_state_but_closed_can_close_and_closed_is_final() -> None:
    for state in State:
        if state is State.CLOSED:
            assert not [key for key in TRANSITIONS if key[0] is State.CLOSED]
        else:
            assert TRANSITIONS[state, Event.CLOSE] is State.CLOSED


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(Event), ids=lambda e: e.name)
def test_a_move_outside_the_table_raises(state: State, event: Event) -> None:
    core = new_core()
    core.state = state
    if (state, event) in TRANSITIONS:
        assert core.move(event) is TRANSITIONS[state, event]
    else:
        with pytest.raises(TransitionError):
            core.move(event)
        assert core.state is state


# --- startup and authentication -----------------------------------------------------------


def test_startup_byte_by_byte_then_pipelined_bytes_wait_for_the_upstream() -> None:
    core = new_core()
    forwarded, effects = bytewise_client(core, STARTUP)
    assert (forwarded, effects) == (b"", [Connect()])
    assert core.state is State.CONNECT
    assert core.startup_params["application_name"] == "a"
    assert core.from_client(QUERY) == (b"", NO_EFFECTS)  # waits while connecting
    forward, effects = core.upstream_connected(tls=False)
    assert bytes(forward) == STARTUP + QUERY
    assert list(effects) == []
    assert core.state is State.AUTH


def test_ssl_request_is_answered_no_and_startup_goes_on() -> None:
    core = new_core()
    forward, effects = core.from_client(m.build_ssl_request() + STARTUP[:3])
    assert (forward, list(effects)) == (b"", [ToClient(b"N")])
    assert core.state is State.STARTUP
    assert list(core.from_client(STARTUP[3:])[1]) == [Connect()]


def test_cancel_request_is_forwarded_and_then_the_connection_closes() -> None:
    core = new_core()
    key = m.CancelKey(4242, b"\x00\x00\x00\x07")
    forwarded, effects = bytewise_client(core, m.build_cancel_request(key))
    assert (forwarded, effects) == (b"", [ForwardCancel(key)])
    assert core.state is State.CANCELLING
    assert core.from_client(STARTUP) == (b"", NO_EFFECTS)  # nothing more is read
    assert list(core.request_shutdown()) == []  # never answered, even when draining
    assert list(core.close()) == [Close()]
    assert core.state is State.CLOSED


def test_unsupported_protocol_version_is_refused() -> None:
    core = new_core()
    _, effects = core.from_client(m.build_startup_message({"user": "u"}, version=4 << 16))
    client, server, closed = split(effects)
    assert error_fields(client) == (
        "FATAL",
        "0A000",
        "unsupported frontend protocol 4.0: server supports 3.0 to 3.0",
    )
    assert (server, closed, core.state) == (b"", True, State.CLOSED)


def test_admission_refused_answers_from_the_table() -> None:
    core = new_core(host=StubHost(refusal=TOO_MANY_CLIENTS))
    _, effects = core.from_client(STARTUP)
    client, _, closed = split(effects)
    assert error_fields(client) == ("FATAL", "53300", "sorry, too many clients already")
    assert closed
    assert core.state is State.CLOSED


def test_authentication_byte_by_byte_reaches_ready() -> None:
    core = new_core()
    core.from_client(STARTUP)
    core.upstream_connected(tls=False)
    auth = (
        AUTH_OK
        + BACKEND_KEY
        + parameter_status(b"client_encoding", b"LATIN1")
        + parameter_status(b"standard_conforming_strings", b"on")
        + m.ready_for_query(b"I")
    )
    forwarded, effects = bytewise_server(core, auth)
    assert forwarded == auth
    assert effects == [CancelKeyKnown(m.CancelKey(4242, b"\x00\x00\x00\x07")), Started()]
    assert core.state is State.READY
    assert core.server_parameters == {
        "client_encoding": "LATIN1",
        "standard_conforming_strings": "on",
    }
    assert core.frontend.codec == "latin-1"  # Frontend.server_parameter followed it


def test_a_parameter_change_after_startup_reaches_the_frontend() -> None:
    core = ready_core()
    change = parameter_status(b"standard_conforming_strings", b"off")
    assert core.from_server(change) == (change, NO_EFFECTS)
    assert core.server_parameters["standard_conforming_strings"] == "off"


def test_scram_plus_is_not_offered_over_a_tls_upstream() -> None:
    core = new_core()
    core.from_client(STARTUP)
    core.upstream_connected(tls=True)
    offer = frame(
        b"R", struct.pack("!i", m.AUTH_SASL) + b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    )
    forward, effects = core.from_server(offer)
    assert bytes(forward) == frame(b"R", struct.pack("!i", m.AUTH_SASL) + b"SCRAM-SHA-256\x00\x00")
    assert list(effects) == []
    assert core.state is State.AUTH


def test_frames_after_the_first_ready_for_query_take_the_ready_path() -> None:
    core = new_core()
    core.from_client(STARTUP)
    core.upstream_connected(tls=False)
    notice = frame(b"N", b"SNOTICE\x00Mhi\x00\x00")
    forward, _ = core.from_server(AUTH_OK + m.ready_for_query(b"I") + notice)
    assert bytes(forward) == AUTH_OK + m.ready_for_query(b"I") + notice
    assert core.state is State.READY


def test_startup_timeout_refuses_before_ready_only() -> None:
    core = new_core()
    client, _, closed = split(core.startup_timed_out())
    assert error_fields(client)[:2] == ("FATAL", "08P01")
    assert closed
    assert ready_core().startup_timed_out() == NO_EFFECTS


# --- the fast path ------------------------------------------------------------------------


def test_fast_path_forwards_unread_with_no_effects() -> None:
    core = ready_core()
    for i in range(len(QUERY) - 1):
        forward, effects = core.from_client(QUERY[i : i + 1])
        assert forward == b""
        assert effects is NO_EFFECTS
    forward, effects = core.from_client(QUERY[-1:])
    assert effects is NO_EFFECTS
    assert bytes(forward) == QUERY
    assert not core.tracker.idle
    whole, effects = core.from_server(REPLY)
    assert effects is NO_EFFECTS
    assert whole is REPLY  # the very bytes that arrived
    assert core.tracker.idle


def test_replies_byte_by_byte_are_forwarded_whole_frames_at_a_time() -> None:
    core = ready_core()
    core.from_client(QUERY)
    forwarded, effects = bytewise_server(core, REPLY)
    assert (forwarded, effects) == (REPLY, [])
    assert core.tracker.idle


# --- Terminate, EOF, lost peers -----------------------------------------------------------


def test_terminate_behind_a_query_drains_until_the_server_closes() -> None:
    core = ready_core()
    forward, effects = core.from_client(QUERY + TERMINATE + QUERY)
    assert bytes(forward) == QUERY + TERMINATE  # nothing after the Terminate is read
    assert list(effects) == []
    assert core.state is State.DRAINING
    assert core.from_client(QUERY) == (b"", NO_EFFECTS)
    assert core.from_server(REPLY) == (REPLY, NO_EFFECTS)
    assert list(core.upstream_lost()) == [Close()]  # no error of ours: the client asked
    assert core.state is State.CLOSED


def test_terminate_while_idle_closes_at_once() -> None:
    core = ready_core()
    forward, effects = core.from_client(TERMINATE)
    assert bytes(forward) == TERMINATE
    assert list(effects) == [Close()]  # and no second Terminate of ours
    assert core.state is State.CLOSED


def test_close_of_an_idle_session_says_terminate_upstream() -> None:
    core = ready_core()
    assert list(core.close()) == [ToServer(TERMINATE), Close()]
    assert core.close() == NO_EFFECTS


def test_client_eof_is_passed_on_and_replies_still_flow() -> None:
    core = ready_core()
    core.from_client(QUERY)
    assert list(core.client_eof()) == [EndUpstream()]
    assert core.state is State.DRAINING
    assert core.from_server(REPLY) == (REPLY, NO_EFFECTS)
    assert list(core.upstream_lost()) == [Close()]


def test_upstream_lost_unexpectedly_is_reported() -> None:
    core = ready_core()
    client, _, closed = split(core.upstream_lost())
    assert error_fields(client) == (
        "FATAL",
        "08006",
        "upstream server closed the connection unexpectedly",
    )
    assert closed


def test_upstream_lost_after_its_own_fatal_adds_nothing() -> None:
    core = ready_core()
    fatal = errors.encode_error_response("57P01", "terminating connection", severity="FATAL")
    assert core.from_server(fatal) == (fatal, NO_EFFECTS)
    client, _, closed = split(core.upstream_lost())
    assert (client, closed) == (b"", True)


def test_shutdown_waits_for_the_reply_in_flight() -> None:
    core = ready_core()
    core.from_client(QUERY)
    assert core.request_shutdown() == NO_EFFECTS
    forward, effects = core.from_server(REPLY)
    assert forward is REPLY
    client, _, closed = split(effects)
    assert error_fields(client)[:2] == ("FATAL", "57P01")
    assert closed


def test_a_too_large_message_is_a_protocol_violation() -> None:
    core = new_core(host=StubHost())
    to_ready(core)
    limit = core.host.config.limits.max_message_bytes
    forward, effects = core.from_client(b"Q" + struct.pack("!i", limit + 5))
    client, _, closed = split(effects)
    assert forward == b""
    assert error_fields(client)[:2] == ("FATAL", "08P01")
    assert closed
