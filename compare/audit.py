"""``dualwrite repairs``: the repairs on record, for auditors (read-only).

Each repair is listed with who asked, when, why, how many keys it covered and what it wrote;
``--images`` adds each row's target image before and after (redacted to the mapping's
``reveal_columns``, as the reconciler recorded them). Dry runs are listed and marked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from compare.connections import connect
from compare.progress import format_table
from compare.report.format import timestamp_text
from compare.report.history import database_now, read_repairs
from compare.report.model import Repair
from core.config import Config, parse_duration
from core.control import ensure_current
from core.errors import ConfigError

FORMATS = ("text", "json")


async def repairs_command(
    config: Config,
    *,
    since: str = "7d",
    mapping: str | None = None,
    images: bool = False,
    fmt: str = "text",
    say: Callable[[str], None] = print,
) -> int:
    """Print the repairs since ``since`` (newest first); exit 0 (2 on a usage error)."""
    try:
        back = parse_duration(since)
    except ValueError as exc:
        raise ConfigError("--since", str(exc)) from None
    if mapping is not None:
        config.mapping(mapping)  # an unknown name is a ConfigError
    settings = {"default_transaction_read_only": "on", "application_name": "dualwrite-repairs"}
    conn = await connect(config.effective_service_dsn(), settings, "service_dsn")
    try:
        await ensure_current(conn)
        now = await database_now(conn)
        repairs = await read_repairs(
            conn, now - back, mapping=mapping, dry_runs=True, images=images
        )
    finally:
        await conn.close()
    say(render_json(repairs) if fmt == "json" else render_text(repairs, now - back, images))
    return 0


def render_json(repairs: Sequence[Repair]) -> str:
    return json.dumps([asdict(r) for r in repairs], indent=2, default=_json_default)


def _json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render_text(repairs: Sequence[Repair], since: datetime, images: bool) -> str:
    if not repairs:
        return f"no repairs since {timestamp_text(since)}"
    headers = ["repair", "at", "mapping", "by", "why", "keys", "upserted", "deleted", "left"]
    rows = [
        [
            f"#{r.id}" + (" (dry run)" if r.dry_run else ""),
            timestamp_text(r.at),
            r.mapping,
            r.requested_by or "-",
            r.reason or "-",
            r.keys,
            r.upserted,
            r.deleted,
            "-" if r.divergent_after is None else r.divergent_after,
        ]
        for r in repairs
    ]
    lines = [format_table(headers, rows)]
    if images:
        for repair in repairs:
            lines.append(f"repair #{repair.id} ({repair.mapping}):")
            lines += [f"  {_image_line(image)}" for image in repair.images or []]
    return "\n".join(lines)


def _image_line(image: dict[str, Any]) -> str:
    key = json.dumps(image.get("key"))
    before = json.dumps(image.get("before")) if image.get("before") is not None else "(no row)"
    after = json.dumps(image.get("after")) if image.get("after") is not None else "(no row)"
    return f"{key} {image.get('class')}: {before} -> {after}"
