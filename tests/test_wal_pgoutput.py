"""The sans-IO pgoutput decoder: every message kind from hand-built bytes and from a real server,
every proper prefix of a message refused as truncated (fed byte at a time), and the transaction
assembler's bookkeeping."""

from __future__ import annotations

import asyncio
import struct
from datetime import UTC, datetime

import pytest
from support import wait_until

from core.errors import WalDecodeError
from mirror.wal import pgoutput
from mirror.wal import stream as wal_stream
from mirror.wal.keys import record_literal


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(*values: object) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is pgoutput.UNCHANGED_TOAST:
            out += b"u"
        else:
            data = str(value).encode()
            out += b"t" + struct.pack("!i", len(data)) + data
    return out


MICROS = 786_326_400_000_000  # 2024-12-01 00:00 UTC in PostgreSQL's epoch
WHEN = datetime(2024, 12, 1, tzinfo=UTC)

BEGIN = b"B" + struct.pack("!QqI", 0x1_0000_0100, MICROS, 742)
COMMIT = b"C" + struct.pack("!bQQq", 0, 0x1_0000_0100, 0x1_0000_0130, MICROS)
RELATION = (
    b"R" + struct.pack("!I", 16384) + _s("public") + _s("audit_log") + b"d" + struct.pack("!h", 3)
    + b"\x01" + _s("id") + struct.pack("!Ii", 20, -1)
    + b"\x00" + _s("action") + struct.pack("!Ii", 25, -1)
    + b"\x00" + _s("details") + struct.pack("!Ii", 3802, -1)
)
INSERT = b"I" + struct.pack("!I", 16384) + b"N" + _tuple(7, "login", '{"a": "x\\"y"}')
UPDATE_SAME_KEY = (
    b"U" + struct.pack("!I", 16384) + b"N" + _tuple(7, "seen", pgoutput.UNCHANGED_TOAST)
)
UPDATE_NEW_KEY = (
    b"U" + struct.pack("!I", 16384) + b"K" + _tuple(7, None, None) + b"N" + _tuple(8, "moved", None)
)
DELETE = b"D" + struct.pack("!I", 16384) + b"K" + _tuple(8, None, None)
TRUNCATE = b"T" + struct.pack("!ibI", 1, 2, 16384)
MESSAGE = (
    b"M" + struct.pack("!bQ", 1, 0x1_0000_0110) + _s("dualwrite") + struct.pack("!i", 3) + b"abc"
)
ORIGIN = b"O" + struct.pack("!Q", 5) + _s("upstream")
TYPE = b"Y" + struct.pack("!I", 99999) + _s("public") + _s("mood")
ALL = [BEGIN, RELATION, INSERT, UPDATE_SAME_KEY, UPDATE_NEW_KEY, DELETE, TRUNCATE, MESSAGE,
       ORIGIN, TYPE, COMMIT]


def test_each_message_kind_decodes_to_its_fields() -> None:
    assert pgoutput.decode(BEGIN) == pgoutput.Begin(0x1_0000_0100, WHEN, 742)
    assert pgoutput.decode(COMMIT) == pgoutput.Commit(0x1_0000_0100, 0x1_0000_0130, WHEN)
    relation = pgoutput.decode(RELATION)
    assert isinstance(relation, pgoutput.Relation)
    assert (relation.relid, relation.schema, relation.name, relation.replica_identity) == (
        16384, "public", "audit_log", "d"
    )
    assert [(c.name, c.type_oid, c.is_key) for c in relation.columns] == [
        ("id", 20, True), ("action", 25, False), ("details", 3802, False)
    ]
    assert pgoutput.decode(INSERT) == pgoutput.Insert(16384, ("7", "login", '{"a": "x\\"y"}'))
    assert pgoutput.decode(UPDATE_SAME_KEY) == pgoutput.Update(
        16384, None, ("7", "seen", pgoutput.UNCHANGED_TOAST)
    )
    assert pgoutput.decode(UPDATE_NEW_KEY) == pgoutput.Update(
        16384, ("7", None, None), ("8", "moved", None)
    )
    assert pgoutput.decode(DELETE) == pgoutput.Delete(16384, ("8", None, None))
    assert pgoutput.decode(TRUNCATE) == pgoutput.Truncate((16384,), False, True)
    assert pgoutput.decode(MESSAGE) == pgoutput.LogicalMessage(
        True, 0x1_0000_0110, "dualwrite", b"abc"
    )
    assert pgoutput.decode(ORIGIN) == pgoutput.Origin(5, "upstream")
    assert pgoutput.decode(TYPE) == pgoutput.TypeInfo(99999, "public", "mood")


