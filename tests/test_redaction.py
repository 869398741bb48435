"""Row values never reach the dead-letter table or the logs (issue 11, item 12).

A target that rejects rows answers with the row in its DETAIL. The applier's dead letters and
``key_dead_lettered`` log line, and repair's ``repair_rejected`` line, keep the SQLSTATE and
the constraint name and show values only for the mapping's ``compare.reveal_columns``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import asyncpg
from test_compare_support import config_data, prepare

from compare.reconciler import PassOptions, reconcile_mapping
from core.control import MappingStates
from core.logs import configure_logging
from core.redact import describe_error, redact_detail
from mirror.applier import Applier

_TABLES = """
CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL, name text);
CREATE SCHEMA v2;
CREATE TABLE v2.customers (
    id int PRIMARY KEY,
    email text NOT NULL CONSTRAINT customers_email_domain CHECK (email NOT LIKE '%@x'),
    name text
);
CREATE UNIQUE INDEX customers_email_unique ON v2.customers (email);
INSERT INTO v2.customers VALUES (99, 'dup@y.example', 'Other Person');
INSERT INTO customers VALUES
    (1, 'bad@x', 'Alice Secretname'),
    (2, 'dup@y.example', 'Bob Hiddenname'),
    (3, 'ok@z.example', 'Carol');
"""
#: values that must not appear anywhere stored or logged (unless revealed)
PRIVATE = ("bad@x", "Alice Secretname", "dup@y.example", "Bob Hiddenname")


def _mapping(reveal: list[str]) -> dict[str, Any]:
    return {
        "name": "customers",
        "source": "customers",
        "target": "v2.customers",
        "key": ["id"],
        "columns": {"id": "id", "email": "email", "name": "name"},
        "compare": {"reveal_columns": reveal},
    }


async def _dead_letter_all(dsn: str, reveal: list[str]) -> tuple[list[asyncpg.Record], str]:
    config, mappings = await prepare(config_data(dsn, [_mapping(reveal)]))
    mapping = mappings["customers"]
    logs = io.StringIO()
    configure_logging("info", "json", stream=logs)
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await pool.execute(
            "INSERT INTO dualwrite.outbox (mapping, key) "
            "SELECT 'customers', jsonb_build_array(id) FROM customers"
        )
        applier = Applier(pool, [mapping], config.applier, MappingStates())
        outcome = await applier.apply_batch(mapping)
        assert (outcome.claimed, outcome.dead_lettered) == (3, 2)
        rows = await pool.fetch(
            "SELECT key::text, sqlstate, error FROM dualwrite.dead_letters ORDER BY key"
        )
    finally:
        await pool.close()
        configure_logging("warning", "console")
    return list(rows), logs.getvalue()


async def test_dead_letters_and_their_log_lines_keep_sqlstate_and_constraint_not_values(db):
    db.sql(_TABLES)
    rows, logs = await _dead_letter_all(db.dsn, reveal=[])
    assert [(r["key"], r["sqlstate"]) for r in rows] == [("[1]", "23514"), ("[2]", "23505")]
    check, unique = rows[0]["error"], rows[1]["error"]
    assert "constraint customers_email_domain" in check
    assert "DETAIL: Failing row contains ([redacted])." in check
    assert "constraint customers_email_unique" in unique
    assert "DETAIL: Key (email)=([redacted]) already exists." in unique
    lines = [json.loads(line) for line in logs.splitlines() if "key_dead_lettered" in line]
    assert {(line["sqlstate"], line["constraint"]) for line in lines} == {
        ("23514", "customers_email_domain"),
        ("23505", "customers_email_unique"),
    }
    for value in PRIVATE:
        assert value not in check + unique, value
        assert value not in logs, value


async def test_a_revealed_column_shows_its_value_and_a_failing_row_stays_redacted(db):
    db.sql(_TABLES)
    rows, logs = await _dead_letter_all(db.dsn, reveal=["email"])
    check, unique = rows[0]["error"], rows[1]["error"]
    assert "DETAIL: Key (email)=(dup@y.example) already exists." in unique
    assert "DETAIL: Failing row contains ([redacted])." in check
    assert "Alice Secretname" not in check + logs
    assert "bad@x" not in check


async def test_repair_rejections_are_logged_without_values(db):
    db.sql(_TABLES)
    config, mappings = await prepare(config_data(db.dsn, [_mapping([])]))
    logs = io.StringIO()
    configure_logging("info", "json", stream=logs)
    try:
        result = await reconcile_mapping(
            config, mappings["customers"], PassOptions(repair=True, requested_by="test")
        )
    finally:
        configure_logging("warning", "console")
    assert result.repair is not None
    rejected = [
        json.loads(line) for line in logs.getvalue().splitlines() if "repair_rejected" in line
    ]
    assert {line["sqlstate"] for line in rejected} == {"23514", "23505"}
    for value in PRIVATE:
        assert value not in logs.getvalue(), value


def test_data_exception_messages_lose_their_values_and_unknown_details_are_redacted():
    exc = asyncpg.exceptions.InvalidTextRepresentationError(
        'invalid input syntax for type integer: "4111-1111"'
    )
    assert describe_error(exc) == '22P02: invalid input syntax for type integer: "[redacted]"'
    assert redact_detail('Token "secret" is invalid.') == "[redacted]"
    assert (
        redact_detail("Key (a, b)=(1, x) conflicts with existing key (a, b)=(1, y).", ["a", "b"])
        == "[redacted]"
    )
    assert redact_detail("Key (a, b)=(1, x) already exists.", ["a"]) == (
        "Key (a, b)=([redacted]) already exists."
    )
