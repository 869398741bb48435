"""Structured logging for every dualwrite process: one structlog pipeline, JSON by default."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

#: a key whose value is a secret, matched on the key lower-cased without ``_``, ``-`` and ``.``
#: (``db_password``, ``apiKey``, ``X-Api-Key``, ``refresh_token``, ``service_dsn``...)
_SECRET_KEY = re.compile(
    r"pass(word|wd)|pwd|secret|token|apikey|authorization|credential|dsn|privatekey|cookie"
)
REDACTED = "[redacted]"
#: containers deeper than this are replaced whole (a hostile body cannot make us recurse)
_MAX_DEPTH = 20
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def is_secret_key(key: object) -> bool:
    """Whether a field of this name holds a secret (by pattern, not by an exact list)."""
    if not isinstance(key, str):
        return False
    return _SECRET_KEY.search(re.sub(r"[-_.\s]", "", key.lower())) is not None


def without_secrets(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON-like value with the value of every secret-named key masked, at any
    depth (dicts inside lists inside dicts...)."""
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {
            k: REDACTED if is_secret_key(k) else without_secrets(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [without_secrets(v, depth + 1) for v in value]
    return value


def redact_secrets(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A processor that masks every field named like a secret, at any depth."""
    for key, value in list(event.items()):
        if key == "event":
            continue
        if is_secret_key(key):
            event[key] = REDACTED
        elif isinstance(value, (Mapping, list, tuple)):
            event[key] = without_secrets(value)
    return event


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Install the processor pipeline; safe to call again (tests, CLI re-entry)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger bound to a component name (``proxy``, ``applier``, ``reconcile``...)."""
    return structlog.get_logger(component=component)