@pytest.mark.parametrize("message", ALL, ids=[m[:1].decode() for m in ALL])
def test_every_prefix_fed_byte_at_a_time_is_refused_as_incomplete(message: bytes) -> None:
    for end in range(len(message)):
        with pytest.raises(WalDecodeError):
            pgoutput.decode(message[:end])
    assert pgoutput.decode(message) is not None


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"Z\x00\x00", "unknown message kind"),
        (INSERT + b"\x00", "left over"),
        (b"I" + struct.pack("!I", 1) + b"X", "expected a new tuple"),
        (b"D" + struct.pack("!I", 1) + b"N" + _tuple(1), "expected 'K' or 'O'"),
        (b"I" + struct.pack("!I", 1) + b"N" + struct.pack("!h", 1) + b"q", "unknown column kind"),
        (b"R" + struct.pack("!I", 1) + b"public", "unterminated string"),
    ],
)
def test_malformed_messages_say_what_is_wrong(data: bytes, says: str) -> None:
    with pytest.raises(WalDecodeError, match=says):
        pgoutput.decode(data)


def test_the_assembler_yields_committed_transactions_with_named_rows() -> None:
    assembler = pgoutput.TransactionAssembler()
    txns = list(assembler.feed_all([pgoutput.decode(m) for m in ALL]))
    assert len(txns) == 1
    txn = txns[0]
    assert (txn.xid, txn.commit_time, txn.end_lsn) == (742, WHEN, 0x1_0000_0130)
    assert [(c.operation, c.new and c.new["id"], c.old and c.old["id"]) for c in txn.changes] == [
        ("insert", "7", None), ("update", "7", None), ("update", "8", "7"), ("delete", None, "8")
    ]
    assert [r.name for r in txn.truncated] == ["audit_log"]
    assert [m.content for m in txn.messages] == [b"abc"]


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        ([BEGIN, INSERT, COMMIT], "before its description"),
        ([RELATION, INSERT], "outside a transaction"),
        ([BEGIN, BEGIN], "inside a transaction"),
    ],
)
def test_the_assembler_refuses_an_impossible_stream(stream: list[bytes], says: str) -> None:
    assembler = pgoutput.TransactionAssembler()
    with pytest.raises(WalDecodeError, match=says):
        list(assembler.feed_all([pgoutput.decode(m) for m in stream]))


def test_a_narrowed_assembler_decodes_only_the_key_columns_and_still_checks_lengths() -> None:
    """What the reader asks for a mapped source: its key columns. The others are stepped over by
    their length, never decoded (bytes that are not UTF-8 pass), yet a value that runs past the
    message's end is still refused."""
    assembler = pgoutput.TransactionAssembler(
        lambda r: frozenset({"id"}) if r.name == "audit_log" else None
    )
    not_utf8 = (
        b"I" + struct.pack("!I", 16384) + b"N" + struct.pack("!h", 3)
        + b"t" + struct.pack("!i", 1) + b"9"
        + b"t" + struct.pack("!i", 2) + b"\xff\xfe"
        + b"n"
    )
    messages = [BEGIN, RELATION, INSERT, not_utf8, UPDATE_NEW_KEY, DELETE, COMMIT]
    (txn,) = assembler.feed_all(pgoutput.decode(m, assembler.masks) for m in messages)
    assert [(c.operation, c.new, c.old) for c in txn.changes] == [
        ("insert", {"id": "7"}, None),
        ("insert", {"id": "9"}, None),
        ("update", {"id": "8"}, {"id": "7"}),
        ("delete", None, {"id": "8"}),
    ]
    assert assembler.masks == {16384: (True, False, False)}
    with pytest.raises(WalDecodeError, match="ends early"):
        pgoutput.decode(not_utf8[:-3], assembler.masks)
    # without a mask the same bytes are decoded, and refused
    with pytest.raises(UnicodeDecodeError):
        pgoutput.decode(not_utf8)


