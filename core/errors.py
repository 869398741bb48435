"""The one error taxonomy of dualwrite: every error we raise on purpose, and every
ErrorResponse the proxy itself sends a client.

Raised (exceptions):

    DualwriteError                      base; ``exit_code`` says what the CLI exits with
    ├── ConfigError                     the config file or environment is wrong (exit 2)
    │   ├── ConfigErrors                several at once: every one of a file's problems
    │   ├── MappingValidationError      a mapping does not match the live database (exit 2)
    │   └── WalNotReady                 the database cannot serve a WAL-captured mapping (exit 2)
    ├── ProtocolViolation               a client broke the wire protocol (PROTOCOL_VIOLATION)
    │   └── MessageTooLarge             a length field is negative or over the limit (same)
    ├── UpstreamUnavailable             the PostgreSQL server cannot be reached
    │                                   (UPSTREAM_UNAVAILABLE)
    ├── DatabaseUnreachable             an operator command cannot connect (exit 2)
    ├── WalDecodeError                  a pgoutput message the WAL reader cannot decode
    └── ControlSchemaMissing            `dualwrite setup` has not been run (exit 2)

Sent (one ``ClientError`` table entry per reason the proxy answers a client itself; each
builds its ErrorResponse with ``.response(**fields)``):

    ClientError                         SQLSTATE  severity  when
    ├── ADMIN_SHUTDOWN                  57P01     FATAL     the sidecar is draining or its
    │                                                       grace period is over
    ├── STARTING_SHUTDOWN               57P03     FATAL     a client starts up while draining
    ├── TOO_MANY_CLIENTS                53300     FATAL     max_client_connections reached
    ├── PROTOCOL_VIOLATION              08P01     FATAL     bad frames (ProtocolViolation)
    ├── STARTUP_TIMEOUT                 08P01     FATAL     no finished startup in time
    ├── UNSUPPORTED_PROTOCOL            0A000     FATAL     a protocol version other than 3
    ├── STATEMENT_REJECTED              0A000     ERROR     a write the mapping's policy refuses
    ├── UPSTREAM_UNAVAILABLE            08006     FATAL     connecting upstream failed
    ├── UPSTREAM_CLOSED                 08006     FATAL     the server dropped the connection
    └── INTERNAL_ERROR                  XX000     FATAL     a bug of ours ended the session

Errors that reach an operator name the config path or mapping and the reason; errors that
reach a client are one of the table's entries, so no SQLSTATE or message is written by hand
anywhere else.
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: ErrorResponse / NoticeResponse field codes (the protocol's one-byte field types) that
#: dualwrite sets or reads; the codec and the reply repair use these, so they live here once
FIELD_SEVERITY: Final = ord("S")
FIELD_SEVERITY_NONLOCALIZED: Final = ord("V")
FIELD_CODE: Final = ord("C")
FIELD_MESSAGE: Final = ord("M")
FIELD_DETAIL: Final = ord("D")
FIELD_HINT: Final = ord("H")
FIELD_POSITION: Final = ord("P")
FIELD_CONTEXT: Final = ord("W")


def build_fields(fields: Iterable[tuple[int, bytes]]) -> bytes:
    """The body of an ErrorResponse or NoticeResponse: each field code, value, NUL; then NUL."""
    return b"".join(bytes((code,)) + value + b"\x00" for code, value in fields) + b"\x00"


def encode_error_response(
    sqlstate: str,
    message: str,
    *,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """An ErrorResponse frame as the server would send it (severity, SQLSTATE, message...)."""
    fields: list[tuple[int, str]] = [
        (FIELD_SEVERITY, severity),
        (FIELD_SEVERITY_NONLOCALIZED, severity),
        (FIELD_CODE, sqlstate),
        (FIELD_MESSAGE, message),
    ]
    if detail:
        fields.append((FIELD_DETAIL, detail))
    if hint:
        fields.append((FIELD_HINT, hint))
    body = build_fields((code, value.encode("utf-8", "replace")) for code, value in fields)
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


@dataclass(frozen=True)
class ClientError:
    """One reason the proxy answers a client with an ErrorResponse of its own."""

    sqlstate: str
    #: a ``str.format`` template; its fields are passed to ``response``
    message: str
    severity: str = "FATAL"
    hint: str | None = None

    @property
    def fields(self) -> frozenset[str]:
        """The names ``response`` needs to fill the message."""
        return frozenset(name for _, name, _, _ in string.Formatter().parse(self.message) if name)

    def text(self, **fields: object) -> str:
        return self.message.format(**fields)

    def response(self, *, detail: str | None = None, **fields: object) -> bytes:
        """The ErrorResponse frame, the message filled from ``fields``."""
        return encode_error_response(
            self.sqlstate,
            self.text(**fields),
            severity=self.severity,
            detail=detail,
            hint=self.hint,
        )


ADMIN_SHUTDOWN: Final = ClientError("57P01", "terminating connection due to administrator command")
STARTING_SHUTDOWN: Final = ClientError("57P03", "the database system is shutting down")
TOO_MANY_CLIENTS: Final = ClientError("53300", "sorry, too many clients already")
PROTOCOL_VIOLATION: Final = ClientError("08P01", "{reason}")
STARTUP_TIMEOUT: Final = ClientError(
    "08P01", "timeout expired before the connection finished starting up"
)
UNSUPPORTED_PROTOCOL: Final = ClientError(
    "0A000", "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
)
STATEMENT_REJECTED: Final = ClientError(
    "0A000",
    "{message}",
    severity="ERROR",
    hint="The mapping's unsupported policy is reject; rewrite the statement or change the policy.",
)
UPSTREAM_UNAVAILABLE: Final = ClientError("08006", "{reason}")
UPSTREAM_CLOSED: Final = ClientError("08006", "upstream server closed the connection unexpectedly")
INTERNAL_ERROR: Final = ClientError("XX000", "dualwrite: internal error; the connection was closed")

#: the table: every ErrorResponse the proxy sends of its own, by name
CLIENT_ERRORS: Final[dict[str, ClientError]] = {
    "ADMIN_SHUTDOWN": ADMIN_SHUTDOWN,
    "STARTING_SHUTDOWN": STARTING_SHUTDOWN,
    "TOO_MANY_CLIENTS": TOO_MANY_CLIENTS,
    "PROTOCOL_VIOLATION": PROTOCOL_VIOLATION,
    "STARTUP_TIMEOUT": STARTUP_TIMEOUT,
    "UNSUPPORTED_PROTOCOL": UNSUPPORTED_PROTOCOL,
    "STATEMENT_REJECTED": STATEMENT_REJECTED,
    "UPSTREAM_UNAVAILABLE": UPSTREAM_UNAVAILABLE,
    "UPSTREAM_CLOSED": UPSTREAM_CLOSED,
    "INTERNAL_ERROR": INTERNAL_ERROR,
}


class DualwriteError(Exception):
    """Base of every deliberate dualwrite error."""

    exit_code: int = 1


class ConfigError(DualwriteError):
    """A configuration value is missing, unknown or invalid; ``path`` names the key."""

    exit_code = 2

    def __init__(self, path: str, reason: str, *, source: str | None = None) -> None:
        self.path = path
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{path}: {reason}" if path else f"{where}{reason}")


class ConfigErrors(ConfigError):
    """Every problem found in one config file, unknown keys first; ``path`` is the first's."""

    def __init__(self, problems: list[tuple[str, str]], *, source: str | None = None) -> None:
        self.problems = problems
        if len(problems) == 1:
            super().__init__(*problems[0], source=source)
            return
        where = f"{source}: " if source else ""
        listing = "\n".join(f"  {path}: {reason}" for path, reason in problems)
        DualwriteError.__init__(self, f"{where}{len(problems)} errors:\n{listing}")
        self.path, self.reason = problems[0]
        self.source = source


