"""The reply tracker, driven with real frames through the real relay core.

``Relay`` below feeds bytes to ``proxy.relay.Relay`` (brought to READY through a real
startup) and collects what it forwards and what effects it asks for, minus the sockets. What
the rewrite layer would decide is scripted per message. Precise-mode tests run twice: with
the core's inlined fast path for plain entries, and with every reply going through
``ResponseTracker.on_reply`` (``Relay.inline_replies = False``); both must agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import errors
from proxy import relay as rc
from proxy.relay import Effects, ToClient, ToServer
from proxy.tracker import Pending, ResponseTracker
from proxy.wire import messages as m
from proxy.wire.frames import FrameScanner, frame, frame_end
from tests.support.relay_core import new_core, to_ready

# ---------------------------------------------------------------------------------------------
# Client messages


def query(sql: bytes = b"SELECT 1") -> bytes:
    return m.build_query(sql)


def parse(name: bytes = b"", sql: bytes = b"SELECT 1") -> bytes:
    return m.build_parse(name, sql)


def bind(portal: bytes = b"", statement: bytes = b"") -> bytes:
    return m.build_bind(portal, statement)


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return frame(b"D", kind + name + b"\x00")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return m.build_execute(portal, max_rows)


def close(kind: bytes, name: bytes = b"") -> bytes:
    return frame(b"C", kind + name + b"\x00")


SYNC = m.SYNC_MESSAGE
FLUSH = frame(b"H", b"")
FUNCTION_CALL = frame(b"F", b"\x00\x00\x04\xd2" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
COPY_DATA = frame(b"d", b"1\tx\n")
COPY_DONE = frame(b"c", b"")
COPY_FAIL = frame(b"f", b"cancelled\x00")

# Server messages

PARSE_COMPLETE = frame(b"1", b"")
BIND_COMPLETE = frame(b"2", b"")
CLOSE_COMPLETE = frame(b"3", b"")
PARAMETER_DESCRIPTION = frame(b"t", b"\x00\x01\x00\x00\x00\x17")
ROW_DESCRIPTION = frame(
    b"T",
    b"\x00\x01n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00",
)
NO_DATA = m.NO_DATA_MESSAGE
ROW = frame(b"D", b"\x00\x01\x00\x00\x00\x011")
EMPTY_QUERY = frame(b"I", b"")
SUSPENDED = frame(b"s", b"")
COPY_IN = frame(b"G", b"\x00\x00\x01\x00\x00")
COPY_OUT = frame(b"H", b"\x00\x00\x01\x00\x00")
SERVER_COPY_DATA = frame(b"d", b"1\tx\n")
SERVER_COPY_DONE = frame(b"c", b"")
FUNCTION_RESULT = frame(b"V", b"\x00\x00\x00\x011")
NOTICE = frame(b"N", b"SNOTICE\x00Mhello\x00\x00")
NOTIFICATION = frame(b"A", b"\x00\x00\x04\xd2chan\x00\x00")
PARAMETER_STATUS = frame(b"S", b"TimeZone\x00UTC\x00")
ERROR = errors.encode_error_response("22012", "division by zero")


def complete(tag: bytes) -> bytes:
    return m.command_complete(tag)


def ready(status: bytes = b"I") -> bytes:
    return m.ready_for_query(status)


def cat(*parts: bytes) -> bytes:
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# The relay, minus the sockets


class Recorder:
    """A repair plan that records the replies it is handed and can replace some of them."""

    def __init__(self, replace: dict[int, bytes] | None = None) -> None:
        self.seen = ""
        self.replace = replace or {}

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes:
        assert raw[0] == typ
        assert raw[5:] == body
        self.seen += chr(typ)
        return self.replace.get(typ, raw)


class ScriptedFrontend:
    """Stands in for proxy.frontend.Frontend: scripted entries for chosen messages.

    Every other message gets its own type byte as entry, as a plain relay would.
    """

    def __init__(self) -> None:
        self.script: dict[bytes, list[tuple[bytes | None, list[int | Pending]]]] = {}
        self.inspects_extended = False
        self.discarding = False
        self.parameters: dict[str, str] = {}

    def on(
        self, raw: bytes, *entries: int | Pending, replacement: bytes | None = None
    ) -> None:
        """The next time the frame ``raw`` is sent, expect ``entries`` for it."""
        self.script.setdefault(raw, []).append((replacement, list(entries)))
        if raw[0] not in (m.QUERY, m.PARSE):
            self.inspects_extended = True

    def plain_query(self, body: bytes) -> bool:
        """Like Frontend.plain_query: True when the lone Query has no script."""
        return not self.script.get(frame(bytes((m.QUERY,)), body))

    def plain_extended(self, buf: bytes, kinds: bytes, starts: list[int]) -> bool:
        """Like Frontend.plain_extended: no frame of the read has a script."""
        return not any(self.script.get(buf[at : frame_end(buf, at)]) for at in starts)

    def message(self, typ: int, body: bytes) -> tuple[bytes | None, list[int | Pending]]:
        scripted = self.script.get(frame(bytes((typ,)), body))
        if scripted:
            return scripted.pop(0)
        return None, [typ] if typ in rc.REPLY_KINDS else []

    def server_parameter(self, name: str, value: str) -> None:
        self.parameters[name] = value


class Relay:
    """The real relay core, with byte buffers for sockets."""

    def __init__(self, *, inline: bool = True) -> None:
        self.frontend = ScriptedFrontend()
        self.core = new_core(self.frontend)
        self.core.inline_replies = inline
        to_ready(self.core)
        self.tracker = self.core.tracker
        self.upstream = bytearray()
        self.to_client = bytearray()

    @property
    def server_scan(self) -> FrameScanner:
        return self.core.server_scan

    def _carry_out(self, effects: Effects) -> None:
        for effect in effects:
            if isinstance(effect, ToClient):
                self.to_client += effect.data
            elif isinstance(effect, ToServer):
                self.upstream += effect.data
            else:
                pytest.fail(f"unexpected effect {effect!r}")

    def client(self, *messages: bytes) -> None:
        forward, effects = self.core.from_client(b"".join(messages))
        self.upstream += forward
        self._carry_out(effects)

    def proxy_sends(self, raw: bytes, *entries: int | Pending) -> None:
        """A message the proxy itself sends upstream (its replies are swallowed)."""
        for entry in entries:
            self.to_client += self.core.expect(entry)
        self.upstream += raw

    def server(self, *messages: bytes) -> None:
        forward, effects = self.core.from_server(b"".join(messages))
        self.to_client += forward
        self._carry_out(effects)

    # --- what tests look at -----------------------------------------------------------------

    def queue_kinds(self) -> str:
        queue = self.tracker.queue
        assert queue is not None
        return "".join(chr(e if type(e) is int else e.kind) for e in queue)  # type: ignore[union-attr]

    def assert_done(self, status: bytes = b"I") -> None:
        """Nothing owed, back in FAST mode, nothing unaccounted."""
        tracker = self.tracker
        assert tracker.queue is None, self.queue_kinds()
        assert tracker.cycles == 0
        assert tracker.open == b""
        assert tracker.status == status
        assert tracker.idle == (status == b"I")
        assert tracker.injections == 0
        assert tracker.unexpected == 0
        assert self.server_scan.table == rc.SERVER_TABLE


@pytest.fixture(params=["session-inline", "tracker-only"])
def relay(request: pytest.FixtureRequest) -> Relay:
    return Relay(inline=request.param == "session-inline")


def precise_query(relay: Relay, sql: bytes = b"SELECT 1") -> tuple[bytes, Recorder]:
    """A simple Query whose replies the rewrite layer repairs (makes the tracker PRECISE)."""
    raw = query(sql)
    plan = Recorder()
    relay.frontend.on(raw, Pending(m.QUERY, plan))
    return raw, plan


# ---------------------------------------------------------------------------------------------
# FAST mode


def test_fast_simple_query_cycle() -> None:
    relay = Relay()
    tracker = relay.tracker
    assert tracker.idle
    relay.client(query())
    assert (tracker.cycles, tracker.open, tracker.idle) == (1, b"", False)
    reply = cat(ROW_DESCRIPTION, ROW, complete(b"SELECT 1"), ready())
    relay.server(reply)
    assert bytes(relay.to_client) == reply
    assert relay.upstream == query()
    relay.assert_done()
    assert tracker.since_ready == b""


def test_fast_pipeline_counts_cycles_and_takes_status_from_the_last_ready() -> None:
    relay = Relay()
    tracker = relay.tracker
    # Bind/Execute/Sync of an already prepared statement: no Query or Parse, so the session
    # takes the O(1) path (tracker.sent with the scanner's counts)
    cycle = cat(bind(b"", b"s1"), execute(), SYNC)
    relay.client(cycle, cycle, cycle)
    assert (tracker.cycles, tracker.open) == (3, b"")
    relay.server(BIND_COMPLETE, complete(b"UPDATE 1"), ready(b"T"))
    assert (tracker.cycles, tracker.status, tracker.idle) == (2, b"T", False)
    relay.server(BIND_COMPLETE, complete(b"UPDATE 1"), ready(b"T"), BIND_COMPLETE, ERROR)
    assert (tracker.cycles, tracker.status) == (1, b"T")
    assert tracker.since_ready == cat(b"2", b"E")
    relay.server(ready(b"E"))
    assert (tracker.cycles, tracker.status, tracker.idle) == (0, b"E", False)
    relay.client(query(b"ROLLBACK"))
    relay.server(complete(b"ROLLBACK"), ready(b"I"))
    relay.assert_done()


def test_fast_messages_after_the_last_sync_are_open() -> None:
    relay = Relay()
    tracker = relay.tracker
    relay.client(parse(), bind(), execute(), FLUSH)
    assert (tracker.cycles, tracker.open, tracker.idle) == (0, b"PBE", False)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ROW, complete(b"SELECT 1"))
    assert tracker.since_ready == b"12C"  # rows are not reported in FAST mode
    assert not tracker.idle
    relay.client(SYNC)
    assert (tracker.cycles, tracker.open) == (1, b"")
    relay.server(ready())
    relay.assert_done()


def test_fast_open_messages_across_reads() -> None:
    relay = Relay()
    tracker = relay.tracker
    relay.client(bind(b"", b"s"), execute())
    relay.client(bind(b"", b"s"))
    assert tracker.open == b"BEB"
    relay.client(execute(), SYNC, bind(b"", b"s"))
    assert (tracker.cycles, tracker.open) == (1, b"B")


def test_fast_function_call_and_asynchronous_messages() -> None:
    relay = Relay()
    relay.client(FUNCTION_CALL)
    assert relay.tracker.cycles == 1
    relay.server(NOTICE, PARAMETER_STATUS, FUNCTION_RESULT, NOTIFICATION, ready())
    relay.assert_done()


def test_fast_unexpected_ready_for_query_is_counted() -> None:
    relay = Relay()
    relay.server(ready())
    assert relay.tracker.unexpected == 1
    assert relay.tracker.cycles == 0


def test_fast_state_does_not_depend_on_how_bytes_arrive() -> None:
    client = [
        cat(query(b"BEGIN")),
        cat(parse(b"s", b"UPDATE t SET a = 1"), bind(b"", b"s"), execute(), SYNC),
        cat(bind(b"", b"s"), execute(), FLUSH),
    ]
    server = cat(
        complete(b"BEGIN"), ready(b"T"),
        PARSE_COMPLETE, BIND_COMPLETE, complete(b"UPDATE 3"), ready(b"T"),
        BIND_COMPLETE, NOTICE,
    )  # fmt: skip
    states = []
    for chunk in (len(server), 7, 1):
        relay = Relay()
        for message in client:
            for pos in range(0, len(message), chunk):
                relay.client(message[pos : pos + chunk])
        for pos in range(0, len(server), chunk):
            relay.server(server[pos : pos + chunk])
        tracker = relay.tracker
        assert bytes(relay.to_client) == server
        assert relay.upstream == cat(*client)
        states.append((tracker.cycles, tracker.open, tracker.since_ready, tracker.status))
    assert states == [(0, b"BE", b"2", b"T")] * 3


# ---------------------------------------------------------------------------------------------
# PRECISE mode: the extended protocol


def test_precise_extended_pipeline(relay: Relay) -> None:
    tracker = relay.tracker
    messages = [
        parse(b"s1", b"INSERT INTO t VALUES ($1) RETURNING a"),
        bind(b"p1", b"s1"),
        describe(b"S", b"s1"),
        describe(b"P", b"p1"),
        execute(b"p1"),
        close(b"S", b"s1"),
        SYNC,
    ]
    plan = Recorder(replace={m.COMMAND_COMPLETE: complete(b"INSERT 0 1")})
    relay.frontend.on(messages[4], Pending(m.EXECUTE, plan))
    relay.client(*messages)
    assert tracker.precise
    assert relay.queue_kinds() == "PBDDECS"
    assert relay.server_scan.table == rc.SERVER_TABLE_ALL
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, PARAMETER_DESCRIPTION, ROW_DESCRIPTION)
    assert relay.queue_kinds() == "DECS"
    relay.server(ROW_DESCRIPTION, ROW, ROW)
    assert relay.queue_kinds() == "ECS"
    relay.server(complete(b"INSERT 0 2"), CLOSE_COMPLETE)
    assert relay.queue_kinds() == "S"
    assert plan.seen == "DDC"
    relay.server(ready())
    relay.assert_done()
    assert bytes(relay.to_client) == cat(
        PARSE_COMPLETE, BIND_COMPLETE, PARAMETER_DESCRIPTION, ROW_DESCRIPTION,
        ROW_DESCRIPTION, ROW, ROW, complete(b"INSERT 0 1"), CLOSE_COMPLETE, ready(),
    )  # fmt: skip


def test_precise_error_discards_entries_until_sync(relay: Relay) -> None:
    tracker = relay.tracker
    doomed = Recorder()
    survivor = Recorder()
    first = [parse(b"", b"SELECT 1/0"), bind(), describe(b"P"), execute(b"", 5), SYNC]
    second = [parse(b"", b"SELECT 2"), bind(), execute(b"", 6), SYNC]
    # the proxy answers the first Describe itself; the Bind fails before that answer is due
    relay.frontend.on(first[2], Pending(m.DESCRIBE, inject=NO_DATA))
    relay.frontend.on(first[3], Pending(m.EXECUTE, doomed))
    relay.frontend.on(second[2], Pending(m.EXECUTE, survivor))
    relay.client(*first, *second)
    assert relay.queue_kinds() == "PBDESPBES"
    assert tracker.injections == 1
    relay.server(PARSE_COMPLETE, ERROR)
    assert relay.queue_kinds() == "SPBES"
    assert tracker.injections == 0  # the injected NoData would have been skipped too
    relay.server(ready(b"I"), PARSE_COMPLETE, BIND_COMPLETE, ROW, complete(b"SELECT 1"))
    relay.server(ready())
    relay.assert_done()
    assert doomed.seen == ""
    assert survivor.seen == "DC"
    assert NO_DATA not in relay.to_client


def test_precise_error_skips_a_query_before_the_sync(relay: Relay) -> None:
    # After an error in an extended-protocol message the server ignores everything up to
    # Sync, a simple Query included (postgres.c: ignore_till_sync), so the Query gets no reply.
    skipped = query(b"SELECT 'skipped'")
    skipped_plan = Recorder()
    relay.frontend.on(skipped, Pending(m.QUERY, skipped_plan))
    relay.client(parse(), bind(), execute(), skipped, SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ERROR)
    assert relay.queue_kinds() == "S"
    relay.server(ready())
    relay.assert_done()
    nxt, plan = precise_query(relay, b"SELECT 3")
    relay.client(nxt)
    relay.server(ROW_DESCRIPTION, ROW, complete(b"SELECT 1"), ready())
    relay.assert_done()
    assert skipped_plan.seen == ""
    assert plan.seen == "TDCZ"


def test_precise_error_before_any_sync_skips_what_is_sent_next(relay: Relay) -> None:
    # An error answered a flushed batch; the client, pipelining, sends more before its Sync.
    # The server ignores those messages, so the tracker must not wait for their replies.
    tracker = relay.tracker
    first_plan, later_plan = Recorder(), Recorder()
    p = parse(b"", b"INSERT INTO t VALUES (1)")
    relay.frontend.on(p, Pending(m.PARSE, first_plan))
    relay.client(p, bind(), execute(), FLUSH)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ERROR)
    assert relay.queue_kinds() == ""
    assert tracker.skipping
    assert not tracker.idle  # the server still waits for a Sync
    assert not tracker.settle()
    later = query(b"SELECT 'ignored'")
    relay.frontend.on(later, Pending(m.QUERY, later_plan))
    relay.client(later, bind(), execute())
    assert relay.queue_kinds() == ""
    relay.client(SYNC)
    assert relay.queue_kinds() == "S"
    assert not tracker.skipping
    relay.server(ready())
    relay.assert_done()
    assert first_plan.seen == "1"
    assert later_plan.seen == ""
    # and the connection carries on in FAST mode
    relay.client(query())
    relay.server(complete(b"SELECT 0"), ready())
    relay.assert_done()


def test_precise_injected_entry_dropped_while_the_server_skips(relay: Relay) -> None:
    # The proxy must not answer a message the server would ignore.
    relay.client(*[parse(), bind(), execute(), FLUSH])
    relay.frontend.on(query(b"SELECT 0"), Pending(m.QUERY, Recorder()))
    relay.client(query(b"SELECT 0"))  # PRECISE from here
    relay.server(PARSE_COMPLETE, ERROR)
    assert relay.tracker.skipping
    refused = parse(b"", b"DELETE FROM t")
    relay.frontend.on(refused, Pending(m.PARSE, inject=errors.encode_error_response("0A000", "no")))
    relay.client(refused)
    assert relay.tracker.injections == 0
    assert b"0A000" not in relay.to_client
    relay.client(SYNC)
    relay.server(ready())
    relay.assert_done()


def test_precise_portal_suspended(relay: Relay) -> None:
    plan = Recorder()
    relay.frontend.on(execute(b"c", 2), Pending(m.EXECUTE, plan))
    relay.client(parse(b"", b"SELECT g FROM generate_series(1, 3) g"), bind(b"c"))
    relay.client(execute(b"c", 2), FLUSH)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ROW, ROW, SUSPENDED)
    assert plan.seen == "DDs"
    # Nothing is owed, but the batch is not synced: the portal and its implicit transaction
    # are still open on the server, so the connection is not idle (in either mode).
    assert not relay.tracker.idle
    if relay.tracker.precise:
        assert relay.queue_kinds() == ""
    relay.client(execute(b"c", 2), SYNC)
    relay.server(ROW, complete(b"SELECT 1"), ready(b"I"))
    relay.assert_done()


def test_precise_empty_query_in_extended_protocol(relay: Relay) -> None:
    plan = Recorder()
    relay.frontend.on(parse(b"", b""), Pending(m.PARSE, plan))
    relay.client(parse(b"", b""), bind(), describe(b"P"), execute(), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, EMPTY_QUERY, ready())
    relay.assert_done()
    assert plan.seen == "1"


# ---------------------------------------------------------------------------------------------
# PRECISE mode: simple Query, COPY, FunctionCall


def test_precise_simple_query_with_several_statements_and_an_error(relay: Relay) -> None:
    raw, plan = precise_query(relay, b"SELECT 1; SELECT 1/0; SELECT 3")
    relay.client(raw)
    relay.server(ROW_DESCRIPTION, ROW, complete(b"SELECT 1"), NOTICE, ROW_DESCRIPTION, ERROR)
    assert relay.queue_kinds() == "Q"
    relay.server(ready(b"E"))
    relay.assert_done(status=b"E")
    assert plan.seen == "TDCTEZ"  # the notice is asynchronous: no entry's business
    relay.client(query(b"ROLLBACK"))
    relay.server(complete(b"ROLLBACK"), ready())
    relay.assert_done()


def test_precise_copy_in_simple_protocol(relay: Relay) -> None:
    tracker = relay.tracker
    raw, plan = precise_query(relay, b"COPY t FROM STDIN")
    relay.client(raw)
    relay.server(COPY_IN)
    assert tracker.copy_in
    relay.client(COPY_DATA, COPY_DATA)
    relay.client(COPY_DONE)
    assert relay.queue_kinds() == "Q"
    assert not tracker.idle
    relay.server(complete(b"COPY 2"), ready())
    relay.assert_done()
    assert plan.seen == "GCZ"
    assert not tracker.copy_in


def test_precise_copy_in_extended_protocol(relay: Relay) -> None:
    tracker = relay.tracker
    plan = Recorder()
    relay.frontend.on(execute(), Pending(m.EXECUTE, plan))
    relay.client(parse(b"", b"COPY t FROM STDIN"), bind(), execute(), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN)
    assert tracker.copy_in
    # The server ignores a Sync read during COPY IN: the one sent with Execute is not owed.
    assert relay.queue_kinds() == "E"
    relay.client(COPY_DATA, COPY_DONE, SYNC)
    relay.server(complete(b"COPY 1"))
    assert not tracker.copy_in
    relay.server(ready())
    relay.assert_done()
    assert plan.seen == "GC"


def test_precise_copy_fail_extended_protocol(relay: Relay) -> None:
    tracker = relay.tracker
    plan = Recorder()
    relay.frontend.on(execute(), Pending(m.EXECUTE, plan))
    relay.client(parse(b"", b"COPY t FROM STDIN"), bind(), execute(), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN)
    # After CopyFail the server discards until the next Sync (the first one was ignored).
    relay.client(COPY_DATA, COPY_FAIL, SYNC)
    relay.server(ERROR)
    assert not tracker.copy_in
    assert relay.queue_kinds() == "S"
    relay.server(ready())
    relay.assert_done()
    assert plan.seen == "GE"


def test_precise_copy_out_simple_and_extended(relay: Relay) -> None:
    raw, simple_plan = precise_query(relay, b"COPY t TO STDOUT")
    extended_plan = Recorder()
    relay.frontend.on(execute(b"x"), Pending(m.EXECUTE, extended_plan))
    relay.client(raw, parse(b"", b"COPY t TO STDOUT"), bind(b"x"), execute(b"x"), SYNC)
    copy = cat(COPY_OUT, SERVER_COPY_DATA, SERVER_COPY_DATA, SERVER_COPY_DONE, complete(b"COPY 2"))
    relay.server(copy, ready(), PARSE_COMPLETE, BIND_COMPLETE, copy)
    assert relay.queue_kinds() == "S"
    relay.server(ready())
    relay.assert_done()
    assert simple_plan.seen == "HddcCZ"
    assert extended_plan.seen == "HddcC"


def test_precise_function_call(relay: Relay) -> None:
    raw, plan = precise_query(relay)
    relay.client(raw, FUNCTION_CALL, FUNCTION_CALL)
    assert relay.queue_kinds() == "QFF"
    relay.server(complete(b"SELECT 0"), ready(), FUNCTION_RESULT, ready(b"I"), ERROR)
    assert relay.queue_kinds() == "F"
    relay.server(ready())
    relay.assert_done()
    assert plan.seen == "CZ"


def test_precise_asynchronous_messages_belong_to_no_entry(relay: Relay) -> None:
    raw, plan = precise_query(relay)
    relay.client(raw)
    relay.server(NOTIFICATION, PARAMETER_STATUS, ROW_DESCRIPTION, NOTICE)
    assert plan.seen == "T"
    relay.server(complete(b"SELECT 0"), ready())
    relay.assert_done()
    assert bytes(relay.to_client).startswith(cat(NOTIFICATION, PARAMETER_STATUS))


# ---------------------------------------------------------------------------------------------
# Injected and swallowed entries


def test_injected_reply_goes_out_when_its_entry_reaches_the_head(relay: Relay) -> None:
    # The proxy answers a Parse itself; a plain Query is still in flight, so the injected
    # ParseComplete must wait for that Query's ReadyForQuery.
    tracker = relay.tracker
    relay.client(query())
    prepared = parse(b"s1", b"SELECT 1")
    relay.frontend.on(prepared, Pending(m.PARSE, inject=PARSE_COMPLETE), replacement=b"")
    relay.client(prepared, bind(b"", b"s1"), execute(), SYNC)
    assert relay.queue_kinds() == "QPBES"
    assert tracker.injections == 1
    assert relay.to_client == b""
    relay.server(ROW_DESCRIPTION, ROW, complete(b"SELECT 1"), ready(), BIND_COMPLETE)
    assert tracker.injections == 0
    relay.server(ROW, complete(b"SELECT 1"), ready())
    relay.assert_done()
    assert bytes(relay.to_client) == cat(
        ROW_DESCRIPTION, ROW, complete(b"SELECT 1"), ready(),
        PARSE_COMPLETE,
        BIND_COMPLETE, ROW, complete(b"SELECT 1"), ready(),
    )  # fmt: skip
    assert prepared not in relay.upstream


def test_injected_reply_due_at_once_is_sent_by_the_relay(relay: Relay) -> None:
    refused = parse(b"", b"DELETE FROM t")
    error = errors.encode_error_response("0A000", "refused")
    relay.frontend.on(refused, Pending(m.PARSE, inject=error), replacement=b"")
    relay.client(refused, FLUSH)
    assert bytes(relay.to_client) == error
    assert relay.tracker.injections == 0
    assert relay.queue_kinds() == ""
    assert relay.tracker.settle()
    assert not relay.tracker.idle  # the client's batch is not synced yet
    relay.client(SYNC)
    relay.server(ready())
    assert relay.tracker.idle


def test_take_injections_stops_at_the_first_real_entry() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(m.PARSE, inject=b"one"))
    tracker.expect(Pending(m.BIND, inject=b"two"))
    tracker.expect(m.EXECUTE)
    tracker.expect(Pending(m.SYNC, inject=b"three"))
    assert tracker.injections == 3
    assert tracker.take_injections() == b"onetwo"
    assert tracker.injections == 1
    assert tracker.take_injections() == b""
    assert tracker.on_reply(m.COMMAND_COMPLETE, b"") == m.EXECUTE
    assert tracker.take_injections() == b"three"
    assert tracker.settle()


def test_swallowed_replies_never_reach_the_client(relay: Relay) -> None:
    # As the frontend does after refusing a Parse: at Sync it sends a failing statement of
    # its own whose Parse/Bind/Execute replies are dropped; the Sync's ReadyForQuery is not.
    relay.client(query())
    relay.proxy_sends(
        cat(parse(b"", b"DO $$ ... $$"), bind(), execute(), SYNC),
        Pending(m.PARSE, swallow=True),
        Pending(m.BIND, swallow=True),
        Pending(m.EXECUTE, swallow=True),
        m.SYNC,
    )
    relay.client(query(b"SELECT 2"))
    assert relay.queue_kinds() == "QPBESQ"
    relay.server(complete(b"SELECT 0"), ready())
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ERROR, ready(b"I"))
    relay.server(complete(b"SELECT 0"), ready())
    relay.assert_done()
    assert bytes(relay.to_client) == cat(
        complete(b"SELECT 0"), ready(), ready(), complete(b"SELECT 0"), ready()
    )


# ---------------------------------------------------------------------------------------------
# FAST -> PRECISE -> FAST


def test_become_precise_with_cycles_in_flight(relay: Relay) -> None:
    tracker = relay.tracker
    cycle = cat(bind(b"", b"s"), execute(), SYNC)
    relay.client(query(b"SELECT 1"), cycle)
    relay.server(ROW_DESCRIPTION, ROW)  # part of the first cycle's reply has come
    assert (tracker.cycles, tracker.since_ready) == (2, b"T")
    raw, plan = precise_query(relay, b"UPDATE t SET a = 1")
    relay.client(raw)
    assert tracker.precise
    assert relay.queue_kinds() == "QQQ"  # one QUERY entry per cycle in flight, then ours
    assert (tracker.cycles, tracker.open, tracker.since_ready) == (0, b"", b"")
    relay.server(complete(b"SELECT 1"), ready(b"T"))
    relay.server(BIND_COMPLETE, ERROR, ready(b"E"))  # the in-flight cycles, whatever they hold
    assert plan.seen == ""
    relay.server(complete(b"UPDATE 1"), ready(b"E"))
    relay.assert_done(status=b"E")
    assert plan.seen == "CZ"


def test_become_precise_with_replies_to_an_unsynced_batch(relay: Relay) -> None:
    tracker = relay.tracker
    relay.client(parse(), bind(), describe(b"P"), execute(), FLUSH)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, ROW)
    assert (tracker.cycles, tracker.open, tracker.since_ready) == (0, b"PBDE", b"12T")
    plan = Recorder()
    relay.frontend.on(parse(b"s2", b"INSERT"), Pending(m.PARSE, plan))
    relay.client(parse(b"s2", b"INSERT"), bind(b"", b"s2"), execute(), SYNC)
    # The replies that came already are replayed: only the first Execute is still owed.
    assert relay.queue_kinds() == "EPBES"
    relay.server(ROW, complete(b"SELECT 2"))
    assert relay.queue_kinds() == "PBES"
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, complete(b"INSERT 0 1"), ready())
    relay.assert_done()
    assert plan.seen == "1"


def test_become_precise_after_an_error_in_an_unsynced_batch(relay: Relay) -> None:
    tracker = relay.tracker
    relay.client(parse(), bind(), execute(), FLUSH)
    relay.server(PARSE_COMPLETE, ERROR)
    assert tracker.since_ready == b"1E"
    plan = Recorder()
    relay.frontend.on(parse(b"s2", b"INSERT"), Pending(m.PARSE, plan))
    relay.client(parse(b"s2", b"INSERT"), bind(b"", b"s2"), execute(), SYNC)
    # Replaying "1E": the Bind failed, so the server skips all of it up to the Sync.
    assert relay.queue_kinds() == "S"
    relay.server(ready())
    relay.assert_done()
    assert plan.seen == ""


def test_settle_waits_for_everything_owed() -> None:
    tracker = ResponseTracker()
    assert tracker.settle()  # FAST already
    tracker.expect(Pending(m.QUERY, Recorder()))
    assert tracker.precise
    assert not tracker.settle()
    tracker.on_reply(m.COPY_IN_RESPONSE, b"")
    tracker.queue.clear()  # type: ignore[union-attr]
    assert not tracker.settle()  # still in COPY
    assert not tracker.idle
    tracker.copy_in = False
    assert tracker.idle
    assert tracker.settle()
    assert not tracker.precise
    tracker.expect(m.SYNC)  # FAST bookkeeping again
    assert tracker.cycles == 1


def test_reply_with_nothing_owed(relay: Relay) -> None:
    relay.client(query())
    relay.tracker.expect(Pending(m.SYNC, swallow=True))
    relay.server(complete(b"SELECT 0"), ready(), ready())
    assert relay.tracker.unexpected == 0
    assert relay.tracker.queue is None
    # A FATAL ErrorResponse with nothing outstanding (shutdown) is not out of step ...
    relay.tracker.expect(Pending(m.SYNC, swallow=True))
    relay.server(ready(), ERROR)
    assert relay.tracker.unexpected == 0
    # ... anything else is.
    relay.tracker.expect(Pending(m.SYNC, swallow=True))
    relay.server(ready(), complete(b"SELECT 0"))
    assert relay.tracker.unexpected == 1


# ---------------------------------------------------------------------------------------------
# Any moment is a good moment to become precise


def _exchange(*steps: tuple[str, bytes]) -> list[tuple[str, bytes]]:
    return list(steps)


EXCHANGES = {
    "query": _exchange(
        ("c", query()), ("s", cat(ROW_DESCRIPTION, ROW, complete(b"S 1"), ready()))
    ),
    "query error": _exchange(("c", query()), ("s", cat(ROW_DESCRIPTION, ERROR, ready()))),
    "empty query": _exchange(("c", query(b"")), ("s", cat(EMPTY_QUERY, ready()))),
    "async": _exchange(
        ("c", query()),
        ("s", cat(NOTICE, ROW_DESCRIPTION, PARAMETER_STATUS, ROW, complete(b"S"), ready())),
    ),
    "extended": _exchange(
        ("c", cat(parse(), bind(), describe(b"P"), execute(), SYNC)),
        ("s", cat(PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, ROW, complete(b"S 1"), ready())),
    ),
    "describe statement": _exchange(
        ("c", cat(parse(b"s"), describe(b"S", b"s"), close(b"S", b"s"), SYNC)),
        ("s", cat(PARSE_COMPLETE, PARAMETER_DESCRIPTION, NO_DATA, CLOSE_COMPLETE, ready())),
    ),
    "bind error": _exchange(
        ("c", cat(parse(), bind(), execute(), SYNC)), ("s", cat(PARSE_COMPLETE, ERROR, ready()))
    ),
    "flush": _exchange(
        ("c", cat(parse(), bind(), execute(), FLUSH)),
        ("s", cat(PARSE_COMPLETE, BIND_COMPLETE, ROW, complete(b"S 1"))),
        ("c", SYNC),
        ("s", ready()),
    ),
    "flush error": _exchange(
        ("c", cat(parse(), bind(), execute(), FLUSH)),
        ("s", cat(PARSE_COMPLETE, ERROR)),
        ("c", cat(bind(), execute(), SYNC)),
        ("s", ready()),
    ),
    "suspended": _exchange(
        ("c", cat(bind(b"c"), execute(b"c", 1), FLUSH)),
        ("s", cat(BIND_COMPLETE, ROW, SUSPENDED)),
        ("c", cat(execute(b"c"), SYNC)),
        ("s", cat(ROW, complete(b"S 2"), ready())),
    ),
    "copy in": _exchange(
        ("c", query(b"COPY t FROM STDIN")),
        ("s", COPY_IN),
        ("c", cat(COPY_DATA, COPY_DATA, COPY_DONE)),
        ("s", cat(complete(b"COPY 2"), ready())),
    ),
    "copy out extended": _exchange(
        ("c", cat(parse(), bind(), execute(), SYNC)),
        ("s", cat(PARSE_COMPLETE, BIND_COMPLETE, COPY_OUT, SERVER_COPY_DATA, SERVER_COPY_DONE)),
        ("s", cat(complete(b"COPY 1"), ready())),
    ),
    "function": _exchange(("c", FUNCTION_CALL), ("s", cat(FUNCTION_RESULT, ready()))),
    "pipeline": _exchange(
        ("c", cat(bind(), execute(), SYNC, bind(), execute(), SYNC)),
        ("s", cat(BIND_COMPLETE, complete(b"U 1"), ready(), BIND_COMPLETE, ERROR, ready())),
    ),
}


def _events(names: Sequence[str], cuts: Iterable[int]) -> list[tuple[str, bytes]]:
    """The exchanges one after another, server bytes cut into reads at ``cuts``."""
    cut_iter = iter(cuts)
    events: list[tuple[str, bytes]] = []
    for name in names:
        for side, data in EXCHANGES[name]:
            if side == "c":
                events.append((side, data))
                continue
            at = sorted({next(cut_iter, 0) % (len(data) + 1) for _ in range(2)})
            points = [0, *at, len(data)]
            events.extend(("s", data[a:b]) for a, b in itertools.pairwise(points))
    return events


@settings(max_examples=150, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(EXCHANGES)), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=40),
    switch=st.integers(0, 200),
    inline=st.booleans(),
)
def test_becoming_precise_at_any_point_ends_consistent(
    names: list[str], cuts: list[int], switch: int, inline: bool
) -> None:
    # expect(Pending) switches at the moment a rewritten message is sent; calling the switch
    # directly lets it happen anywhere, mid-reply included.
    events = _events(names, cuts)
    relay = Relay(inline=inline)
    switch %= len(events) + 1
    for index, (side, data) in enumerate(events):
        if index == switch:
            relay.tracker._become_precise()
            relay.server_scan.table = rc.SERVER_TABLE_ALL
        if side == "c":
            relay.client(data)
        else:
            relay.server(data)
    assert relay.tracker.settle()
    relay.server_scan.table = rc.SERVER_TABLE
    relay.assert_done()
    assert bytes(relay.to_client) == cat(*(data for side, data in events if side == "s"))


# ---------------------------------------------------------------------------------------------
# COPY IN from the extended protocol, and a known gap


@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
def test_libpq_extended_copy_in_sends_a_sync_the_server_ignores(precise: bool) -> None:
    # libpq's PQexecParams("COPY ... FROM STDIN") sends Parse/Bind/Describe/Execute/Sync; the
    # Sync arrives while the server is in COPY IN, which ignores it (copyfromparse.c: "Ignore
    # Flush/Sync for the convenience of client libraries"); after CopyDone libpq sends another
    # Sync (PQputCopyEnd), which is the one answered. One ReadyForQuery for two Syncs.
    relay = Relay()
    if precise:
        relay.frontend.on(execute(), Pending(m.EXECUTE, Recorder()))
    relay.client(parse(b"", b"COPY t FROM STDIN"), bind(), describe(b"P"), execute(), SYNC)
    assert relay.tracker.precise == precise
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, COPY_IN)
    relay.client(COPY_DATA, COPY_DONE, SYNC)
    relay.server(complete(b"COPY 1"), ready())
    assert relay.tracker.idle
    # and the connection stays in step: the next cycle is accounted normally
    relay.client(query(b"SELECT 1"))
    assert not relay.tracker.idle
    relay.server(complete(b"SELECT 1"), ready())
    assert relay.tracker.idle


def test_simple_query_copy_in_keeps_every_sync() -> None:
    # A COPY started by a simple Query has no BindComplete in its cycle: nothing is ignored.
    relay = Relay()
    relay.client(query(b"COPY t FROM STDIN"))
    relay.server(COPY_IN)
    relay.client(COPY_DATA, COPY_DONE)
    relay.server(complete(b"COPY 1"), ready())
    assert relay.tracker.idle


def test_fast_query_skipped_after_an_extended_error() -> None:
    # The server skips the Query with the rest of the failed batch: one ReadyForQuery for both.
    relay = Relay()
    relay.client(parse(), bind(), execute(), query(b"SELECT 2"), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ERROR, ready())
    assert relay.tracker.idle


def test_fast_query_inside_a_batch_that_succeeds_is_a_cycle_of_its_own() -> None:
    relay = Relay()
    relay.client(parse(), bind(), execute(), query(b"SELECT 2"), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, complete(b"SELECT 1"))
    relay.server(complete(b"SELECT 1"), ready(b"T"), ready())
    assert relay.tracker.idle
    # plain traffic afterwards returns the tracker to FAST mode
    relay.client(query(b"SELECT 3"))
    relay.server(complete(b"SELECT 1"), ready())
    assert relay.tracker.idle
    assert not relay.tracker.precise


def test_fast_query_sent_in_a_later_read_than_its_unsynced_batch() -> None:
    relay = Relay()
    relay.client(parse(), bind(), execute())
    relay.client(query(b"SELECT 2"), SYNC)
    relay.server(PARSE_COMPLETE, BIND_COMPLETE, ERROR, ready())
    assert relay.tracker.idle


def test_fast_reads_of_plain_queries_stay_fast() -> None:
    relay = Relay()
    relay.client(query(b"SELECT 1"), query(b"SELECT 2"))
    assert not relay.tracker.precise
    relay.server(complete(b"SELECT 1"), ready(), complete(b"SELECT 1"), ready())
    assert relay.tracker.idle
