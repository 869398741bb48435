"""The WAL reader: turns every committed change of a WAL-read source into outbox keys.

One reader per slot across all sidecars: each sidecar's reader tries a session advisory lock
on its own connection; the one that gets it reads, the others retry every few polls and take
over when the leader's connection dies (the lock goes with it).

Two transports (``wal.transport``). ``stream`` (the default): the leader also opens a logical
replication connection (mirror/wal/stream.py) and PostgreSQL sends each committed transaction
once, from one decoding context; a poll takes what arrives within ``poll_interval_seconds``
(or until ``batch_changes`` changes, whole transactions), queues it as in 3 and 4 below, then
confirms the position covered with a standby status update (instead of 5). Keepalives carry
the server's position: when no transaction is open, everything before it was sent, so it is
confirmed as well (a quiet mapping never pins WAL), and a keepalive that asks for a reply
gets one. ``poll``: the SQL functions, which decode again from the slot's restart_lsn on
every call:

1. note the server's flushed WAL position ``upto``;
2. ``pg_logical_slot_peek_binary_changes(slot, upto, batch_changes, pgoutput...)``: decode,
   without consuming, the transactions committed before ``upto`` (whole transactions);
3. have PostgreSQL compute each changed row's mapping key (mirror/wal/keys.py);
4. in one transaction: apply the keys to the target with ``sync_keys`` (same-database,
   unpaused mappings; in a savepoint) or, when that is not possible or the target refuses,
   insert them into ``dualwrite.outbox`` for the applier, whose dead-letter handling then
   decides key by key (for ``both``, only the keys of changes statement capture did not
   record, which are also written to ``dualwrite.uncaptured_changes``); mark truncated
   mappings for resync; and move ``dualwrite.wal_progress`` to the position covered;
5. after that commit, ``pg_replication_slot_advance`` the slot to the same position.

A kill between 4 and 5, or a PostgreSQL restart that forgets an advance (the slot is saved at
checkpoints), makes the next poll decode those transactions again; the ones whose commit ends
at or below ``wal_progress`` are skipped, so nothing is lost and nothing is counted twice. When
the poll covered everything up to ``upto`` (the common case, and always when the mapped
tables were idle), the slot advances to ``upto`` itself: a quiet mapping never pins WAL that
other tables' traffic writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from core import metrics
from core.config import WalConfig
from core.control import LOCK_CLASS, MappingStates
from core.errors import WalDecodeError
from core.logs import get_logger
from core.mapping import CompiledMapping
from core.redact import describe_error
from core.sqltext import QualifiedName
from mirror.keysync import sync_keys
from mirror.wal import pgoutput, slot
from mirror.wal import stream as wal_stream
from mirror.wal.keys import KeyDeriver

_log = get_logger("wal")

#: advisory lock class of the reader's leadership (LOCK_CLASS: sync_keys, +1: compare's runs)
WAL_LOCK_CLASS = LOCK_CLASS + 2
#: seconds between retained-WAL checks by the leader
GUARD_INTERVAL_SECONDS = 5.0
#: a standby tries to take over this many poll intervals apart
STANDBY_POLLS = 5

_PEEK = """
SELECT data FROM pg_logical_slot_peek_binary_changes(
    $1, $2::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)
"""
_QUEUE = """
INSERT INTO dualwrite.outbox (mapping, key)
SELECT m, k::jsonb FROM unnest($1::text[], $2::text[]) AS u(m, k)
"""
_RECORD_UNCAPTURED = """
INSERT INTO dualwrite.uncaptured_changes (mapping, xid, commit_time, lsn, operation, key)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::pg_lsn[], $5::text[],
                     $6::jsonb[])
"""
#: every one of these 32-bit xids is visible to a snapshot taken now (widened to 64 bits with
#: the current epoch, or the one before for an xid above the snapshot's xmax)
_VISIBLE = """
SELECT coalesce(bool_and(txid_visible_in_snapshot(
           CASE WHEN (e.base | x) > e.xmax THEN (e.base | x) - 4294967296 ELSE e.base | x END,
           e.snap)), true)
