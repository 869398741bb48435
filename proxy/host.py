"""What a session needs from the proxy that hosts it: the SessionHost protocol and the
MirrorContext it hands every session.

Sessions (proxy/session.py) and their relay core (proxy/relay.py) depend on this interface,
not on ProxyServer, so the server can import sessions without the two importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from core.config import Config
from core.control import ActivityRecorder
from core.errors import ClientError
from proxy.cancel import CancelRegistry
from proxy.rewrite import Rewriter
from proxy.shadow.tap import ShadowTap
from proxy.traffic import TrafficRecorder


@dataclass
class MirrorContext:
    """What sessions need to mirror writes: the rewriter and where activity is recorded."""

    #: None: nothing is mirrored (shadow reads alone)
    rewriter: Rewriter | None
    recorder: ActivityRecorder
    #: notes statement texts for lint's traffic evidence (None: traffic.enabled is false)
    traffic: TrafficRecorder | None = None
    #: samples reads for the shadow replay (None: shadow reads are off)
    shadow: ShadowTap | None = None


class SessionHost(Protocol):
    """The proxy around a session (ProxyServer; a stub in the relay core's tests)."""

    @property
    def config(self) -> Config: ...

    @property
    def mirror(self) -> MirrorContext | None:
        """None: relay only, nothing is mirrored."""

    @property
    def cancels(self) -> CancelRegistry: ...

    def admission(self) -> ClientError | None:
        """Why a client that has just sent its StartupMessage is refused now, or None."""

    def session_started(self, session: Any) -> None:
        """The session's client socket is accepted (``session`` is a proxy.session.Session)."""

    def session_closed(self, session: Any) -> None:
        """The session is over; forget it."""
