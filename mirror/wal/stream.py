"""The WAL reader's streaming transport: one logical replication connection (a walsender).

``START_REPLICATION SLOT <slot> LOGICAL 0/0 (proto_version '1', publication_names '...')`` on a
connection opened with ``replication=database``: PostgreSQL keeps one decoding context for
the whole connection and sends each committed transaction once, as it decodes it, instead of
decoding again from the slot's restart_lsn on every call as the SQL functions do. The stream
starts at the slot's confirmed position.

The connection is libpq's, through psycopg 3's binding (``psycopg.pq``): authentication,
TLS, ``.pgpass`` and ``PG*`` variables behave as for every other libpq client. asyncpg cannot
enter the CopyBoth mode that START_REPLICATION switches to. Inside CopyData the frames are
the replication protocol's own, built and parsed here without I/O: XLogData (``w``: one
pgoutput message), the primary's keepalive (``k``) and the standby status update (``r``) this
client sends to confirm a position.
"""

from __future__ import annotations

import asyncio
import struct
import time
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from core.errors import WalDecodeError
from mirror.wal.pgoutput import PG_EPOCH

_XLOGDATA_HEAD = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STATUS = struct.Struct("!cQQQqB")
#: the start of the XLogData payload (after 'w' and its three int64 fields)
XLOGDATA_PAYLOAD = 1 + _XLOGDATA_HEAD.size
_EPOCH_OFFSET_US = int(PG_EPOCH.timestamp() * 1_000_000)


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The server's position (how far its walsender has read the WAL) and whether it wants a
    status update now (it disconnects after ``wal_sender_timeout`` without one)."""

    wal_end: int
    reply_requested: bool


def parse_keepalive(frame: bytes | memoryview) -> Keepalive:
    if len(frame) != 1 + _KEEPALIVE.size:
        raise WalDecodeError(f"replication keepalive of {len(frame)} bytes")
    wal_end, _, reply = _KEEPALIVE.unpack_from(frame, 1)
    return Keepalive(wal_end, bool(reply))


def xlogdata_start(frame: bytes | memoryview) -> int:
    """The WAL position of an XLogData frame's message."""
    if len(frame) < XLOGDATA_PAYLOAD:
        raise WalDecodeError(f"XLogData frame of {len(frame)} bytes")
    start: int = _XLOGDATA_HEAD.unpack_from(frame, 1)[0]
    return start


def status_update(position: int, *, reply: bool = False, now: float | None = None) -> bytes:
    """A standby status update confirming ``position`` as written, flushed and applied: the
    slot's confirmed_flush_lsn moves there (never backwards)."""
    clock = int((time.time() if now is None else now) * 1_000_000) - _EPOCH_OFFSET_US
    return _STATUS.pack(b"r", position, position, position, clock, 1 if reply else 0)


def replication_conninfo(dsn: str) -> str:
    """The service DSN as a walsender connection (logical replication into this database)."""
    return make_conninfo(dsn, replication="database", application_name="dualwrite-wal")


def start_command(slot: str, publications: list[str]) -> bytes:
    names = ",".join(publications).replace("'", "''")
    return (
        f'START_REPLICATION SLOT "{slot}" LOGICAL 0/0 '
        f"(proto_version '1', publication_names '{names}')"
    ).encode()


class StreamError(Exception):
    """The replication connection failed or the server ended the stream (the message says
    why, with the SQLSTATE when the server sent one)."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ReplicationStream:
    """An open START_REPLICATION stream: frames in (``read``), status updates out."""

    def __init__(self, conn: psycopg.AsyncConnection[object]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self.closed = False

    @classmethod
    async def start(
        cls, dsn: str, slot: str, publications: list[str], *, connect_timeout: float = 10.0
    ) -> ReplicationStream:
        conn = await psycopg.AsyncConnection.connect(
            replication_conninfo(dsn), autocommit=True, connect_timeout=int(connect_timeout)
        )
        stream = cls(conn)
        try:
            await stream._start(start_command(slot, publications))
        except BaseException:
            await stream.close()
            raise
        return stream

    @property
    def backend_pid(self) -> int:
        return self._pg.backend_pid

    async def _start(self, command: bytes) -> None:
        pg = self._pg
        pg.nonblocking = 1
        pg.send_query(command)
        await self._flush()
        while True:
            pg.consume_input()
            if pg.is_busy():
                await self._wait(reading=True, seconds=None)
                continue
            result = pg.get_result()
            if result is None:
                raise StreamError("START_REPLICATION returned no result")
            if result.status == pq.ExecStatus.COPY_BOTH:
                return
            raise self._error(result)

    def _error(self, result: pq.abc.PGresult | None) -> StreamError:
        if result is not None and result.error_message:
            state = result.error_field(pq.DiagnosticField.SQLSTATE)
            return StreamError(
                result.error_message.decode(errors="replace").strip(),
                state.decode() if state else None,
            )
        return StreamError(self._pg.get_error_message().strip() or "replication stream ended")

    async def _wait(self, *, reading: bool, seconds: float | None) -> bool:
        """Until the socket is readable (or writable); False on timeout."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if reading:
            loop.add_reader(self._fd, wake)
        else:
            loop.add_writer(self._fd, wake)
        try:
            await asyncio.wait_for(ready, seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if reading:
                loop.remove_reader(self._fd)
            else:
                loop.remove_writer(self._fd)

    async def _flush(self) -> None:
        while self._pg.flush() == 1:
            await self._wait(reading=False, seconds=None)

    def read_nowait(self) -> memoryview | None:
        """The next CopyData frame libpq has buffered (None: none complete yet)."""
        size, data = self._pg.get_copy_data(1)
        if size > 0:
            return data
        if size == 0:
            return None
        # -1: the server ended the copy (an error follows); -2: the connection failed
        raise self._error(self._pg.get_result())

    async def read(self, seconds: float | None) -> memoryview | None:
        """The next frame, waiting up to ``seconds`` for one (None: none came)."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while True:
            frame = self.read_nowait()
            if frame is not None:
                return frame
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if await self._wait(reading=True, seconds=left):
                self._pg.consume_input()

    async def confirm(self, position: int, *, reply: bool = False) -> None:
        """Send a standby status update: everything up to ``position`` is done."""
        if self._pg.put_copy_data(status_update(position, reply=reply)) != 1:
            raise self._error(None)
        await self._flush()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # closing the socket ends the walsender, which releases the slot
        await self._conn.close()
