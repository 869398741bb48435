"""Per-connection protocol state, learnt from the server's replies: what each sent message still
expects back, and the transaction status from ReadyForQuery.

This is what response repair stands on: a rewritten statement's reply is recognised because
its entry is at the head of the queue when the reply arrives. No I/O here.

Two modes, because most traffic needs no repair and the relay must stay close to pgbouncer:

FAST      no reply needs the proxy's attention. The tracker counts *cycles* (Sync, Query and
          FunctionCall messages sent whose ReadyForQuery has not come back) and keeps the few
          bytes needed to become precise at any moment: the types of messages sent since the
          last cycle end, and of replies received since the last ReadyForQuery. Each socket
          read costs O(1) Python operations.
PRECISE   some entry carries a repair plan, an injected reply, or a swallowed reply. Every
          reply is matched against a queue of entries, one per message. Cycles that were in
          flight when the tracker became precise are represented by a QUERY entry each, which
          consumes everything up to its ReadyForQuery. When the queue empties the tracker
          returns to FAST.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Protocol

from proxy.wire import messages as m

#: messages whose reply ends with ReadyForQuery
CYCLE_END: Final = frozenset({m.QUERY, m.SYNC, m.FUNCTION_CALL})
#: messages that are a cycle of their own (unlike Sync, which ends a batch of others)
SIMPLE_CYCLE: Final = frozenset({m.QUERY, m.FUNCTION_CALL})
#: replies that may arrive at any time and never answer a particular message
ASYNCHRONOUS: Final = frozenset({m.NOTICE_RESPONSE, m.NOTIFICATION_RESPONSE, m.PARAMETER_STATUS})
#: messages that end an extended-protocol Execute
EXECUTE_END: Final = frozenset({m.COMMAND_COMPLETE, m.EMPTY_QUERY_RESPONSE, m.PORTAL_SUSPENDED})
#: reply -> the message it completes, when it is the only reply that message gets
SINGLE_REPLY: Final = {
    m.PARSE_COMPLETE: m.PARSE,
    m.BIND_COMPLETE: m.BIND,
    m.CLOSE_COMPLETE: m.CLOSE,
}


class ResponsePlan(Protocol):
    """How to change the reply to one client message (implemented by the rewrite layer).

    ``on_reply`` gets each backend frame answering the message (type and body) and returns
    the bytes to send the client instead: the original frame, a changed one, or b"" to drop it.
    """

    def on_reply(self, typ: int, body: bytes, raw: bytes) -> bytes: ...


class WholeReply(Protocol):
    """A Sync entry's shortcut (see :class:`Pending`): given a read holding a reply's first
    frame at ``start`` and complete frames up to ``ready``, the bytes for the client and the
    offset just past the ReadyForQuery; None when the read is not the expected reply (then
    each frame goes through the entry's plan)."""

    def __call__(self, buf: bytes, start: int, ready: int) -> tuple[bytes, int] | None: ...


class Pending:
    """One client message waiting for a reply the proxy must act on."""

    __slots__ = ("inject", "kind", "plan", "swallow", "whole")

    def __init__(
        self,
        kind: int,
        plan: ResponsePlan | None = None,
        *,
        inject: bytes | None = None,
        swallow: bool = False,
        whole: WholeReply | None = None,
    ) -> None:
        self.kind = kind
        #: for a Sync entry that stands for a whole batch: the whole reply, up to and with its
        #: ReadyForQuery, answered at once when it is the usual one (plan: the same answer,
        #: frame by frame)
        self.whole = whole
        #: repair to apply to the reply, if the statement was rewritten
        self.plan = plan
        #: bytes the proxy answers with itself when this entry reaches the head of the queue
        self.inject = inject
        #: the message was injected by the proxy; its reply goes nowhere
        self.swallow = swallow

    def __repr__(self) -> str:
        return (
            f"Pending({chr(self.kind)!r}, plan={self.plan is not None}, "
            f"inject={self.inject is not None}, swallow={self.swallow})"
        )


def kind_of(entry: int | Pending) -> int:
    """The client message type an entry answers."""
    return entry if type(entry) is int else entry.kind  # type: ignore[union-attr]


class ResponseTracker:
    """What the server still owes this connection, and the transaction status."""

    __slots__ = (
        "copy_in",
        "cycles",
        "injections",
        "open",
        "queue",
        "since_ready",
        "skipping",
        "status",
        "unexpected",
        "unsynced",
    )

    def __init__(self) -> None:
        #: b"I" idle, b"T" in a transaction block, b"E" in a failed one
        self.status = b"I"
        # FAST mode
        self.cycles = 0
        self.open = b""
        self.since_ready = b""
        # PRECISE mode: None while FAST
        self.queue: deque[int | Pending] | None = None
        #: the server is waiting for CopyData from the client (PRECISE mode only)
        self.copy_in = False
        #: an extended-protocol error emptied the queue before any Sync: the server ignores
        #: every message up to the next Sync, including ones not sent yet (PRECISE mode only)
        self.skipping = False
        #: the last message sent was not a Sync, Query or FunctionCall: the server is inside an
        #: extended-protocol batch (an implicit transaction) even once every reply has come.
        #: FAST mode has ``open`` for that, except for a batch begun while PRECISE.
        self.unsynced = False
        #: entries in the queue that the proxy answers itself
        self.injections = 0
        #: replies that matched no pending message (a bug or a protocol we do not model)
        self.unexpected = 0

    # --- state -------------------------------------------------------------------------

    @property
    def precise(self) -> bool:
        return self.queue is not None

    @property
    def idle(self) -> bool:
        """Nothing in flight and no open transaction: the connection can be closed cleanly."""
        if self.status != b"I":
            return False
        if self.queue is None:
            return self.cycles == 0 and not self.open and not self.unsynced
        return not self.queue and not self.copy_in and not self.unsynced

    def status_at_rest(self) -> bytes | None:
        """The transaction status when nothing is in flight and no extended-protocol batch is
        open (the proxy may then send a Sync-terminated batch of its own without changing what
        the client's messages mean), else None."""
        if self.unsynced or self.skipping or self.copy_in:
            return None
        if self.queue is None:
            if self.cycles or self.open:
                return None
        elif self.queue:
            return None
        return self.status

    @property
    def synced(self) -> bool:
        """The last message sent ended a cycle: a batch of the proxy's own, ended by its own
        Sync, may follow it (replies to earlier messages may still be owed)."""
        if self.unsynced or self.skipping or self.copy_in:
            return False
        return self.queue is not None or not self.open

    # --- client side -------------------------------------------------------------------

    def sent(self, kinds: bytes, ends: int, after_last_end: int) -> None:
        """Record a run of plain messages (type bytes) sent to the server.

        ``ends`` is how many of them end a cycle and ``after_last_end`` the index just past
        the last one (both as reported by the frame scanner).
        """
        # (a run of nothing but cycle ends after a cycle end cannot hide a Query in a batch)
        if (
            self.queue is None
            and ends
            and (self.open or len(kinds) > ends)
            and self._query_inside_batch(kinds)
        ):
            self._become_precise()
        if self.queue is not None:
            if self.skipping:
                kinds = self._skip_until_sync(kinds)
            if kinds:
                self.unsynced = kinds[-1] not in CYCLE_END
            self.queue.extend(kinds)
        elif ends:
            self.cycles += ends
            self.open = kinds[after_last_end:]
            self.unsynced = False
        else:
            self.open += kinds

    def expect(self, entry: int | Pending) -> None:
        """Record one message sent; a Pending entry makes the tracker precise."""
        if type(entry) is int:
            if self.queue is None and self.open and entry in SIMPLE_CYCLE:
                self._become_precise()
            if self.queue is not None:
                if not self.skipping or self._skip_until_sync(bytes((entry,))):
                    self.queue.append(entry)
                    self.unsynced = entry not in CYCLE_END
            elif entry in CYCLE_END:
                self.cycles += 1
                self.open = b""
                self.unsynced = False
            else:
                self.open += bytes((entry,))
            return
        assert isinstance(entry, Pending)
        if self.queue is None:
            self._become_precise()
        assert self.queue is not None
        if self.skipping and not self._skip_until_sync(bytes((entry.kind,))):
            return  # the server will ignore the message: nothing to answer or repair
        if entry.inject is not None:
            self.injections += 1
        self.queue.append(entry)
        self.unsynced = entry.kind not in CYCLE_END

    def _query_inside_batch(self, kinds: bytes) -> bool:
        """FAST mode: does this run send a Query or FunctionCall before an unsynced batch ends?

        Such a message ends a cycle of its own, unless an earlier message of the batch fails:
        then the server skips it with the rest up to the Sync, and one ReadyForQuery answers
        both. FAST mode cannot tell which will happen, so the caller becomes precise. Clients
        do not mix the protocols like this in practice; the checks are two C scans for a read
        of simple Queries and one for a read of extended messages.
        """
        if m.QUERY not in kinds and m.FUNCTION_CALL not in kinds:
            return False
        if not self.open and kinds.count(m.QUERY) + kinds.count(m.FUNCTION_CALL) == len(kinds):
            return False
        previous = self.open[-1:] or b"S"
        for typ in kinds:
            if typ in SIMPLE_CYCLE and previous[0] not in CYCLE_END:
                return True
            previous = bytes((typ,))
        return False

    def _skip_until_sync(self, kinds: bytes) -> bytes:
        """Drop the messages the server ignores while skipping; a Sync ends the skip."""
        at = kinds.find(m.SYNC)
        if at < 0:
            return b""
        self.skipping = False
        return kinds[at:]

    def _become_precise(self) -> None:
        """Build the exact queue from FAST mode's counts."""
        queue: deque[int | Pending] = deque()
        self.queue = queue
        self.copy_in = False
        self.skipping = False
        self.unsynced = self.unsynced or bool(self.open)
        if self.cycles:
            # Replies since the last ReadyForQuery belong to the oldest cycle in flight;
            # a QUERY entry per cycle consumes everything up to its ReadyForQuery.
            queue.extend([m.QUERY] * self.cycles)
            queue.extend(self.open)
        else:
            queue.extend(self.open)
            for typ in self.since_ready:
                self.on_reply(typ, b"")
        self.cycles = 0
        self.open = b""
        self.since_ready = b""

    def settle(self) -> bool:
        """Return to FAST mode if nothing is owed any more; True when the tracker is FAST."""
        if self.queue is None:
            return True
        if self.queue or self.copy_in or self.skipping:
            return False
        self.queue = None
        return True

    # --- server side -------------------------------------------------------------------

    def received(
        self, buf: bytes, kinds: bytes, starts: list[int], readies: int, after_last_ready: int
    ) -> None:
        """FAST mode: account a run of replies; ``readies`` of them are ReadyForQuery."""
        if m.COPY_IN_RESPONSE in kinds:
            self._copy_in_started(kinds)
        if not readies:
            self.since_ready += kinds
            return
        self.cycles -= readies
        if self.cycles < 0:
            self.unexpected -= self.cycles
            self.cycles = 0
        last = starts[after_last_ready - 1]
        self.status = buf[last + 5 : last + 6]
        self.since_ready = kinds[after_last_ready:]

    def _copy_in_started(self, kinds: bytes) -> None:
        """FAST mode: COPY FROM STDIN began; a Sync sent after its Execute will be ignored.

        The server ignores Sync and Flush while in COPY IN, and libpq sends a Sync right after
        Execute. An Execute's COPY is recognised by the BindComplete earlier in its cycle (a
        simple Query has none); its cycle is the oldest in flight, so its Sync, if sent, is
        the first one counted.
        """
        at = kinds.index(m.COPY_IN_RESPONSE)
        last_ready = kinds.rfind(m.READY_FOR_QUERY, 0, at)
        cycle = kinds[last_ready + 1 : at] if last_ready >= 0 else self.since_ready + kinds[:at]
        if m.BIND_COMPLETE in cycle and self.cycles > 0:
            self.cycles -= 1

    def _forget_sync_sent_during_copy(self) -> None:
        """PRECISE mode: the Sync queued after a COPY's Execute will be ignored by the server."""
        queue = self.queue
        assert queue is not None
        for index in range(1, len(queue)):
            if kind_of(queue[index]) == m.SYNC:
                del queue[index]
                return

    def take_injections(self) -> bytes:
        """Pop leading entries the proxy answers itself; return what to send for them."""
        out = b""
        queue = self.queue
        while queue:
            head = queue[0]
            if type(head) is not Pending or head.inject is None:
                break
            out += head.inject
            queue.popleft()
            self.injections -= 1
        return out

    def on_reply(self, typ: int, body: bytes) -> int | Pending | None:
        """PRECISE mode: account one reply; return the entry it belongs to (None: asynchronous).

        ``body`` is only looked at for ReadyForQuery. The returned entry may already have
        been popped (a reply that completes it), which is why it is returned.
        """
        if typ in ASYNCHRONOUS:
            return None
        queue = self.queue
        assert queue is not None
        if not queue:
            # An ErrorResponse with no request outstanding is a FATAL the server sends on
            # shutdown or termination; anything else is out of step.
            if typ != m.ERROR_RESPONSE:
                self.unexpected += 1
            return None
        head = queue[0]
        kind = kind_of(head)
        if typ == m.READY_FOR_QUERY:
            self.status = body[:1] or b"I"
            self.copy_in = False
            return self._pop_through_cycle_end()
        if typ == m.ERROR_RESPONSE:
            self.copy_in = False
            if kind not in CYCLE_END:
                # After an error in an extended-protocol message the server skips everything
                # up to the next Sync, Query and FunctionCall messages included.
                return self._pop_until_sync()
            return head
        if typ == m.COPY_IN_RESPONSE or typ == m.COPY_BOTH_RESPONSE:
            self.copy_in = True
            if kind == m.EXECUTE and typ == m.COPY_IN_RESPONSE:
                self._forget_sync_sent_during_copy()
            return head
        if kind in CYCLE_END:
            return head
        if kind == m.EXECUTE:
            if typ in EXECUTE_END:
                self.copy_in = False
                return queue.popleft()
            return head
        if kind == m.DESCRIBE:
            if typ == m.PARAMETER_DESCRIPTION:
                return head
            if typ == m.ROW_DESCRIPTION or typ == m.NO_DATA:
                return queue.popleft()
        elif SINGLE_REPLY.get(typ) == kind:
            return queue.popleft()
        self.unexpected += 1
        return head

    def _pop_until_sync(self) -> int | Pending:
        queue = self.queue
        assert queue is not None
        first = queue[0]
        while queue and kind_of(queue[0]) != m.SYNC:
            self._discard(queue.popleft())
        if not queue:
            self.skipping = True
        return first

    def _pop_through_cycle_end(self) -> int | Pending | None:
        queue = self.queue
        assert queue is not None
        while queue:
            entry = queue.popleft()
            if kind_of(entry) in CYCLE_END:
                return entry
            self.unexpected += 1
            self._discard(entry)
        return None

    def _discard(self, entry: int | Pending) -> None:
        if type(entry) is Pending and entry.inject is not None:
            self.injections -= 1
