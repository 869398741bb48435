"""The one error taxonomy of dualwrite: every error we raise on purpose is one of these.

    DualwriteError                      base; ``exit_code`` says what the CLI exits with
    ├── ConfigError                     the config file or environment is wrong (exit 2)
    │   ├── ConfigErrors                several at once: every one of a file's problems
    │   ├── MappingValidationError      a mapping does not match the live database (exit 2)
    │   └── WalNotReady                 the database cannot serve a WAL-captured mapping (exit 2)
    ├── ProtocolViolation               a client broke the wire protocol (SQLSTATE 08P01)
    │   └── MessageTooLarge             a length field is negative or over the limit (08P01)
    ├── ClientRefused                   the proxy will not serve this client now
    │   ├── TooManyConnections          max_client_connections reached (53300)
    │   ├── StartupTimeout              no complete startup packet in time (08P01)
    │   └── ShuttingDown                the sidecar is draining (57P01)
    ├── UpstreamUnavailable             the PostgreSQL server cannot be reached (08006)
    ├── DatabaseUnreachable             an operator command cannot connect (exit 2)
    ├── StatementRejected               a write the mapping's policy refuses (0A000)
    ├── MirrorError                     the applier could not copy keys to the target
    ├── WalDecodeError                  a pgoutput message the WAL reader cannot decode
    └── ControlSchemaMissing            `dualwrite setup` has not been run (exit 2)

Errors that reach a client carry a SQLSTATE and are sent as a PostgreSQL ErrorResponse;
errors that reach an operator name the config path or mapping and the reason.
"""

from __future__ import annotations


class DualwriteError(Exception):
    """Base of every deliberate dualwrite error."""

    exit_code: int = 1
    sqlstate: str = "XX000"
    severity: str = "ERROR"


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

    sqlstate = "08P01"
    severity = "FATAL"


class MessageTooLarge(ProtocolViolation):
    """A message length field is negative or above ``limits.max_message_bytes``."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        if length < 4:
            super().__init__(f"invalid message length {length}")
        else:
            super().__init__(f"message of {length} bytes exceeds the limit of {limit} bytes")


class ClientRefused(DualwriteError):
    """The sidecar declines this client connection."""

    severity = "FATAL"


class TooManyConnections(ClientRefused):
    sqlstate = "53300"


class StartupTimeout(ClientRefused):
    sqlstate = "08P01"


class ShuttingDown(ClientRefused):
    sqlstate = "57P01"


class UpstreamUnavailable(DualwriteError):
    """The upstream PostgreSQL server refused or dropped the connection."""

    sqlstate = "08006"
    severity = "FATAL"


class DatabaseUnreachable(DualwriteError):
    """A command cannot connect: no such database, a closed port, a wrong password..."""

    exit_code = 2


class StatementRejected(DualwriteError):
    """A write to a mapped table that cannot be mirrored, under policy ``reject``."""

    sqlstate = "0A000"


class WalDecodeError(DualwriteError):
    """A logical-decoding message that is truncated or of a kind the reader does not know.

    The reader stops without confirming anything past the last good transaction, so the
    changes are read again after a fix, never skipped."""


class MirrorError(DualwriteError):
    """Copying keys from source to target failed (the keys are dead-lettered, not lost)."""