def test_the_fast_path_yields_what_the_general_path_does_and_falls_back_when_unsure() -> None:
    """feed_bytes reads an insert, a same-key update and a delete of a narrowed relation
    straight off the frame (here at an offset, as inside XLogData); the result is the general
    path's. A row cut short within the wanted columns, or a binary value, is not guessed at:
    the general path decodes it and says what is wrong."""
    def narrow(relation: pgoutput.Relation) -> frozenset[str]:
        return frozenset({"id"})

    general = pgoutput.TransactionAssembler(narrow)
    fast = pgoutput.TransactionAssembler(narrow)
    (expected,) = general.feed_all(pgoutput.decode(m, general.masks) for m in ALL)
    got = [fast.feed_bytes(b"w" * 25 + m, 25) for m in ALL]
    assert got[:-1] == [None] * (len(ALL) - 1)
    assert got[-1] == expected
    assert [(c.operation, c.new, c.old) for c in expected.changes] == [
        ("insert", {"id": "7"}, None),
        ("update", {"id": "7"}, None),
        ("update", {"id": "8"}, {"id": "7"}),
        ("delete", None, {"id": "8"}),
    ]
    fast.feed_bytes(BEGIN)
    cut = b"I" + struct.pack("!I", 16384) + b"N" + struct.pack("!h", 3) + b"t" + struct.pack(
        "!i", 5
    ) + b"12"
    with pytest.raises(WalDecodeError, match="ends early"):
        fast.feed_bytes(cut)
    binary = b"I" + struct.pack("!I", 16384) + b"N" + struct.pack("!h", 3) + b"b" + struct.pack(
        "!i", 1
    ) + b"7" + b"nn"
    fast.feed_bytes(binary)
    assert fast.feed_bytes(COMMIT).changes[0].new == {"id": b"7"}


def test_lsn_text_round_trips() -> None:
    assert pgoutput.format_lsn(0x1_0000_0130) == "1/130"
    assert pgoutput.parse_lsn("1/130") == 0x1_0000_0130


def test_record_literals_quote_everything_and_leave_absent_values_null() -> None:
    row = {"id": "7", "action": 'say "hi" \\ bye', "details": None, "x": pgoutput.UNCHANGED_TOAST}
    assert record_literal(["id", "action", "details", "x", "gone"], row) == (
        '("7","say \\"hi\\" \\\\ bye",,,)'
    )


def test_messages_from_a_real_server_decode(logical_db) -> None:
    """What PostgreSQL itself sends for every kind the reader handles, decoded and assembled."""
    db = logical_db
    db.sql(
        "CREATE TABLE t (id int PRIMARY KEY, name text, doc jsonb, big text);"
        "CREATE PUBLICATION p FOR TABLE t;"
    )
    db.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", db.name)
    db.sql(
        "INSERT INTO t VALUES (1, 'a,b\"c', '{\"k\": [1, 2]}', "
        "  (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 4000) AS i));"
        "UPDATE t SET name = NULL WHERE id = 1;"
        "UPDATE t SET id = 2 WHERE id = 1;"
        "DELETE FROM t;"
        "TRUNCATE t;"
    )
    rows = db.sql(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', 'p')",
        db.name,
    )
    assembler = pgoutput.TransactionAssembler()
    txns = list(assembler.feed_all(pgoutput.decode(bytes(r[0])) for r in rows))
    changes = [c for t in txns for c in t.changes]
    assert [c.operation for c in changes] == ["insert", "update", "update", "delete"]
    assert changes[0].new is not None
    assert changes[0].new["name"] == 'a,b"c'
    assert changes[0].new["doc"] == '{"k": [1, 2]}'
    assert changes[1].new is not None
    assert changes[1].new["big"] is pgoutput.UNCHANGED_TOAST  # not sent: it did not change
    assert changes[2].old == {"id": "1", "name": None, "doc": None, "big": None}
    assert changes[3].old == {"id": "2", "name": None, "doc": None, "big": None}
    assert [r.name for t in txns for r in t.truncated] == ["t"]
    assert all(t.end_lsn > t.commit_lsn > 0 for t in txns)
    db.sql("SELECT pg_drop_replication_slot(%s)", db.name)


# --- the streaming transport's frames (mirror/wal/stream.py) ---------------------------------


