"""The admin HTTP server (aiohttp): /metrics, /healthz, /readyz, /status and token-guarded actions.

What the endpoints report and do is injected by the service wiring as plain callables, so this
module knows nothing of the applier or compare/ (proxy/ never imports compare/).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from dualwrite.config import AdminConfig
from dualwrite.logs import get_logger

_log = get_logger("admin")

#: a readiness check: returns (ok, detail)
Check = Callable[[], Awaitable[tuple[bool, str]]]
#: an action: gets the request's JSON body and path parameters, returns a JSON-able result
Action = Callable[[Mapping[str, str], Mapping[str, Any]], Awaitable[Mapping[str, Any]]]


@dataclass
class AdminHooks:
    """What the service wiring plugs into the admin server."""

    checks: dict[str, Check] = field(default_factory=dict)
    status: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    #: route ("/actions/mappings/{name}/pause") -> action
    actions: dict[str, Action] = field(default_factory=dict)
    #: called after every action attempt with (route, params, outcome) for the audit trail
    audit: Callable[[str, Mapping[str, str], str], Awaitable[None]] | None = None


class AdminServer:
    """Serves the admin endpoints on ``admin.host:admin.port``."""

    def __init__(self, config: AdminConfig, hooks: AdminHooks) -> None:
        self.config = config
        self.hooks = hooks
        self.app = web.Application()
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/status", self._status)
        for route, action in hooks.actions.items():
            self.app.router.add_post(route, self._guarded(route, action))
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = config.port

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await self._site.start()
        sockets = getattr(self._site._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        _log.info("admin_listening", host=self.config.host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        results: dict[str, dict[str, Any]] = {}
        ready = True
        for name, check in self.hooks.checks.items():
            try:
                ok, detail = await check()
            except Exception as exc:  # a failing check is a not-ready answer, not a 500
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            results[name] = {"ok": ok, "detail": detail}
            ready = ready and ok
        return web.json_response(
            {"ready": ready, "checks": results}, status=200 if ready else 503
        )

    async def _status(self, _request: web.Request) -> web.Response:
        if self.hooks.status is None:
            return web.json_response({})
        return web.json_response(dict(await self.hooks.status()))

    def _guarded(
        self, route: str, action: Action
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            params = dict(request.match_info)
            if not self._authorized(request):
                await self._audit(route, params, "unauthorized")
                return web.json_response({"error": "missing or invalid bearer token"}, status=401)
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                return web.json_response({"error": "body must be JSON"}, status=400)
            try:
                result = await action(params, body if isinstance(body, dict) else {})
            except KeyError as exc:
                await self._audit(route, params, "not_found")
                return web.json_response({"error": f"unknown {exc.args[0]}"}, status=404)
            except Exception as exc:
                await self._audit(route, params, f"failed: {type(exc).__name__}")
                _log.exception("admin_action_failed", route=route)
                return web.json_response({"error": str(exc)}, status=500)
            await self._audit(route, params, "ok")
            return web.json_response(dict(result))

        return handler

    def _authorized(self, request: web.Request) -> bool:
        expected = os.environ.get(self.config.token_env, "")
        if not expected:
            return False  # no token configured: actions are disabled
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())

    async def _audit(self, route: str, params: Mapping[str, str], outcome: str) -> None:
        _log.info("admin_action", route=route, params=dict(params), outcome=outcome)
        if self.hooks.audit is not None:
            await self.hooks.audit(route, params, outcome)
