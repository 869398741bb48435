"""Opening connections to the upstream PostgreSQL server: TCP, then TLS when the config asks."""

from __future__ import annotations

import asyncio
import ssl
from typing import TypeVar

from core.config import UpstreamConfig, UpstreamTLSConfig
from core.errors import UpstreamUnavailable
from proxy.wire.messages import build_ssl_request

P = TypeVar("P", bound=asyncio.Protocol)


def tls_context(tls: UpstreamTLSConfig) -> ssl.SSLContext | None:
    """The client-side SSL context for the upstream, or None when TLS is off."""
    if tls.mode == "disable":
        return None
    if tls.mode in ("prefer", "require"):
        # libpq semantics: encrypt, but do not verify the server's certificate.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(tls.ca_file))
        context.check_hostname = tls.mode == "verify-full"
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    return context


class _SSLAnswer(asyncio.Protocol):
    """Reads the one-byte answer to an SSLRequest before the real protocol takes over."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.extra = b""

    def data_received(self, data: bytes) -> None:
        if not self.answer.done():
            self.answer.set_result(data[:1])
            self.extra = data[1:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("upstream closed during SSL negotiation"))


async def connect_upstream(config: UpstreamConfig, protocol: P) -> tuple[asyncio.Transport, P]:
    """Connect ``protocol`` to the upstream server; negotiate TLS first when configured.

    Raises :class:`UpstreamUnavailable` with the reason when the server cannot be reached.
    """
    loop = asyncio.get_running_loop()
    context = tls_context(config.tls)
    try:
        async with asyncio.timeout(config.connect_timeout_seconds):
            if context is None:
                transport, _ = await loop.create_connection(
                    lambda: protocol, config.host, config.port
                )
                return transport, protocol
            raw, probe = await loop.create_connection(_SSLAnswer, config.host, config.port)
            raw.write(build_ssl_request())
            answer = await probe.answer
            if answer != b"S":
                raw.close()
                if config.tls.mode == "prefer":
                    transport, _ = await loop.create_connection(
                        lambda: protocol, config.host, config.port
                    )
                    return transport, protocol
                raise UpstreamUnavailable("upstream server does not support TLS")
            hostname = config.tls.server_name or config.host
            tls_transport = await loop.start_tls(raw, protocol, context, server_hostname=hostname)
            if tls_transport is None:
                raise UpstreamUnavailable("TLS handshake with the upstream server failed")
            return tls_transport, protocol
    except TimeoutError:
        raise UpstreamUnavailable(
            f"timed out connecting to upstream server {config.host}:{config.port}"
        ) from None
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UpstreamUnavailable(
            f"could not connect to upstream server {config.host}:{config.port}: {reason}"
        ) from None
