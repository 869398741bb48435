"""Driving the real relay core (proxy/relay.py) without sockets: a stub host, and a core
brought through a real startup and authentication to READY."""

from __future__ import annotations

from typing import Any

from core.config import Config, parse_config
from core.errors import ClientError
from core.logs import get_logger
from proxy.relay import Close, Connect, Effects, Relay, State, ToClient, ToServer
from proxy.wire import messages as m
from proxy.wire.frames import frame

AUTH_OK = frame(b"R", (0).to_bytes(4, "big"))
BACKEND_KEY = frame(b"K", (4242).to_bytes(4, "big") + b"\x00\x00\x00\x07")


def parameter_status(name: bytes, value: bytes) -> bytes:
    return frame(b"S", name + b"\x00" + value + b"\x00")


class StubHost:
    """A SessionHost with a real config, no mirror, and a scripted admission."""

    def __init__(self, config: Config | None = None, refusal: ClientError | None = None) -> None:
        self.config = config or parse_config({})
        self.mirror = None
        self.cancels = None
        self.refusal = refusal

    def admission(self) -> ClientError | None:
        return self.refusal

    def session_started(self, session: Any) -> None:
        pass

    def session_closed(self, session: Any) -> None:
        pass


def new_core(frontend: Any = None, host: StubHost | None = None) -> Relay:
    return Relay(host or StubHost(), get_logger("test"), frontend=frontend)


def to_ready(core: Relay) -> None:
    """StartupMessage, upstream connected, AuthenticationOk ... ReadyForQuery: READY."""
    _, effects = core.from_client(m.build_startup_message({"user": "u", "database": "d"}))
    assert list(effects) == [Connect()]
    assert core.state is State.CONNECT
    core.upstream_connected(tls=False)
    assert core.state is State.AUTH
    core.from_server(AUTH_OK + BACKEND_KEY + parameter_status(b"client_encoding", b"UTF8"))
    core.from_server(m.ready_for_query(b"I"))
    assert core.state is State.READY


def split(effects: Effects) -> tuple[bytes, bytes, bool]:
    """(bytes to the client, bytes to the server, closed) of a list of effects."""
    client, server, closed = b"", b"", False
    for effect in effects:
        if isinstance(effect, ToClient):
            client += effect.data
        elif isinstance(effect, ToServer):
            server += effect.data
        elif isinstance(effect, Close):
            closed = True
    return client, server, closed