class MappingValidationError(ConfigError):
    """A mapping was checked against the live database and does not fit it."""

    def __init__(self, mapping: str, reason: str, *, source: str | None = None) -> None:
        self.mapping = mapping
        super().__init__(f"mappings[{mapping}]", reason, source=source)


class WalNotReady(ConfigError):
    """The database cannot serve the WAL reader yet: each problem says what to change
    (wal_level, max_replication_slots, the REPLICATION attribute, a replica identity)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("wal", "; ".join(problems))


class ControlSchemaMissing(DualwriteError):
    """The dualwrite control schema is absent or older than this version needs."""

    exit_code = 2


class ProtocolViolation(DualwriteError):
    """The client sent bytes that are not valid PostgreSQL protocol v3."""

    client_error: ClientError = PROTOCOL_VIOLATION

    def response(self) -> bytes:
        """The ErrorResponse that tells the client what it broke."""
        return self.client_error.response(reason=str(self))


class MessageTooLarge(ProtocolViolation):
    """A message length field is negative or above ``limits.max_message_bytes``."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        if length < 4:
            super().__init__(f"invalid message length {length}")
        else:
            super().__init__(f"message of {length} bytes exceeds the limit of {limit} bytes")


class UpstreamUnavailable(DualwriteError):
    """The upstream PostgreSQL server refused or dropped the connection."""

    client_error: ClientError = UPSTREAM_UNAVAILABLE

    def response(self) -> bytes:
        """The ErrorResponse that tells the client why it has no server."""
        return self.client_error.response(reason=str(self))


class DatabaseUnreachable(DualwriteError):
    """A command cannot connect: no such database, a closed port, a wrong password..."""

    exit_code = 2


class WalDecodeError(DualwriteError):
    """A logical-decoding message that is truncated or of a kind the reader does not know.

    The reader stops without confirming anything past the last good transaction, so the
    changes are read again after a fix, never skipped."""