FROM (SELECT s AS snap, txid_snapshot_xmax(s) AS xmax,
             txid_snapshot_xmax(s) & ~4294967295::bigint AS base
      FROM txid_current_snapshot() AS s) AS e,
     unnest($1::bigint[]) AS x
"""
#: PostgreSQL decodes from the slot's restart_lsn on every call, and restart_lsn moves only past
#: a running-transactions record (the background writer logs one every 15 s). On PostgreSQL 16
#: and later, when the slot's restart_lsn trails its confirmed position by more than this, the
#: reader logs one itself, so a poll re-reads about one poll's WAL instead of up to 15 s of it.
RESTART_LAG_BYTES = 1 << 20
_NUDGE_RESTART = """
SELECT pg_log_standby_snapshot() FROM pg_replication_slots
WHERE slot_name = $1 AND pg_wal_lsn_diff(confirmed_flush_lsn, restart_lsn) > $2
"""
#: a streaming reader sends a status update at least this often, even with nothing new
STATUS_INTERVAL_SECONDS = 10.0
#: how long a new leader waits for a slot still held by the old leader's walsender (a killed
#: sidecar's socket is closed by its kernel, so the walsender ends soon) before ending it
SLOT_RELEASE_SECONDS = 5.0
#: the reader's own apply gives way quickly (its keys then go through the outbox)
APPLY_LOCK_TIMEOUT_MS = 200
#: how long the reader waits for decoded transactions to become visible before it retries
VISIBLE_WAIT_SECONDS = 10.0
#: a source's columns of a domain type: a NULL in a record literal goes through the domain's
#: input function, which refuses it when the domain is NOT NULL or checks the value
_DOMAIN_COLUMNS = """
SELECT a.attname FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype = 'd'
"""
_UNROUTED: list[tuple[CompiledMapping, KeyDeriver]] = []
_PROGRESS = """
INSERT INTO dualwrite.wal_progress AS p (slot, lsn, transactions, changes, reader)
VALUES ($1, $2::pg_lsn, $3, $4, $5)
ON CONFLICT (slot) DO UPDATE SET lsn = greatest(p.lsn, EXCLUDED.lsn),
    transactions = p.transactions + EXCLUDED.transactions, changes = p.changes + EXCLUDED.changes,
    reader = EXCLUDED.reader, updated_at = now()
