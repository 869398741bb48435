"""Helpers for the relay tests: run the same thing directly and through the proxy, compare.

- :func:`psql_case` runs a SQL case file (``tests/cases/*.sql``) with psql and returns its
  stdout and stderr, normalised only where the two runs legitimately differ.
- :class:`RawClient` speaks the v3 protocol over a plain socket (no driver), for bad input
  and for observing exactly which messages the proxy sends.
- :func:`backend_pids` / :func:`wait_backend_gone` look at ``pg_stat_activity`` to check that
  the upstream session of a client really ended.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from .postgres import PgServer
from .procs import client_bin_dir, wait_until
from .sidecar import InProcessSidecar, deep_merge, start_in_process

CASES_DIR = Path(__file__).resolve().parent.parent / "cases"

#: psql flags for the transparency cases: no psqlrc, aligned output (what people see), and
#: keep going after errors so that one run shows every statement's outcome
CASE_FLAGS: tuple[str, ...] = ("-X", "-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=verbose")

# What differs between two runs against two databases of the same server, and nothing else:
# backend pids (notifications name the sender's) and the database names.
_PID = re.compile(r"(server process with PID) \d+")


def case_files() -> list[Path]:
    return sorted(CASES_DIR.glob("*.sql"))


def normalise(text: str, *, dbname: str) -> str:
    """Replace what legitimately differs between a direct and a proxied run."""
    text = _PID.sub(r"\1 <pid>", text)
    return text.replace(dbname, "<db>")


@dataclass
class CaseRun:
    returncode: int
    stdout: str
    stderr: str


#: the client environment of every case run: what psql sends in its startup packet
CASE_ENV = {
    "PGAPPNAME": "transparency",
    "PGTZ": "UTC",
    "PGDATESTYLE": "ISO, MDY",
    "PGOPTIONS": "-c work_mem=7MB",
    "PGCONNECT_TIMEOUT": "10",
}
#: variables of the developer's environment that would change what psql connects to or sends
_CLIENT_VARIABLES = ("PGSERVICE", "PGSERVICEFILE", "PGSSLMODE", "PGTARGETSESSIONATTRS", "PGTZ")


def psql_case(
    dsn: str,
    case: Path,
    *,
    dbname: str,
    variables: dict[str, str] | None = None,
    search_path: str | None = None,
) -> CaseRun:
    """Run one case file with psql (``-f``) and return its normalised output.

    Output is read as bytes and decoded with ``surrogateescape``: a case may switch
    client_encoding away from UTF-8, and what psql printed then must still compare exactly.
    ``search_path`` (sent in the startup packet) gives the case a schema of its own.
    """
    argv = [str(client_bin_dir() / "psql"), *CASE_FLAGS, "-d", dsn, "-f", str(case)]
    for name, value in (variables or {}).items():
        argv += ["-v", f"{name}={value}"]
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARIABLES}
    env.update(CASE_ENV)
    if search_path is not None:
        env["PGOPTIONS"] += f" -c search_path={search_path}"
    result = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        cwd=case.parent,
        timeout=120,
        check=False,
    )
    return CaseRun(
        result.returncode,
        normalise(result.stdout.decode("utf-8", "surrogateescape"), dbname=dbname),
        normalise(result.stderr.decode("utf-8", "surrogateescape"), dbname=dbname),
    )


# --- a sidecar shared by the tests of a module ---------------------------------------------------


def start_relay(
    pg: PgServer, dbname: str, overrides: dict[str, Any] | None = None
) -> InProcessSidecar:
    """An in-process sidecar relaying to ``pg`` (the ``sidecar`` fixture's config, without
    the per-test database), for module-scoped fixtures; the caller stops it."""
    base = {
        "listen": {"host": "127.0.0.1"},
        "upstream": {"host": pg.host, "port": pg.port},
        "service_dsn": pg.dsn(dbname, password=""),
        "admin": {"host": "127.0.0.1", "port": 0},
        "shutdown": {"grace_seconds": 5},
    }
    return start_in_process(
        deep_merge(base, overrides), dbname=dbname, user=pg.user, password=pg.password
    )


# --- pg_stat_activity -------------------------------------------------------------------------


def backend_pids(pg: PgServer, application_name: str) -> list[int]:
    """Pids of the server backends whose application_name is ``application_name``."""
    rows = pg.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s ORDER BY pid",
        application_name,
    )
    return [pid for (pid,) in rows]


def wait_backend_gone(pg: PgServer, application_name: str, timeout: float = 15.0) -> None:
    """Wait until no backend carries ``application_name`` (the upstream session ended)."""
    wait_until(
        lambda: not backend_pids(pg, application_name),
        timeout,
        f"the backend of {application_name!r} to exit",
    )


def unique_name(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{time.monotonic_ns()}"


# --- the v3 protocol over a raw socket ----------------------------------------------------------

PROTOCOL_V3 = 3 << 16
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


def frame(typ: bytes, body: bytes = b"") -> bytes:
    return typ + struct.pack("!i", len(body) + 4) + body


def startup_packet(params: dict[str, str], version: int = PROTOCOL_V3) -> bytes:
    body = struct.pack("!i", version)
    for key, value in params.items():
        body += key.encode() + b"\0" + value.encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def special_request(code: int, payload: bytes = b"") -> bytes:
    """An SSLRequest, GSSENCRequest or CancelRequest (``payload``: pid and secret)."""
    return struct.pack("!ii", 8 + len(payload), code) + payload


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


def cstrings(body: bytes) -> list[bytes]:
    return body.split(b"\0")


@dataclass
class Message:
    typ: bytes
    body: bytes

    def fields(self) -> dict[str, str]:
        """The fields of an ErrorResponse or NoticeResponse, keyed by their code letter."""
        out: dict[str, str] = {}
        pos = 0
        body = self.body
        while pos < len(body) and body[pos] != 0:
            end = body.index(b"\0", pos + 1)
            out[chr(body[pos])] = body[pos + 1 : end].decode("utf-8", "replace")
            pos = end + 1
        return out

    @property
    def sqlstate(self) -> str:
        return self.fields().get("C", "")

    @property
    def severity(self) -> str:
        return self.fields().get("V", self.fields().get("S", ""))

    @property
    def message(self) -> str:
        return self.fields().get("M", "")

    def __repr__(self) -> str:
        if self.typ in (b"E", b"N"):
            return f"Message({self.typ!r}, {self.fields()})"
        return f"Message({self.typ!r}, {self.body[:60]!r})"


@dataclass
class RawClient:
    """A socket speaking the protocol by hand; every read has a (generous) timeout."""

    host: str
    port: int
    timeout: float = 15.0
    sock: socket.socket = field(init=False)
    buffer: bytearray = field(default_factory=bytearray, init=False)
    #: BackendKeyData (pid, secret) once the session started
    key: tuple[int, bytes] | None = field(default=None, init=False)
    #: ParameterStatus values received
    parameters: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.settimeout(self.timeout)

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def startup(self, user: str, database: str, **params: str) -> list[Message]:
        """Send a StartupMessage (trust auth) and read up to the first ReadyForQuery."""
        self.send(startup_packet({"user": user, "database": database, **params}))
        return self.until_ready()

    # --- reading -----------------------------------------------------------------------

    def _fill(self) -> bool:
        """Read more bytes; False at end of stream."""
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            return False
        self.buffer += chunk
        return True

    def read_byte(self) -> bytes:
        """One untyped byte (the answer to an SSLRequest or GSSENCRequest)."""
        while not self.buffer:
            if not self._fill():
                return b""
        byte = bytes(self.buffer[:1])
        del self.buffer[:1]
        return byte

    def read_message(self) -> Message | None:
        """The next message, or None when the proxy closed the connection."""
        while True:
            if len(self.buffer) >= 5:
                (length,) = struct.unpack_from("!i", self.buffer, 1)
                if len(self.buffer) >= 1 + length:
                    typ = bytes(self.buffer[:1])
                    body = bytes(self.buffer[5 : 1 + length])
                    del self.buffer[: 1 + length]
                    message = Message(typ, body)
                    self._note(message)
                    return message
            if not self._fill():
                if self.buffer:
                    raise AssertionError(f"stream ended inside a message: {bytes(self.buffer)!r}")
                return None

    def _note(self, message: Message) -> None:
        if message.typ == b"K":
            (pid,) = struct.unpack_from("!i", message.body)
            self.key = (pid, message.body[4:])
        elif message.typ == b"S":
            name, value = cstrings(message.body)[:2]
            self.parameters[name.decode()] = value.decode()

    def messages(self) -> Iterator[Message]:
        while (message := self.read_message()) is not None:
            yield message

    def until_ready(self) -> list[Message]:
        """Messages up to and including the next ReadyForQuery (AssertionError on EOF)."""
        out = []
        for message in self.messages():
            out.append(message)
            if message.typ == b"Z":
                return out
        raise AssertionError(f"connection closed before ReadyForQuery; got {out}")

    def until_closed(self) -> list[Message]:
        """Every message until the proxy closes the connection."""
        return list(self.messages())

    def closed_by_peer(self) -> bool:
        """True once the other end closed (EOF or reset), after draining what it sent."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            return True
        return True

    def simple(self, sql: str) -> list[Message]:
        self.send(query(sql))
        return self.until_ready()


