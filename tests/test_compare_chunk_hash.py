"""Cross-database chunk hashes: equal exactly when the rows compare equal.

A chunk whose hashes differ is compared row by row, so a wrong *difference* only costs time
and would pass the divergence tests unnoticed. These tests look at the hashes themselves:
equivalent encodings (numeric scale, -0, char(n) padding, jsonb key order, the session's
TimeZone) must hash alike, and real differences (including a value moved across a column
boundary, or NULL against '') must not.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from test_compare_support import config_data, prepare

from compare.statements import CompareSql

#: (column types, source row values, target row values, equal?) — values are SQL literals
CASES: list[tuple[str, str, str, str, bool]] = [
    ("numeric scale", "v numeric", "1.0", "1.00", True),
    ("numeric value", "v numeric", "1.0", "1.01", False),
    ("negative zero", "v double precision", "'-0'", "'0'", True),
    ("float value", "v double precision", "0.5", "0.25", False),
    ("char(n) padding", "v character(4)", "'ab'", "'ab  '", True),
    ("jsonb key order", "v jsonb", """'{"a": 1, "b": 2}'""", """'{"b": 2, "a": 1}'""", True),
    ("jsonb value", "v jsonb", """'{"a": 1}'""", """'{"a": 2}'""", False),
    ("text", "v text", "'abc'", "'abd'", False),
    ("NULL against ''", "v text", "NULL", "''", False),
    ("column boundary", "v text, w text", "'ab', 'c'", "'a', 'bc'", False),
    ("NULL column shift", "v text, w text", "NULL, 'a'", "'a', NULL", False),
    ("uuid", "v uuid", "md5('1')::uuid", "md5('2')::uuid", False),
    ("integer widths", "v bigint, w integer", "1, 2", "1, 2", True),
    ("timestamp", "v timestamp", "'2024-01-01 00:00:00.000001'", "'2024-01-01'", False),
    ("interval spelling", "v interval", "'1 day 1 mon'", "'24 hours 30 days'", True),
    ("interval value", "v interval", "'1 day'", "'25 hours'", False),
    ("bool", "v boolean", "true", "false", False),
]


async def _hashes(db, pg, columns: str, source: str, target: str, **extra: Any):
    other = pg.create_database()
    try:
        db.sql(f"CREATE TABLE s (id int PRIMARY KEY, {columns})")
        db.sql(f"INSERT INTO s VALUES (1, {source}), (2, {source})")
        other.sql(f"CREATE TABLE t (id int PRIMARY KEY, {columns})")
        other.sql(f"INSERT INTO t VALUES (1, {target}), (2, {target})")
        names = [c.split()[0] for c in columns.split(",")]
        mapping = {
            "name": "hashed",
            "source": "s",
            "target": "t",
            "key": ["id"],
            "columns": {c: c for c in ["id", *names]},
            "target_dsn": pg.dsn(other.name, password=""),
            **extra,
        }
        _, mappings = await prepare(config_data(db.dsn, [mapping]))
        sql = CompareSql(mappings["hashed"])
        found = []
        # different session settings on the two sides: the hash must not depend on them
        for side, dsn, zone in (("source", db.dsn, "UTC"), ("target", other.dsn, "Asia/Tokyo")):
            conn = await asyncpg.connect(dsn, server_settings={"TimeZone": zone})
            try:
                statement = sql.side_summary(side, None, None, 100, None)
                found.append(await conn.fetchrow(statement.sql, *statement.args))
            finally:
                await conn.close()
        return found
    finally:
        other.drop()


@pytest.mark.parametrize(
    ("columns", "source", "target", "equal"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_chunk_hashes_are_equal_exactly_when_rows_are(db, pg, columns, source, target, equal):
    source_side, target_side = await _hashes(db, pg, columns, source, target)
    assert source_side["rows"] == target_side["rows"] == 2
    assert (source_side["hash"] == target_side["hash"]) is equal


async def test_a_timestamptz_hashes_alike_whatever_the_sessions_time_zone(db, pg):
    value = "'2024-05-01 12:00:00+02'"
    source_side, target_side = await _hashes(db, pg, "v timestamptz", value, value)
    assert source_side["hash"] == target_side["hash"]


async def test_tolerance_rules_apply_to_chunk_hashes(db, pg):
    rules = {
        "compare": {
            "tolerances": [
                {"column": "v", "null_equals_empty": True},
                {"column": "w", "numeric_scale": 1},
            ]
        }
    }
    source_side, target_side = await _hashes(
        db, pg, "v text, w numeric", "NULL, 1.04", "'', 1.0", **rules
    )
    assert source_side["hash"] == target_side["hash"]
