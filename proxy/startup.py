"""Startup and authentication, sans-IO: the client's untyped first packets, and the server's
authentication exchange up to its first ReadyForQuery (with the SCRAM-PLUS surgery).

The relay core (proxy/relay.py) calls these while its state is STARTUP or AUTH. Nothing here
touches a socket: bytes in, packets or bytes-to-send out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from core.errors import UNSUPPORTED_PROTOCOL
from proxy.wire import messages as m
from proxy.wire.frames import FrameScanner, frame_end, type_table

#: PostgreSQL's own ceiling on the first packet (MAX_STARTUP_PACKET_LENGTH)
MAX_STARTUP_PACKET: Final = 10000
PROTOCOL_MAJOR: Final = 3
#: TLS and GSS encryption towards clients are not offered: the answer to both requests
NOT_SUPPORTED: Final = b"N"

#: the server's frames while authenticating: the ones looked at are reported
_AUTH_TABLE: Final = type_table({m.AUTHENTICATION, m.BACKEND_KEY_DATA, m.READY_FOR_QUERY})


class StartupReader:
    """Splits the client's startup-phase bytes into untyped packets."""

    __slots__ = ("buffer",)

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_packet(self) -> tuple[m.StartupPacket, bytes] | None:
        """The next complete packet and its raw bytes, or None until more bytes arrive.

        Raises ProtocolViolation for a length PostgreSQL would refuse.
        """
        buffer = self.buffer
        if len(buffer) < 4:
            return None
        length = m.startup_packet_length(bytes(buffer[:4]), MAX_STARTUP_PACKET)
        if len(buffer) < length:
            return None
        raw = bytes(buffer[:length])
        del buffer[:length]
        return m.parse_startup_packet(raw), raw

    def take_rest(self) -> bytes:
        """What followed the StartupMessage (typed messages a client pipelined)."""
        rest = bytes(self.buffer)
        self.buffer.clear()
        return rest


def is_encryption_request(packet: m.StartupPacket) -> bool:
    return packet.code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE)


def unsupported_protocol(packet: m.StartupPacket) -> bytes | None:
    """The ErrorResponse for a protocol version other than 3.x, or None when it is 3.x."""
    major, minor = packet.code >> 16, packet.code & 0xFFFF
    if major == PROTOCOL_MAJOR:
        return None
    return UNSUPPORTED_PROTOCOL.response(major=major, minor=minor)


@dataclass(slots=True)
class AuthStep:
    """What one read of the server's authentication frames asks the relay to do."""

    #: bytes for the client now (the frames up to and including the first ReadyForQuery)
    to_client: bytes
    #: the BackendKeyData of this connection, when this read carried it
    cancel_key: m.CancelKey | None = None
    #: the transaction status of the first ReadyForQuery, when this read carried it
    ready_status: bytes | None = None
    #: whole frames after the first ReadyForQuery (rare), for the READY path
    after_ready: bytes = b""


def authentication_step(buf: bytes, ready: int, *, upstream_tls: bool) -> AuthStep:
    """Relay authentication unchanged but for the SCRAM-PLUS surgery; note the cancel key;
    stop at the first ReadyForQuery. ``buf[:ready]`` holds whole frames only."""
    found = FrameScanner(_AUTH_TABLE).feed(bytes(buf[:ready]))
    frames, kinds, starts = found[0], found[2], found[3]
    if upstream_tls and m.AUTHENTICATION in kinds:
        frames = without_channel_binding(frames, kinds, starts)
        found = FrameScanner(_AUTH_TABLE).feed(frames)
        kinds, starts = found[2], found[3]
    step = AuthStep(frames)
    for typ, start in zip(kinds, starts, strict=True):
        if typ == m.BACKEND_KEY_DATA:
            step.cancel_key = m.parse_backend_key_data(frames[start + 5 : frame_end(frames, start)])
        elif typ == m.READY_FOR_QUERY:
            end = start + 6
            step.ready_status = frames[start + 5 : end]
            step.to_client = frames[:end]
            step.after_ready = frames[end:]
            break
    return step


def without_channel_binding(buf: bytes, kinds: bytes, starts: list[int]) -> bytes:
    """Drop SCRAM-SHA-256-PLUS from the server's offer (whole frames in, whole frames out).

    Over a TLS upstream the server offers channel binding, but the client's own connection
    (to the proxy) is plain text: libpq rightly refuses a -PLUS offer there as a downgrade.
    Without it the client binds nothing and says so ('n'), which the server accepts.
    """
    pieces: list[bytes] = []
    run = 0
    for typ, start in zip(kinds, starts, strict=True):
        end = frame_end(buf, start)
        if typ == m.AUTHENTICATION and m.auth_code(buf[start + 5 : end]) == m.AUTH_SASL:
            pieces += [buf[run:start], m.sasl_without_plus(buf[start + 5 : end])]
            run = end
    if not pieces:
        return buf
    return b"".join([*pieces, buf[run:]])
