"""The admin HTTP server (aiohttp): /metrics, /healthz, /readyz, /status and token-guarded actions.

What the endpoints report and do is injected by the service wiring as plain callables, so this
module imports nothing of proxy/, compare/ or mirror/, only core/. Read endpoints
are open; every POST under /actions/ needs ``Authorization: Bearer <token>`` (the token is read
from the environment variable named by ``admin.token_env`` on each request; unset: actions are
refused), and every attempt is logged and handed to the audit hook: authenticated ones one by
one (with every secret-named key of the body masked, at any depth), unauthenticated ones
aggregated per ``admin.unauthorized_audit_window_seconds`` (the first of a window at once, the
rest as one row with their count), so what anyone can write to the audit trail is bounded.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from core import metrics
from core.config import AdminConfig
from core.logs import get_logger, without_secrets

_log = get_logger("admin")

#: a readiness check: returns (ok, detail)
Check = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass(frozen=True)
class ActionResponse:
    """An action's answer when it is not a plain 200 (202 accepted, 409 conflict...)."""

    status: int
    body: Mapping[str, Any]


ActionResult = Mapping[str, Any] | ActionResponse
#: an action: gets the path parameters and the request's JSON body, returns a JSON-able result
Action = Callable[[Mapping[str, str], Mapping[str, Any]], Awaitable[ActionResult]]
#: the audit hook: (action, params, outcome); action is the route's last segment (pause,
#: resume, reconcile, or unknown); params hold the request path, the path parameters, the JSON
#: body (secrets redacted) and the caller's address
Audit = Callable[[str, Mapping[str, Any], str], Awaitable[None]]

#: the route every unknown /actions/... POST is answered (and audited) under
UNKNOWN_ACTION = "/actions/{unknown:.*}"
#: how long /metrics waits for the refresh hook before serving the gauges it has
REFRESH_TIMEOUT_SECONDS = 2.0
#: distinct callers and paths named in one window's summary of unauthenticated attempts
_SUMMARY_SAMPLES = 10


@dataclass
class AdminHooks:
    """What the service wiring plugs into the admin server."""

    checks: dict[str, Check] = field(default_factory=dict)
    status: Callable[[], Awaitable[Mapping[str, Any]]] | None = None
    #: brings gauges read from the database up to date; awaited (bounded) before /metrics
    refresh: Callable[[], Awaitable[None]] | None = None
    #: route ("/actions/mappings/{name}/pause") -> action
    actions: dict[str, Action] = field(default_factory=dict)
    #: called after every action attempt with (action, params, outcome) for the audit trail
    audit: Audit | None = None


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
        self.app.router.add_post(UNKNOWN_ACTION, self._guarded(UNKNOWN_ACTION, _unknown_action))
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.port = config.port
        self.unauthorized = UnauthorizedWindow(config.unauthorized_audit_window_seconds)
        self._summaries: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await self._site.start()
        sockets = getattr(self._site._server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        _log.info("admin_listening", host=self.config.host, port=self.port)
        self._summaries = asyncio.get_running_loop().create_task(self._summarize_unauthorized())
        if not _is_loopback(self.config.host):
            _log.warning(
                "admin_not_on_loopback",
                host=self.config.host,
                hint="/metrics and /status are readable by anyone who reaches this address",
            )

    async def stop(self) -> None:
        if self._summaries is not None:
            self._summaries.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.flush_unauthorized()

    async def _summarize_unauthorized(self) -> None:
        while True:
            await asyncio.sleep(self.config.unauthorized_audit_window_seconds)
            await self.flush_unauthorized()

    async def flush_unauthorized(self) -> None:
        """Audit the closed window's unauthenticated attempts as one row (none: nothing)."""
        summary = self.unauthorized.close()
        if summary is not None:
            await self._record("unauthorized", summary, "unauthorized")

    async def _metrics(self, _request: web.Request) -> web.Response:
        if self.hooks.refresh is not None:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                    await self.hooks.refresh()
            except Exception as exc:  # a slow or failing database must not fail the scrape
                _log.warning("metrics_refresh_failed", error=f"{type(exc).__name__}: {exc}")
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
            params: dict[str, Any] = {
                "path": request.path[:200],
                **request.match_info,
                "remote": request.remote,
            }
            if not self._authorized(request):
                return await self._unauthorized(route, params)
            try:
                body = await request.json() if request.body_exists else {}
            except web.HTTPRequestEntityTooLarge:
                return await self._refuse(route, params, 413, "too_large")
            except ValueError:
                return await self._refuse(route, params, 400, "bad_request")
            if not isinstance(body, dict):
                return await self._refuse(route, params, 400, "bad_request")
            params["body"] = without_secrets(body)
            return await self._run(route, action, params, request.match_info, body)

        return handler

    async def _run(
        self,
        route: str,
        action: Action,
        params: dict[str, Any],
        path_params: Mapping[str, str],
        body: Mapping[str, Any],
    ) -> web.Response:
        try:
            result = await action(path_params, body)
        except KeyError as exc:
            return await self._refuse(route, params, 404, "not_found", f"unknown {exc.args[0]}")
        except Exception as exc:
            _log.exception("admin_action_failed", route=route)
            await self._audit(route, params, f"failed: {type(exc).__name__}: {exc}"[:500])
            return web.json_response({"error": str(exc)}, status=500)
        status, answer = (
            (result.status, result.body) if isinstance(result, ActionResponse) else (200, result)
        )
        await self._audit(route, params, _outcome_of(status))
        return web.json_response(dict(answer), status=status)

    async def _refuse(
        self,
        route: str,
        params: Mapping[str, Any],
        status: int,
        outcome: str,
        error: str | None = None,
    ) -> web.Response:
        await self._audit(route, params, outcome)
        return web.json_response({"error": error or _REFUSALS[outcome]}, status=status)

    async def _unauthorized(self, route: str, params: Mapping[str, Any]) -> web.Response:
        """401; audited at once when it opens a window, else only counted for the summary."""
        action = action_name(route)
        metrics.ADMIN_ACTIONS.labels(action, "unauthorized").inc()
        if self.unauthorized.note(params):
            await self._record(action, params, "unauthorized")
        return web.json_response({"error": _REFUSALS["unauthorized"]}, status=401)

    def _authorized(self, request: web.Request) -> bool:
        expected = os.environ.get(self.config.token_env, "")
        if not expected:
            return False  # no token configured: actions are disabled
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), expected.encode())

    async def _audit(self, route: str, params: Mapping[str, Any], outcome: str) -> None:
        """Log the attempt and record it; a failing audit store is logged, never fatal."""
        action = action_name(route)
        metrics.ADMIN_ACTIONS.labels(action, outcome.split(":", 1)[0]).inc()
        await self._record(action, params, outcome)

    async def _record(self, action: str, params: Mapping[str, Any], outcome: str) -> None:
        route = str(params.get("path", action))
        _log.info("admin_action", action=action, params=dict(params), outcome=outcome)
        if self.hooks.audit is None:
            return
        try:
            await self.hooks.audit(action, params, outcome)
        except Exception as exc:  # the action's answer must still reach the caller
            metrics.ADMIN_AUDIT_FAILURES.inc()
            _log.error("admin_audit_failed", route=route, outcome=outcome, error=str(exc))