def test_replication_frames_parse_and_build() -> None:
    keepalive = b"k" + struct.pack("!QqB", 0x1_0000_0130, MICROS, 1)
    assert wal_stream.parse_keepalive(keepalive) == wal_stream.Keepalive(0x1_0000_0130, True)
    assert not wal_stream.parse_keepalive(keepalive[:-1] + b"\0").reply_requested
    with pytest.raises(WalDecodeError, match="keepalive of 17 bytes"):
        wal_stream.parse_keepalive(keepalive[:-1])
    xlog = b"w" + struct.pack("!QQq", 0x1_0000_0100, 0x1_0000_0100, MICROS) + COMMIT
    assert wal_stream.xlogdata_start(xlog) == 0x1_0000_0100
    assert pgoutput.decode(xlog[wal_stream.XLOGDATA_PAYLOAD :]).end_lsn == 0x1_0000_0130
    with pytest.raises(WalDecodeError, match="XLogData frame of 3 bytes"):
        wal_stream.xlogdata_start(xlog[:3])
    status = wal_stream.status_update(0x1_0000_0130, reply=True, now=WHEN.timestamp())
    assert status == b"r" + struct.pack("!QQQqB", *[0x1_0000_0130] * 3, MICROS, 1)


def test_start_replication_quotes_what_it_names() -> None:
    assert wal_stream.start_command("s1", ["a", "b_outbox"]) == (
        b"START_REPLICATION SLOT \"s1\" LOGICAL 0/0 (proto_version '1', "
        b"publication_names 'a,b_outbox')"
    )
    info = wal_stream.replication_conninfo("postgresql://svc@db.example:5433/pos?sslmode=require")
    assert "replication=database" in info
    assert "sslmode=require" in info
    assert "host=db.example" in info


def test_a_real_stream_sends_each_commit_once_and_keeps_a_confirmed_position(logical_db) -> None:
    """START_REPLICATION over libpq: the commits arrive decoded, a status update moves the
    slot's confirmed position, and a new stream starts there (nothing sent twice)."""
    db = logical_db
    db.sql("CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION p FOR TABLE t;")
    db.sql("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", db.name)

    async def read_commits(want: int) -> list[pgoutput.Transaction]:
        stream = await wal_stream.ReplicationStream.start(db.dsn, db.name, ["p"])
        try:
            assembler = pgoutput.TransactionAssembler()
            txns: list[pgoutput.Transaction] = []
            while len(txns) < want:
                frame = await stream.read(10)
                assert frame is not None, "the stream went quiet"
                if frame[0] == ord("w"):
                    message = pgoutput.decode(bytes(frame[wal_stream.XLOGDATA_PAYLOAD :]))
                    txn = assembler.feed(message)
                    if txn is not None:
                        txns.append(txn)
            await stream.confirm(txns[-1].end_lsn)
            # nothing else is pending: the next frame is a keepalive, never a repeat
            frame = await stream.read(1)
            assert frame is None or frame[0] == ord("k")
            return txns
        finally:
            await stream.close()

    db.sql("INSERT INTO t VALUES (1)")
    db.sql("INSERT INTO t VALUES (2)")
    first = asyncio.run(read_commits(2))
    assert [c.new for t in first for c in t.changes] == [{"id": "1"}, {"id": "2"}]
    confirmed = wait_until(
        lambda: db.scalar(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
            "WHERE slot_name = %s AND active_pid IS NULL",
            db.name,
        ),
        what="the slot to be released",
    )
    assert pgoutput.parse_lsn(confirmed) == first[-1].end_lsn
    db.sql("INSERT INTO t VALUES (3)")
    again = asyncio.run(read_commits(1))
    assert [c.new for t in again for c in t.changes] == [{"id": "3"}]
    # one walsender per slot: a second stream is refused, with the server's reason and state

    async def second_stream() -> None:
        holder = await wal_stream.ReplicationStream.start(db.dsn, db.name, ["p"])
        try:
            with pytest.raises(wal_stream.StreamError, match="is active for PID") as refused:
                await wal_stream.ReplicationStream.start(db.dsn, db.name, ["p"])
            assert refused.value.sqlstate == "55006"
        finally:
            await holder.close()

    asyncio.run(second_stream())
