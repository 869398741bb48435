"""Helpers shared by the tests/test_compare_* files (this module holds no tests).

A test builds its tables with SQL and a config dict for them, runs ``dualwrite.service.setup``
(what ``dualwrite setup`` runs) and binds its mappings with
``dualwrite.service.validated_mappings``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import yaml

from compare.reconciler import PassOptions, PassResult, reconcile_mapping
from core.config import Config, parse_config
from core.mapping import CompiledMapping
from dualwrite.service import setup, validated_mappings


def config_data(dsn: str, mappings: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A config dict for the test database: quiet logs, small chunks, no re-check delay."""
    data: dict[str, Any] = {
        "service_dsn": dsn,
        "logging": {"level": "warning"},
        "reconcile": {"chunk_rows": 10, "recheck_delay_seconds": 0, "max_samples": 1000},
        "mappings": mappings,
    }
    for key, value in sections.items():
        if isinstance(value, Mapping) and isinstance(data.get(key), Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


async def prepare(data: dict[str, Any]) -> tuple[Config, dict[str, CompiledMapping]]:
    """``dualwrite setup`` for a config dict: install the control schema, bind the mappings."""
    config = parse_config(data)
    await setup(config)
    conn = await asyncpg.connect(config.service_dsn)
    try:
        mappings = await validated_mappings(conn, config)
    finally:
        await conn.close()
    return config, {m.name: m for m in mappings}


async def reconcile(config: Config, mapping: CompiledMapping, **options: Any) -> PassResult:
    result = await reconcile_mapping(config, mapping, PassOptions(**options))
    assert result.status == "done", result.error
    return result


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dualwrite_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dualwrite", *args]


def run_dualwrite(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m dualwrite ARGS`` to completion, output captured."""
    return subprocess.run(
        dualwrite_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def findings(dsn: str, run_id: int) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT class, key::text AS key, tenant, columns, expected::text AS expected, "
            "actual::text AS actual FROM dualwrite.reconcile_findings WHERE run_id = $1 "
            "ORDER BY class, key",
            run_id,
        )
    finally:
        await conn.close()
    return [dict(r) for r in rows]


def keys_of(rows: list[dict[str, Any]], cls: str) -> set[str]:
    return {r["key"] for r in rows if r["class"] == cls}
