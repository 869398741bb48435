"""What a mirror mode means, and start-up validation: every statement a part will run for a
mapping is prepared before traffic, and a sync mapping needs the delete function setup made."""

from __future__ import annotations

import json

import asyncpg
import pytest
from test_compare_support import config_data

from compare.commands import load_mappings
from core.config import parse_config
from core.control import install
from core.errors import ConfigError, MappingValidationError
from core.modes import MirrorMode
from dualwrite.service import setup, validated_mappings

_TABLES = """
CREATE TABLE items (id int PRIMARY KEY, label text, price int);
CREATE SCHEMA v2;
CREATE TABLE v2.items (id int PRIMARY KEY, label text, price int);
"""


def _mapping(**extra: object) -> dict[str, object]:
    return {
        "name": "items",
        "source": "items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "label": "label", "price": "price"},
        **extra,
    }


async def _validate(dsn: str, data: dict[str, object]) -> list[str]:
    config = parse_config(data)
    conn = await asyncpg.connect(dsn)
    try:
        mappings = await validated_mappings(conn, config)
    finally:
        await conn.close()
    return [m.name for m in mappings]


def test_each_mode_says_what_it_means_and_reads_and_prints_as_its_name():
    sync, outbox = MirrorMode.SYNC, MirrorMode.OUTBOX
    assert (sync.statement_writes_target, outbox.statement_writes_target) == (True, False)
    assert (sync.key_sync_locks_rows, outbox.key_sync_locks_rows) == (True, False)
    assert (sync.app_role_writes_target, outbox.app_role_writes_target) == (True, False)
    assert (sync.needs_delete_function, outbox.needs_delete_function) == (True, False)
    assert (sync.allows_target_dsn, outbox.allows_target_dsn) == (False, True)

    config = parse_config({"mappings": [_mapping(mode="sync")]})
    assert config.mappings[0].mode is MirrorMode.SYNC
    assert json.loads(json.dumps(config.model_dump(mode="json")))["mappings"][0]["mode"] == "sync"
    assert f"({config.mappings[0].mode})" == "(sync)"
    assert parse_config({"mappings": [_mapping()]}).mappings[0].mode is MirrorMode.OUTBOX

    with pytest.raises(ConfigError) as bad:
        parse_config({"mappings": [_mapping(mode="SYNC")]})
    assert bad.value.path == "mappings[0].mode"
    with pytest.raises(ConfigError) as elsewhere:
        parse_config({"mappings": [_mapping(mode="sync", target_dsn="postgresql://h/other")]})
    assert "mode sync needs the target in the same database" in str(elsewhere.value)


async def test_a_sync_mapping_needs_the_delete_function_setup_made_and_unchanged(db):
    db.sql(_TABLES)
    data = config_data(db.dsn, [_mapping(mode="sync")])
    await setup(parse_config(data))
    assert await _validate(db.dsn, data) == ["items"]

    db.sql("ALTER FUNCTION dualwrite.mirror_delete__items(jsonb) RENAME TO kept")
    with pytest.raises(MappingValidationError) as missing:
        await _validate(db.dsn, data)
    assert "function dualwrite.mirror_delete__items is missing" in str(missing.value)
    assert "dualwrite setup" in str(missing.value)
    # outbox mode never calls it
    assert await _validate(db.dsn, config_data(db.dsn, [_mapping()])) == ["items"]

    db.sql(
        "CREATE FUNCTION dualwrite.mirror_delete__items(_dualwrite_keys jsonb) RETURNS bigint "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN 0; END $$"
    )
    with pytest.raises(MappingValidationError) as changed:
        await _validate(db.dsn, data)
    assert "does not match the mapping" in str(changed.value)

    await setup(parse_config(data))
    assert await _validate(db.dsn, data) == ["items"]


async def test_what_the_rewrite_and_sync_keys_run_is_prepared_at_start(db):
    db.sql(_TABLES)
    # reads fine from the source, but text cannot be assigned to the target's int column
    text_into_int = _mapping(columns={"id": "id", "label": "label", "price": "label"})
    data = config_data(db.dsn, [text_into_int])
    with pytest.raises(MappingValidationError) as sidecar:
        await setup(parse_config(data))
    assert "upsert into target: column \"price\" is of type integer" in str(sidecar.value)

    # reconcile and backfill run no rewrite, only sync_keys (repair, backfill): its statements
    conn = await asyncpg.connect(db.dsn)
    try:
        await install(conn)
    finally:
        await conn.close()
    with pytest.raises(MappingValidationError) as compare:
        await load_mappings(parse_config(data))
    assert "apply keys: column \"price\" is of type integer" in str(compare.value)


async def test_an_expression_that_is_not_per_row_is_refused(db):
    db.sql(_TABLES)
    # a valid select list, but one row's value would depend on the others
    window = _mapping(columns={"id": "id", "label": "label", "price": "sum(price) OVER ()"})
    with pytest.raises(MappingValidationError) as refused:
        await setup(parse_config(config_data(db.dsn, [window])))
    assert "per-row expressions: window functions are not allowed" in str(refused.value)
