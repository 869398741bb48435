"""Every connection dualwrite opens to PostgreSQL: DSNs without passwords, failures as one line.

``check_dsn`` is the one rule for a DSN written in the config file: a postgresql:// URL with no
password anywhere (not in the user info, not as a query parameter however it is spelt or
percent-encoded). ``connect`` and ``create_pool`` wrap asyncpg's so that an operator mistake
(a database that does not exist, a closed port, a wrong password, an unknown role) is a
``DatabaseUnreachable`` naming the DSN without its password, which the CLI prints as one line
and exits 2 for, instead of a traceback.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import asyncpg

from core.errors import DatabaseUnreachable

_SCHEMES = ("postgres", "postgresql")
#: asyncpg and libpq both percent-decode query keys: ``pass%77ord`` is ``password``
_PASSWORD_PARAMS = ("password", "sslpassword")
#: what an unreachable database raises while connecting (asyncpg's own errors included)
CONNECT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.ClientConfigurationError,
    ValueError,
)


def check_dsn(value: str) -> str:
    """A postgresql:// URL with no password in it; ValueError saying what to do otherwise."""
    parts = urlsplit(value)
    if parts.scheme not in _SCHEMES:
        raise ValueError("must be a postgresql:// URL")
    in_query = [
        key
        for key, _ in parse_qsl(parts.query, keep_blank_values=True)
        if key.strip().lower() in _PASSWORD_PARAMS
    ]
    if _has_userinfo_password(parts.netloc) or in_query:
        where = f"query parameter {in_query[0]!r}" if in_query else "user info"
        raise ValueError(
            f"must not contain a password ({where}); set PGPASSWORD or use .pgpass (or "
            "DUALWRITE_SERVICE_DSN for the service connection) instead"
        )
    return value


def _has_userinfo_password(netloc: str) -> bool:
    """True when ``user:password@`` appears (for any of several comma-separated hosts)."""
    userinfo, at, _ = netloc.rpartition("@")
    return bool(at) and ":" in userinfo


def safe_dsn(dsn: str) -> str:
    """The DSN as it may be printed: the user info's password and password parameters masked."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "(unparsable DSN)"
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hosts}" if at else hosts
    query = "&".join(
        f"{key}=***" if key.strip().lower() in _PASSWORD_PARAMS else f"{key}={val}"
        for key, val in parse_qsl(parts.query, keep_blank_values=True)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def unreachable(dsn: str, exc: BaseException) -> DatabaseUnreachable:
    """The one-line error for a failed connection attempt to ``dsn``."""
    reason = str(exc).splitlines()[0].strip() if str(exc).strip() else type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError):
        reason = "timed out"
    return DatabaseUnreachable(f"cannot connect to {safe_dsn(dsn)}: {reason}")


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect`` whose failure is a DatabaseUnreachable (exit 2), never a traceback."""
    try:
        return await asyncpg.connect(dsn, **kwargs)
    except CONNECT_ERRORS as exc:
        raise unreachable(dsn, exc) from None


async def create_pool(dsn: str, **kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` (its first connections open now), failing like ``connect``."""
    try:
        pool = await asyncpg.create_pool(dsn, **kwargs)
    except CONNECT_ERRORS as exc:
        raise unreachable(dsn, exc) from None
    assert pool is not None
    return pool
