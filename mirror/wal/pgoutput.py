"""A sans-IO decoder of PostgreSQL's ``pgoutput`` logical-decoding messages (protocol version 1).

Bytes in, values out: no sockets, no asyncio, no database. The reader hands it each message's
bytes (one row of ``pg_logical_slot_peek_binary_changes``; a streaming client would hand it
the payload of each XLogData frame, which is the same message) and feeds the decoded messages
to a :class:`TransactionAssembler`, which keeps the relations PostgreSQL described and yields
one :class:`Transaction` per commit.

Only what the WAL reader needs is decoded into fields; everything else in a message is
skipped by its length rules, and a message that ends early or has an unknown kind raises
:class:`~core.errors.WalDecodeError` (never a half-decoded value). Message layouts: the
"Logical Replication Message Formats" chapter of the PostgreSQL documentation.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from core.errors import WalDecodeError

#: PostgreSQL timestamps count microseconds from 2000-01-01 00:00 UTC
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

_INT8 = struct.Struct("!b")
_UINT8 = struct.Struct("!B")
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_INT64 = struct.Struct("!q")
_UINT64 = struct.Struct("!Q")

#: a column value that did not change and was not sent (a TOASTed value of an UPDATE)
UNCHANGED_TOAST = object()


def format_lsn(lsn: int) -> str:
    """``0/16B3748``: how PostgreSQL prints a pg_lsn."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def pg_timestamp(micros: int) -> datetime:
    return PG_EPOCH + timedelta(microseconds=micros)


# --- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    commit_lsn: int
    #: the end of the commit record: where a consumer that finished this transaction confirms
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    #: part of the replica identity (what a DELETE's old row carries)
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    relid: int
    schema: str
    name: str
    #: d (default: primary key), n (nothing), f (full), i (index)
    replica_identity: str
    columns: tuple[Column, ...]


#: one row's values by column position: text, None (NULL) or UNCHANGED_TOAST
Tuple = tuple[object, ...]
#: per relation, which column positions to decode (the others are skipped by their length and
#: come out as None): see :class:`TransactionAssembler`'s ``narrow``
Masks = dict[int, tuple[bool, ...]]


@dataclass(frozen=True, slots=True)
class Insert:
    relid: int
    new: Tuple


@dataclass(frozen=True, slots=True)
class Update:
    relid: int
    #: the old row's replica identity ('K') or whole old row ('O'); None when the identity
    #: columns did not change (then the new row has the same key)
    old: Tuple | None
    new: Tuple


@dataclass(frozen=True, slots=True)
class Delete:
    relid: int
    old: Tuple


@dataclass(frozen=True, slots=True)
class Truncate:
    relids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(frozen=True, slots=True)
class Origin:
    lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


Message = (
    Begin | Commit | Relation | Insert | Update | Delete | Truncate | LogicalMessage | Origin
    | TypeInfo
)