_REFUSALS = {
    "unauthorized": "missing or invalid bearer token",
    "bad_request": "body must be a JSON object",
    "not_found": "no such action",
    "too_large": "body too large",
}


class UnauthorizedWindow:
    """Counts unauthenticated attempts per window: the first of a window is audited at once,
    the others become one summary row when the window closes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.opened_at: float | None = None
        self.count = 0
        self.remotes: set[str] = set()
        self.paths: set[str] = set()

    def note(self, params: Mapping[str, Any]) -> bool:
        """Count one attempt; True when it opens a window (audit it on its own)."""
        now = time.monotonic()
        expired = self.opened_at is not None and now - self.opened_at >= self.seconds
        if self.opened_at is None or (expired and not self.count):
            return self._open(now)
        # counted into the open window (or one whose summary the next flush writes)
        self.count += 1
        if len(self.remotes) < _SUMMARY_SAMPLES:
            self.remotes.add(str(params.get("remote")))
        if len(self.paths) < _SUMMARY_SAMPLES:
            self.paths.add(str(params.get("path")))
        return False

    def _open(self, now: float) -> bool:
        self.opened_at, self.count = now, 0
        self.remotes.clear()
        self.paths.clear()
        return True

    def close(self) -> dict[str, Any] | None:
        """The summary of the attempts after the window's first (None: there were none)."""
        if self.opened_at is None:
            return None
        summary = {
            "attempts": self.count,
            "window_seconds": self.seconds,
            "remotes": sorted(self.remotes),
            "paths": sorted(self.paths),
        }
        had = self.count
        self.opened_at, self.count = None, 0
        self.remotes.clear()
        self.paths.clear()
        return summary if had else None


async def _unknown_action(_params: Mapping[str, str], _body: Mapping[str, Any]) -> ActionResult:
    raise KeyError("action")


def _outcome_of(status: int) -> str:
    if status < 300:
        return "ok" if status == 200 else "accepted"
    return "conflict" if status == 409 else f"refused_{status}"


def action_name(route: str) -> str:
    """The action a route performs: the last segment of its template (pause, resume...).

    Routes come from code, so the set is bounded and it can be a metric label.
    """
    return "unknown" if route == UNKNOWN_ACTION else route.rstrip("/").rsplit("/", 1)[-1]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