def errors(messages: list[Message]) -> list[Message]:
    return [message for message in messages if message.typ == b"E"]


def command_tags(messages: list[Message]) -> list[str]:
    return [message.body.rstrip(b"\0").decode() for message in messages if message.typ == b"C"]


def data_rows(messages: list[Message]) -> list[list[bytes | None]]:
    rows = []
    for message in messages:
        if message.typ != b"D":
            continue
        (count,) = struct.unpack_from("!h", message.body)
        pos = 2
        row: list[bytes | None] = []
        for _ in range(count):
            (size,) = struct.unpack_from("!i", message.body, pos)
            pos += 4
            if size < 0:
                row.append(None)
            else:
                row.append(message.body[pos : pos + size])
                pos += size
        rows.append(row)
    return rows


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def describe(value: Any) -> str:
    return repr(value)[:600]


# --- transcripts: what a driver saw, step by step, to compare direct against proxied --------


def plain(value: Any) -> Any:
    """Records, rows and nested sequences as plain tuples, so transcripts compare with ==."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Record":
        return tuple(plain(item) for item in value)
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, (float, Decimal)) and value != value:  # NaN is not equal to itself
        return f"{type(value).__name__}:NaN"
    return value


def error_summary(exc: BaseException) -> tuple[Any, ...]:
    """Everything a driver exposes about a server error (class, SQLSTATE, message, fields)."""
    diag = getattr(exc, "diag", None)
    if diag is not None:  # psycopg
        fields = (
            "severity_nonlocalized",
            "sqlstate",
            "message_primary",
            "message_detail",
            "message_hint",
            "context",
            "statement_position",
            "schema_name",
            "table_name",
            "column_name",
            "constraint_name",
        )
        return (type(exc).__name__, tuple(getattr(diag, name) for name in fields))
    as_dict = getattr(exc, "as_dict", None)
    if as_dict is not None:  # asyncpg
        return (type(exc).__name__, tuple(sorted(as_dict().items())))
    return (type(exc).__name__, str(exc))


@dataclass
class Transcript:
    """What happened at each step of a scenario: ("ok", value) or ("error", summary)."""

    entries: list[tuple[str, str, Any]] = field(default_factory=list)

    def ok(self, label: str, value: Any) -> None:
        self.entries.append((label, "ok", plain(value)))

    def failure(self, label: str, exc: BaseException) -> None:
        self.entries.append((label, "error", error_summary(exc)))

    def labels(self, outcome: str) -> list[str]:
        return [label for label, result, _ in self.entries if result == outcome]

    def get(self, label: str) -> Any:
        for name, _, value in self.entries:
            if name == label:
                return value
        raise KeyError(label)


def assert_same_transcript(direct: Transcript, proxied: Transcript) -> None:
    """Compare step by step; the first difference is reported with its label."""
    for index, (left, right) in enumerate(zip(direct.entries, proxied.entries, strict=False)):
        if left != right:
            raise AssertionError(
                f"step {index} ({left[0]}) differs through the proxy:\n"
                f"  direct:  {describe(left)}\n  proxied: {describe(right)}"
            )
    assert len(direct.entries) == len(proxied.entries), (
        f"{len(direct.entries)} steps direct, {len(proxied.entries)} through the proxy"
    )


# --- /metrics ---------------------------------------------------------------------------------


def scrape(endpoints: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The sidecar's /metrics as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    status, text = endpoints.http("/metrics")
    assert status == 200, text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def metric(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_sleeping(pg: PgServer, pid: int, timeout: float = 15.0) -> None:
    """Wait until backend ``pid`` is inside pg_sleep (its query really started)."""
    wait_until(
        lambda: pg.sql(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
            " AND wait_event = 'PgSleep'",
            pid,
        ),
        timeout,
        f"backend {pid} to be in pg_sleep",
    )


def is_sleeping(pg: PgServer, pid: int) -> bool:
    rows = pg.sql(
        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
        " AND wait_event = 'PgSleep'",
        pid,
    )
    return bool(rows)


class VanishingUpstream:
    """A stand-in server that completes a trust login, then drops the connection (no FATAL,
    no goodbye) as soon as the client sends its first query: a crashed or unplugged server."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.dropped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(15)
                head = conn.recv(4, socket.MSG_WAITALL)
                (length,) = struct.unpack("!i", head)
                conn.recv(length - 4, socket.MSG_WAITALL)
                conn.sendall(
                    frame(b"R", struct.pack("!i", 0))
                    + frame(b"K", struct.pack("!i", 4242) + b"\x01\x02\x03\x04")
                    + frame(b"Z", b"I")
                )
                conn.recv(1)  # the first byte of the client's first message
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.dropped.set()

    def close(self) -> None:
        self.listener.close()
        self._thread.join(5)