"""


@dataclass
class PollResult:
    """What one poll did (the tests and the bench read it)."""

    transactions: int = 0
    changes: int = 0
    skipped_transactions: int = 0
    keys_queued: dict[str, int] = field(default_factory=dict)
    #: keys applied to the target by the reader itself (not queued)
    keys_applied: dict[str, int] = field(default_factory=dict)
    uncaptured: dict[str, int] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    #: the position the slot was confirmed to (None: nothing new)
    confirmed: int | None = None


@dataclass
class _Batch:
    """Per mapping, the distinct rows whose keys a poll must compute (as record literals of
    the key columns), and what each change needs."""

    #: per mapping: literal -> its index (a row inserted then updated in one batch, or updated
    #: twice, is sent to PostgreSQL once)
    rows: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    #: of the mappings that audit statement capture: (mapping, txn, change, index of the
    #: new/old row in rows[mapping] or -1)
    changes: list[tuple[CompiledMapping, pgoutput.Transaction, pgoutput.Change, int, int]] = (
        field(default_factory=list)
    )

    def add(
        self, mapping: CompiledMapping, deriver: KeyDeriver, row: dict[str, object] | None
    ) -> int:
        if row is None:
            return -1
        rows = self.rows[mapping.name]
        literal = deriver.literal(row)
        at = rows.get(literal)
        if at is None:
            at = rows[literal] = len(rows)
        return at


class WalReader:
    """Decodes the slot of one source database for the WAL-read mappings of a sidecar."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        mappings: Sequence[CompiledMapping],
        config: WalConfig,
        *,
        reader_id: str,
        states: MappingStates | None = None,
        dsn: str | None = None,
    ) -> None:
        self.connect = connect
        #: the service DSN the replication connection is opened with (None: the SQL
        #: functions, whatever ``transport`` says)
        self.dsn = dsn if config.transport == "stream" else None
        self.mappings = slot.wal_mappings(mappings)
        self.config = config
        self.reader_id = reader_id
        #: pause flags: a paused mapping's keys are queued, never applied here
        self.states = states or MappingStates()
        self._by_name = {m.name: m for m in self.mappings}
        self.publications = slot.publication_names(config, self.mappings)
        self._by_source: dict[tuple[str, str], list[CompiledMapping]] = defaultdict(list)
        for mapping in self.mappings:
            source: QualifiedName = mapping.binding().source
            self._by_source[(source.schema, source.name)].append(mapping)
        self._derivers = {m.name: KeyDeriver(m) for m in self.mappings}
        #: per mapped source: the only columns the reader decodes, those any of its mappings'
        #: keys are computed from (and, once leading, its domain-typed columns: _load_needs)
        self._needs = {
            source: frozenset().union(*(self._derivers[m.name].needs for m in mappings))
            for source, mappings in self._by_source.items()
        }
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.leader = False
        self.last_error: str | None = None
        #: the position the slot was last advanced to by this reader
        self._advanced: int = 0
        self._guarded_at = -GUARD_INTERVAL_SECONDS
        #: log running-transactions records to move restart_lsn (PostgreSQL 16+, if allowed)
        self._nudge = False
        #: wakes the loop early (tests, shutdown)
        self.polls = 0
        self._stream: wal_stream.ReplicationStream | None = None
        #: one per replication connection (it remembers the relations sent on it)
        self._assembler = pgoutput.TransactionAssembler(self._narrow)
        #: the server's position from the last keepalive outside a transaction
        self._server_end = 0
        self._status_at = 0.0

    def _narrow(self, relation: pgoutput.Relation) -> frozenset[str] | None:
        """The columns the reader decodes of a relation's rows: a mapped source's key columns
        (the others are skipped unread); every column of anything else (the outbox)."""
        return self._needs.get((relation.schema, relation.name))

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="wal-reader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._release()

    async def _release(self) -> None:
        self._set_leader(False)
        await self._close_stream()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                await asyncio.wait_for(conn.close(), 5)
            except (OSError, asyncpg.InterfaceError, TimeoutError):
                conn.terminate()

    def _set_leader(self, leader: bool) -> None:
        self.leader = leader
        metrics.WAL_READER_LEADER.labels(slot=self.config.slot_name).set(1 if leader else 0)

    async def _run(self) -> None:
        interval = self.config.poll_interval_seconds
        while True:
            try:
                if not await self.lead():
                    await asyncio.sleep(interval * STANDBY_POLLS)
                    continue
                result = await self.poll()
                self.last_error = None
                # a streaming poll already waited for data
                if result.transactions == 0 and self.dsn is None:
                    await asyncio.sleep(interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any failure
                # a lost connection, a slot held by a dying backend, a restart (whatever the
                # driver raises on the way): let go of the leadership and try again; nothing
                # was confirmed past what is queued
                self.last_error = f"{type(exc).__name__}: {exc}"
                _log.warning("wal_reader_retry", error=self.last_error)
                with contextlib.suppress(Exception):
                    await self._release()
                await asyncio.sleep(interval * STANDBY_POLLS)

    async def lead(self) -> bool:
        """Be the slot's reader: True when this process holds the leadership lock."""
        if self.leader and self._conn is not None and not self._conn.is_closed():
            return True
        await self._release()
        conn = await self.connect()
        got = await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, hashtext($2))", WAL_LOCK_CLASS, self.config.slot_name
        )
        if not got:
            await conn.close()
            return False
        self._conn = conn
        self._set_leader(True)
        await self._load_needs(conn)
        self._nudge = int(await conn.fetchval("SHOW server_version_num")) >= 160000
        created = await slot.ensure_slot(conn, self.config.slot_name)
        if created and await conn.fetchval(
            "SELECT EXISTS (SELECT FROM dualwrite.wal_progress WHERE slot = $1)",
            self.config.slot_name,
        ):
            # the slot was dropped outside dualwrite while it had a history: changes between
            # the drop and now were never decoded
            async with conn.transaction():
                await slot.mark_resync(
                    conn, [m.name for m in self.mappings], "replication slot was recreated"
                )
                await conn.execute(
                    "DELETE FROM dualwrite.wal_progress WHERE slot = $1", self.config.slot_name
                )
        _log.info("wal_reader_leading", slot=self.config.slot_name, reader=self.reader_id)
        return True

    async def _load_needs(self, conn: asyncpg.Connection) -> None:
        """Decode a source's domain-typed columns too: left NULL in a record literal, one whose
        domain refuses NULL would make key derivation fail."""
        for source, mappings in self._by_source.items():
            name: QualifiedName = mappings[0].binding().source
            domains = await conn.fetch(_DOMAIN_COLUMNS, name.sql)
            keys = frozenset().union(*(self._derivers[m.name].needs for m in mappings))
            self._needs[source] = keys | {r["attname"] for r in domains}

    # --- one poll ---------------------------------------------------------------------------

    async def poll(self) -> PollResult:
        """Decode, queue and confirm what committed since the last poll (needs leadership)."""
        conn = self._conn
        assert conn is not None, "poll() needs the leadership (lead())"
        started = time.perf_counter()
        await self._guard(conn)
        if self.dsn is not None:
            result = await self._poll_stream(conn, self.dsn)
        else:
            result = await self._poll_sql(conn)
        metrics.WAL_OLDEST_UNCONFIRMED_AGE.labels(slot=self.config.slot_name).set(0)
        metrics.WAL_POLL_SECONDS.observe(time.perf_counter() - started)
        return result

    async def _poll_sql(self, conn: asyncpg.Connection) -> PollResult:
        # asyncpg passes pg_lsn as an int
        upto: int = await conn.fetchval("SELECT pg_current_wal_flush_lsn()")
        rows = await conn.fetch(
            _PEEK, self.config.slot_name, upto,
            self.config.batch_changes, ",".join(self.publications),
        )
        self.polls += 1
        result = PollResult()
        assembler = pgoutput.TransactionAssembler(self._narrow)
        masks = assembler.masks
        txns = list(assembler.feed_all(pgoutput.decode(bytes(r["data"]), masks) for r in rows))
        # a poll cut short by batch_changes covers only up to its last commit
        covered = txns[-1].end_lsn if len(rows) >= self.config.batch_changes and txns else upto
        await self._take(conn, txns, covered, result)
        if covered > self._advanced:
            await conn.execute(
                "SELECT pg_replication_slot_advance($1, $2::pg_lsn)", self.config.slot_name, covered
            )
            self._advanced = covered
            result.confirmed = covered
            if txns and self._nudge:
                await self._nudge_restart(conn)
        return result

    async def _take(
        self,
        conn: asyncpg.Connection,
        txns: list[pgoutput.Transaction],
        covered: int,
        result: PollResult,
    ) -> None:
        """Queue the transactions not yet recorded in ``wal_progress`` (a re-read after a kill
        repeats some), with the progress moved to ``covered``."""
        if not txns:
            return
        age = (datetime.now(UTC) - txns[0].commit_time).total_seconds()
        metrics.WAL_OLDEST_UNCONFIRMED_AGE.labels(slot=self.config.slot_name).set(max(age, 0))
        done: int = await conn.fetchval(
            "SELECT coalesce((SELECT lsn FROM dualwrite.wal_progress WHERE slot = $1), '0/0')",
            self.config.slot_name,
        )
        fresh = [t for t in txns if t.end_lsn > done]
        result.skipped_transactions = len(txns) - len(fresh)
        await self._queue(conn, fresh, covered, result)

    # --- the streaming transport --------------------------------------------------------------

    async def _open_stream(
        self, conn: asyncpg.Connection, dsn: str
    ) -> wal_stream.ReplicationStream:
        if self._stream is not None and not self._stream.closed:
            return self._stream
        name = self.config.slot_name
        deadline = time.monotonic() + SLOT_RELEASE_SECONDS
        info = await slot.slot_info(conn, name)
        while info is not None and info.active_pid is not None:
            # the walsender of a reader that lost the leadership (its sidecar was killed, or
            # its leadership connection died): only the holder of the lock may read the slot
            if time.monotonic() > deadline:
                _log.warning("wal_slot_held", slot=name, pid=info.active_pid, action="terminated")
                await conn.execute("SELECT pg_terminate_backend($1)", info.active_pid)
                deadline = time.monotonic() + SLOT_RELEASE_SECONDS
            await asyncio.sleep(0.05)
            info = await slot.slot_info(conn, name)
        if info is None:
            raise asyncpg.InterfaceError(f"replication slot {name} is missing")
        # the slot's confirmed position: a status update never moves it backwards
        self._advanced = pgoutput.parse_lsn(info.confirmed) if info.confirmed else 0
        self._stream = await wal_stream.ReplicationStream.start(dsn, name, self.publications)
        self._assembler = pgoutput.TransactionAssembler(self._narrow)
        self._server_end = 0
        self._status_at = time.monotonic()
        _log.info("wal_stream_started", slot=name, pid=self._stream.backend_pid)
        return self._stream

    async def _close_stream(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            with contextlib.suppress(Exception):
                await stream.close()

    async def _poll_stream(self, conn: asyncpg.Connection, dsn: str) -> PollResult:
        """Take what the stream sent (whole transactions, up to ``batch_changes`` changes,
        waiting at most ``poll_interval_seconds``), queue it, then confirm it."""
        stream = await self._open_stream(conn, dsn)
        self.polls += 1
        result = PollResult()
        assembler = self._assembler
        txns: list[pgoutput.Transaction] = []
        changes = 0
        reply = False
        deadline = time.monotonic() + self.config.poll_interval_seconds
        while changes < self.config.batch_changes:
            frame = stream.read_nowait()
            if frame is None:
                # until the interval is over, even with work in hand: one batch of
                # bookkeeping (visibility, key derivation, sync_keys, progress) per interval
                # instead of one per trickle of commits; a backlog fills the batch sooner
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                frame = await stream.read(left)
                if frame is None:
                    break
            kind = frame[0]
            if kind == 0x77:  # w: XLogData, one pgoutput message
                txn = assembler.feed_bytes(frame, wal_stream.XLOGDATA_PAYLOAD)
                if txn is not None:
                    txns.append(txn)
                    changes += len(txn.changes) + len(txn.truncated)
            elif kind == 0x6B:  # k: keepalive
                keepalive = wal_stream.parse_keepalive(frame)
                reply = reply or keepalive.reply_requested
                if not assembler.in_transaction:
                    # every commit before this position was sent before this keepalive
                    self._server_end = max(self._server_end, keepalive.wal_end)
            else:
                raise WalDecodeError(f"replication stream: unknown frame {bytes(frame[:1])!r}")
        covered = max(txns[-1].end_lsn if txns else 0, self._server_end)
        await self._take(conn, txns, covered, result)
        now = time.monotonic()
        if covered > self._advanced:
            await stream.confirm(covered)
            self._advanced = covered
            result.confirmed = covered
            self._status_at = now
        elif reply or now - self._status_at > STATUS_INTERVAL_SECONDS:
            await stream.confirm(self._advanced)
            self._status_at = now
        return result

    async def _nudge_restart(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.execute(_NUDGE_RESTART, self.config.slot_name, RESTART_LAG_BYTES)
        except asyncpg.InsufficientPrivilegeError:
            # granted to superusers only by default: without it decoding re-reads more WAL
            _log.info("wal_restart_nudge_unavailable", reason="pg_log_standby_snapshot denied")
            self._nudge = False

    async def _guard(self, conn: asyncpg.Connection) -> None:
        now = time.monotonic()
        if now - self._guarded_at < GUARD_INTERVAL_SECONDS:
            return
        self._guarded_at = now
        if self._stream is not None:
            info = await slot.slot_info(conn, self.config.slot_name)
            if info is not None and info.retained_bytes > self.config.max_retained_bytes:
                await self._close_stream()  # the slot is about to be dropped
        if await slot.guard_retained(conn, self.config, self.mappings) is None:
            await self._close_stream()
            await slot.ensure_slot(conn, self.config.slot_name)
            self._advanced = 0

    @staticmethod
    async def _wait_visible(conn: asyncpg.Connection, xids: list[int]) -> None:
        """Until every decoded transaction is visible to new snapshots.

        Why: a commit is in the WAL (and decodable) a moment before it leaves the set of
        running transactions. The applier copies the source rows as they are when it runs;
        if it ran in that moment, it would read the rows before the change and drop the key.
        """
        if not xids:
            return
        deadline = time.monotonic() + VISIBLE_WAIT_SECONDS
        while not await conn.fetchval(_VISIBLE, xids):
            if time.monotonic() > deadline:
                raise asyncpg.InterfaceError(f"decoded transactions {xids[:5]} are not visible")
            await asyncio.sleep(0.001)

    async def _apply(
        self, conn: asyncpg.Connection, mapping: CompiledMapping, keys: set[str]
    ) -> bool:
        """Copy the keys' source rows to the target now, in a savepoint of the bookkeeping
        transaction; False (nothing written) when they must go through the outbox instead.

        Why apply here: the keys would otherwise be inserted into the outbox, claimed and
        deleted by the applier in another transaction: three writes per key for the same
        result. The outbox stays the path for what the applier handles better: a target in
        another database, a paused mapping, and a target that refuses a key (the applier
        bisects the batch and dead-letters the key, with retries and backoff).
        """
        if mapping.cross_database or self.states.is_paused(mapping.name):
            return False
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {APPLY_LOCK_TIMEOUT_MS}")
                done = await sync_keys(conn, mapping, sorted(keys))
        except asyncpg.PostgresError as exc:
            _log.info(
                "wal_apply_deferred", mapping=mapping.name, error=describe_error(exc, mapping)
            )
            return False
        metrics.APPLIER_ROWS.labels(mapping=mapping.name, outcome="upserted").inc(done.upserted)
        metrics.APPLIER_ROWS.labels(mapping=mapping.name, outcome="deleted").inc(done.deleted)
        return True

    async def _queue(
        self,
        conn: asyncpg.Connection,
        txns: list[pgoutput.Transaction],
        covered: int,
        result: PollResult,
    ) -> None:
        """Compute the keys of these transactions' changes and queue them, with the progress,
        in one transaction."""
        await self._wait_visible(conn, [t.xid for t in txns])
        batch = _Batch()
        #: (xid, mapping, key) of the outbox rows statement capture wrote, per transaction
        captured: Counter[tuple[int, str, str]] = Counter()
        truncated: Counter[str] = Counter()
        #: changes per (mapping, operation), counted once per poll (not one metric call per row)
        decoded: Counter[tuple[str, str]] = Counter()
        #: per Relation object of this batch (by id: they live as long as txns): its mappings
        #: with their derivers, or None for the outbox (the loop below runs once per row)
        routes: dict[int, list[tuple[CompiledMapping, KeyDeriver]] | None] = {}
        for txn in txns:
            for change in txn.changes:
                route = routes.get(id(change.relation), _UNROUTED)
                if route is _UNROUTED:
                    relation = (change.relation.schema, change.relation.name)
                    route = routes[id(change.relation)] = (
                        None if relation == slot.OUTBOX_TABLE else [
                            (m, self._derivers[m.name]) for m in self._by_source.get(relation, ())
                        ]
                    )
                if route is None:
                    if change.operation == "insert" and change.new is not None:
                        mark = (txn.xid, str(change.new["mapping"]), str(change.new["key"]))
                        captured[mark] += 1
                    continue
                for mapping, deriver in route:
                    new_at = batch.add(mapping, deriver, change.new)
                    old_at = batch.add(mapping, deriver, change.old)
                    decoded[(mapping.name, change.operation)] += 1
                    if mapping.capture.audits_statement_capture:
                        batch.changes.append((mapping, txn, change, new_at, old_at))
            for gone in txn.truncated:
                for mapping in self._by_source.get((gone.schema, gone.name), ()):
                    truncated[mapping.name] += 1
        changes = sum(decoded.values())
        keys = {
            name: await self._derivers[name].keys(conn, list(rows))
            for name, rows in batch.rows.items()
        }
        queue: dict[str, set[str]] = defaultdict(set)
        # every row of a mapping that does not audit statement capture is queued: its keys
        # are the batch's keys, whatever change each came from
        for name, mine in keys.items():
            if not self._by_name[name].capture.audits_statement_capture:
                queue[name].update(mine)
        uncaptured: list[tuple[str, int, datetime, int, str, str]] = []
        for mapping, txn, change, new_at, old_at in batch.changes:  # audited mappings only
            mine = keys[mapping.name]
            changed = [mine[i] for i in (new_at, old_at) if i >= 0]
            mark = (txn.xid, mapping.name, changed[0])
            if captured[mark] > 0:
                captured[mark] -= 1
                continue
            uncaptured.append(
                (mapping.name, txn.xid, txn.commit_time, txn.commit_lsn, change.operation,
                 changed[0])
            )
            queue[mapping.name].update(changed)
        async with conn.transaction():
            applied = {
                name: await self._apply(conn, self._by_name[name], keys)
                for name, keys in queue.items()
            }
            queued = {name: keys for name, keys in queue.items() if not applied[name]}
            names = [m for m, ks in queued.items() for _ in ks]
            values = [k for ks in queued.values() for k in ks]
            if values:
                await conn.execute(_QUEUE, names, values)
            if uncaptured:
                await conn.execute(_RECORD_UNCAPTURED, *map(list, zip(*uncaptured, strict=True)))
            for name, events in truncated.items():
                await slot.mark_resync(conn, [name], "TRUNCATE of the source", events)
            await conn.execute(
                _PROGRESS, self.config.slot_name, covered, len(txns), changes, self.reader_id,
            )
        for (name, operation), count in decoded.items():
            metrics.WAL_CHANGES.labels(mapping=name, operation=operation).inc(count)
        result.transactions = len(txns)
        result.changes = changes
        result.keys_queued = {m: len(ks) for m, ks in queued.items()}
        result.keys_applied = {m: len(ks) for m, ks in queue.items() if applied[m]}
        for name, count in result.keys_queued.items():
            metrics.WAL_KEYS_QUEUED.labels(mapping=name).inc(count)
        for row in uncaptured:
            result.uncaptured[row[0]] = result.uncaptured.get(row[0], 0) + 1
        for name, count in result.uncaptured.items():
            metrics.UNCAPTURED_CHANGES.labels(mapping=name).inc(count)
        result.truncated = sorted(truncated)
        for name, events in truncated.items():
            metrics.WAL_TRUNCATES.labels(mapping=name).inc(events)
