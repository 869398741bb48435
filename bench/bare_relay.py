"""The floor for a Python relay: a TCP forwarder on uvloop that reads nothing it forwards.

`python -m bench.bare_relay LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT`. The relay benchmark runs
it beside pgbouncer and dualwrite so the table shows how much of dualwrite's cost is the
event loop and the sockets (which any asyncio relay pays) and how much is dualwrite's own.
Not a product: no protocol, no limits, no backpressure, no error handling beyond closing.
"""

from __future__ import annotations

import asyncio
import sys

try:
    import uvloop
except ImportError:  # pragma: no cover - the benchmark reports which loop ran
    uvloop = None  # type: ignore[assignment]


class _Upstream(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client.upstream_ready(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _Client(asyncio.Protocol):
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.pending = bytearray()
        self.upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(lambda: _Upstream(self), self.host, self.port)
        )

    def upstream_ready(self, transport: asyncio.Transport) -> None:
        self.upstream = transport
        if self.pending:
            transport.write(bytes(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _serve(listen_port: int, host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(host, port), "127.0.0.1", listen_port)
    await server.serve_forever()


def main(argv: list[str]) -> None:
    listen_port, host, port = int(argv[0]), argv[1], int(argv[2])
    if uvloop is not None:
        uvloop.run(_serve(listen_port, host, port))
    else:
        asyncio.run(_serve(listen_port, host, port))


if __name__ == "__main__":
    main(sys.argv[1:])