class _Cursor:
    """Reads big-endian fields off one message; any read past the end is a WalDecodeError."""

    __slots__ = ("data", "masks", "pos")

    def __init__(self, data: bytes, masks: Masks | None = None) -> None:
        self.data = data
        self.pos = 0
        self.masks = masks

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise WalDecodeError(
                f"pgoutput message {self.data[:1]!r} ends early: needs {end} bytes, has "
                f"{len(self.data)}"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> int:
        value: int = fmt.unpack(self.take(fmt.size))[0]
        return value

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise WalDecodeError(f"pgoutput message {self.data[:1]!r}: unterminated string")
        text = self.data[self.pos : end].decode("utf-8")
        self.pos = end + 1
        return text

    def done(self) -> None:
        if self.pos != len(self.data):
            raise WalDecodeError(
                f"pgoutput message {self.data[:1]!r}: {len(self.data) - self.pos} bytes left over"
            )


def _ends_early(data: bytes) -> WalDecodeError:
    return WalDecodeError(f"pgoutput message {data[:1]!r} ends early inside a tuple")


def _tuple(cur: _Cursor, mask: tuple[bool, ...] | None = None) -> Tuple:
    """TupleData. The reader's hot loop (one call per changed row): fields are read with
    ``unpack_from`` on the whole message, bounds checked inline, no method call per field.
    A column whose ``mask`` entry is False is stepped over by its length: None, no object."""
    data, pos, end = cur.data, cur.pos, len(cur.data)
    if pos + 2 > end:
        raise _ends_early(data)
    (count,) = _INT16.unpack_from(data, pos)
    pos += 2
    values: list[object] = []
    append = values.append
    if mask is not None and len(mask) != count:
        mask = None  # the relation changed under us: decode everything, _named complains
    for i in range(count):
        if pos >= end:
            raise _ends_early(data)
        kind = data[pos]
        pos += 1
        if kind == 0x6E:  # n: NULL
            append(None)
            continue
        if kind == 0x75:  # u: unchanged TOAST
            append(UNCHANGED_TOAST)
            continue
        if kind not in (0x74, 0x62):  # t: text, b: binary
            raise WalDecodeError(f"pgoutput tuple: unknown column kind {bytes([kind])!r}")
        if pos + 4 > end:
            raise _ends_early(data)
        (length,) = _INT32.unpack_from(data, pos)
        pos += 4
        if length < 0 or pos + length > end:
            raise _ends_early(data)
        if mask is not None and not mask[i]:
            append(None)
            pos += length
            continue
        value = data[pos : pos + length]
        append(value.decode("utf-8") if kind == 0x74 else value)
        pos += length
    cur.pos = pos
    return tuple(values)


def _begin(cur: _Cursor) -> Begin:
    final_lsn = cur.unpack(_UINT64)
    commit_time = pg_timestamp(cur.unpack(_INT64))
    return Begin(final_lsn, commit_time, cur.unpack(_UINT32))


def _commit(cur: _Cursor) -> Commit:
    cur.unpack(_INT8)  # flags, unused
    commit_lsn = cur.unpack(_UINT64)
    end_lsn = cur.unpack(_UINT64)
    return Commit(commit_lsn, end_lsn, pg_timestamp(cur.unpack(_INT64)))


def _relation(cur: _Cursor) -> Relation:
    relid = cur.unpack(_UINT32)
    schema, name = cur.string(), cur.string()
    identity = chr(cur.unpack(_UINT8))
    columns = []
    for _ in range(cur.unpack(_INT16)):
        flags = cur.unpack(_INT8)
        column_name = cur.string()
        type_oid = cur.unpack(_UINT32)
        cur.unpack(_INT32)  # typmod
        columns.append(Column(column_name, type_oid, bool(flags & 1)))
    return Relation(relid, schema, name, identity, tuple(columns))


def _mask(cur: _Cursor, relid: int) -> tuple[bool, ...] | None:
    return None if cur.masks is None else cur.masks.get(relid)


def _insert(cur: _Cursor) -> Insert:
    relid = cur.unpack(_UINT32)
    if cur.take(1) != b"N":
        raise WalDecodeError("pgoutput insert: expected a new tuple ('N')")
    return Insert(relid, _tuple(cur, _mask(cur, relid)))


def _update(cur: _Cursor) -> Update:
    relid = cur.unpack(_UINT32)
    kind = cur.take(1)
    old = None
    mask = _mask(cur, relid)
    if kind in (b"K", b"O"):
        old = _tuple(cur, mask)
        kind = cur.take(1)
    if kind != b"N":
        raise WalDecodeError(f"pgoutput update: expected 'K', 'O' or 'N', got {kind!r}")
    return Update(relid, old, _tuple(cur, mask))


def _delete(cur: _Cursor) -> Delete:
    relid = cur.unpack(_UINT32)
    kind = cur.take(1)
    if kind not in (b"K", b"O"):
        raise WalDecodeError(f"pgoutput delete: expected 'K' or 'O', got {kind!r}")
    return Delete(relid, _tuple(cur, _mask(cur, relid)))


def _truncate(cur: _Cursor) -> Truncate:
    count = cur.unpack(_INT32)
    options = cur.unpack(_INT8)
    relids = tuple(cur.unpack(_UINT32) for _ in range(count))
    return Truncate(relids, bool(options & 1), bool(options & 2))


def _message(cur: _Cursor) -> LogicalMessage:
    flags = cur.unpack(_INT8)
    lsn = cur.unpack(_UINT64)
    prefix = cur.string()
    content = cur.take(cur.unpack(_INT32))
    return LogicalMessage(bool(flags & 1), lsn, prefix, content)


def _origin(cur: _Cursor) -> Origin:
    lsn = cur.unpack(_UINT64)
    return Origin(lsn, cur.string())


def _type(cur: _Cursor) -> TypeInfo:
    oid = cur.unpack(_UINT32)
    return TypeInfo(oid, cur.string(), cur.string())


_DECODERS: dict[bytes, Callable[[_Cursor], Message]] = {
    b"B": _begin,
    b"C": _commit,
    b"R": _relation,
    b"I": _insert,
    b"U": _update,
    b"D": _delete,
    b"T": _truncate,
    b"M": _message,
    b"O": _origin,
    b"Y": _type,
}


def decode(data: bytes, masks: Masks | None = None) -> Message:
    """One pgoutput message (protocol version 1, text values) from its bytes; a row of a
    relation in ``masks`` has only the masked-in columns decoded."""
    decoder = _DECODERS.get(data[:1])
    if decoder is None:
        raise WalDecodeError(f"pgoutput: unknown message kind {data[:1]!r}")
    cur = _Cursor(data, masks)
    cur.pos = 1
    message: Message = decoder(cur)
    cur.done()
    return message


# --- transactions ----------------------------------------------------------------------------


@dataclass(slots=True)
class Change:
    """One committed row change of one relation, its values by column name."""

    operation: str  # insert, update, delete
    relation: Relation
    #: the new row (insert, update) or None (delete)
    new: dict[str, object] | None
    #: the old row's identity or whole row (delete; update when the identity changed)
    old: dict[str, object] | None


@dataclass(slots=True)
class Transaction:
    xid: int
    commit_time: datetime
    commit_lsn: int
    end_lsn: int
    changes: list[Change] = field(default_factory=list)
    #: relations truncated in this transaction
    truncated: list[Relation] = field(default_factory=list)
    messages: list[LogicalMessage] = field(default_factory=list)


class TransactionAssembler:
    """Turns a stream of decoded messages into committed transactions.

    It remembers every Relation message (PostgreSQL sends one before the first change of a
    relation in a session, and again after the relation changes), so it must see the stream
    from the start of a decoding session: one assembler per poll or per replication connection.

    ``narrow`` names, per relation, the only columns its consumer reads (None: all of them).
    The assembler keeps the matching :data:`Masks` in ``masks``, for :func:`decode` to skip
    the other columns' values, and a change of such a relation carries only those columns.
    """

    def __init__(
        self, narrow: Callable[[Relation], frozenset[str] | None] | None = None
    ) -> None:
        self.relations: dict[int, Relation] = {}
        self._open: Transaction | None = None
        self._narrow = narrow
        self.masks: Masks = {}
        #: per relation: the column names of a change's row dict (None where not kept)
        self._names: dict[int, list[str | None]] = {}
        #: per narrowed relation: (relation, wanted names by position, last wanted + 1)
        self._plans: dict[int, tuple[Relation, tuple[str | None, ...], int]] = {}

    @property
    def in_transaction(self) -> bool:
        """A Begin was fed and its Commit not yet."""
        return self._open is not None

    def feed(self, message: Message) -> Transaction | None:
        """Take one message; return the transaction it commits, if it is a Commit."""
        if isinstance(message, Relation):
            self._describe(message)
            return None
        if isinstance(message, Begin):
            if self._open is not None:
                raise WalDecodeError(f"pgoutput: Begin of xid {message.xid} inside a transaction")
            self._open = Transaction(message.xid, message.commit_time, message.final_lsn, 0)
            return None
        if isinstance(message, (TypeInfo, Origin)):
            return None
        txn = self._open
        if isinstance(message, LogicalMessage) and not message.transactional:
            return None
        if txn is None:
            raise WalDecodeError(f"pgoutput: {type(message).__name__} outside a transaction")
        if isinstance(message, Commit):
            self._open = None
            txn.end_lsn = message.end_lsn
            txn.commit_lsn = message.commit_lsn
            return txn
        if isinstance(message, LogicalMessage):
            txn.messages.append(message)
        elif isinstance(message, Truncate):
            txn.truncated.extend(self._relation(relid) for relid in message.relids)
        else:
            txn.changes.append(self._change(message))
        return None

    def feed_bytes(self, data: bytes | memoryview, start: int = 0) -> Transaction | None:
        """``feed(decode(data[start:], self.masks))``, with a fast path for what a backlog is
        made of: an insert, an update that kept its key, or a delete of a narrowed relation.

        There the row is read straight off the frame up to its last wanted column: no message
        object, no values past that column. The rest of the message is not walked, so it is
        not checked either (PostgreSQL frames each message by its length). Anything else, or
        anything unexpected on the way, takes the general path, which validates everything.
        """
        kind = data[start]
        txn = self._open
        if kind in _FAST_KINDS and txn is not None and len(data) >= start + 8:
            relid: int = _UINT32.unpack_from(data, start + 1)[0]
            plan = self._plans.get(relid)
            tuple_kind = data[start + 5]
            if plan is not None and tuple_kind == _FAST_KINDS[kind]:
                row = _pick(data, start + 6, plan[1], plan[2])
                if row is not None:
                    if kind == 0x44:  # D
                        txn.changes.append(Change("delete", plan[0], None, row))
                    else:
                        operation = "insert" if kind == 0x49 else "update"
                        txn.changes.append(Change(operation, plan[0], row, None))
                    return None
        return self.feed(decode(bytes(data[start:]), self.masks))

    def feed_all(self, messages: Iterator[Message] | list[Message]) -> Iterator[Transaction]:
        for message in messages:
            txn = self.feed(message)
            if txn is not None:
                yield txn

    def _describe(self, relation: Relation) -> None:
        relid = relation.relid
        self.relations[relid] = relation
        keep = None if self._narrow is None else self._narrow(relation)
        if keep is None:
            self.masks.pop(relid, None)
            self._plans.pop(relid, None)
            self._names[relid] = [c.name for c in relation.columns]
            return
        mask = tuple(c.name in keep for c in relation.columns)
        self.masks[relid] = mask
        names = [c.name if k else None for c, k in zip(relation.columns, mask, strict=True)]
        self._names[relid] = names
        stop = max((i + 1 for i, k in enumerate(mask) if k), default=0)
        self._plans[relid] = (relation, tuple(names), stop)

    def _relation(self, relid: int) -> Relation:
        relation = self.relations.get(relid)
        if relation is None:
            raise WalDecodeError(f"pgoutput: change of relation {relid} before its description")
        return relation

    def _change(self, message: Insert | Update | Delete) -> Change:
        relation = self._relation(message.relid)
        names = self._names[message.relid]
        if isinstance(message, Insert):
            return Change("insert", relation, _named(names, message.new), None)
        if isinstance(message, Update):
            old = None if message.old is None else _named(names, message.old)
            return Change("update", relation, _named(names, message.new), old)
        return Change("delete", relation, None, _named(names, message.old))


#: the fast path's message kinds (I, U, D) and the tuple kind each must carry (N, N, K)
_FAST_KINDS = {0x49: 0x4E, 0x55: 0x4E, 0x44: 0x4B}


def _pick(
    data: bytes | memoryview, pos: int, names: tuple[str | None, ...], stop: int
) -> dict[str, object] | None:
    """The named values of the TupleData at ``pos``, reading its first ``stop`` columns only
    (None: not a plain text tuple of ``len(names)`` columns; the caller decodes it in full)."""
    end = len(data)
    if pos + 2 > end or _INT16.unpack_from(data, pos)[0] != len(names):
        return None
    pos += 2
    row: dict[str, object] = {}
    unpack = _INT32.unpack_from
    for i in range(stop):
        if pos >= end:
            return None
        kind = data[pos]
        pos += 1
        name = names[i]
        if kind == 0x74:  # t
            if pos + 4 > end:
                return None
            length: int = unpack(data, pos)[0]
            pos += 4
            if length < 0 or pos + length > end:
                return None
            if name is not None:
                row[name] = str(data[pos : pos + length], "utf-8")
            pos += length
        elif kind == 0x6E:  # n
            if name is not None:
                row[name] = None
        elif kind == 0x75:  # u
            if name is not None:
                row[name] = UNCHANGED_TOAST
        else:
            return None
    return row


def _named(names: list[str | None], values: Tuple) -> dict[str, object]:
    """A row's values by column name (columns named None were not decoded and are left out)."""
    if len(values) != len(names):
        raise WalDecodeError(
            f"pgoutput: a row has {len(values)} columns, its relation {len(names)}"
        )
    return {name: value for name, value in zip(names, values, strict=True) if name is not None}
