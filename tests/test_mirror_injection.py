"""Nothing is injected: not through crafted identifiers (quotes, spaces, ``"``, ``;``, ``--``,
``$$`` in schema, table and column names), not through a mapping expression or filter holding
string literals with ``'``, ``$$`` and backslashes, not through the application's own comments
and dollar-quoted strings. Every table stays intact and every value lands exactly, in the
source and in the target, in both mirror modes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos

SCHEMA = '''
CREATE SCHEMA "we'ird ""sch""";
CREATE TABLE "we'ird ""sch"""."src ""q"" tab" (
    "i d" bigint PRIMARY KEY,
    "na""me" text NOT NULL,
    "semi;colon --" text,
    "$$dollar" text,
    "back\\slash" text
);
CREATE TABLE public."Mixed ""Case"" Ünits" ("Id" int PRIMARY KEY, "Ünit" text);
CREATE SCHEMA "v2 ""x""";
CREATE TABLE "v2 ""x"""."tgt 'tab'" (
    "k""ey" bigint PRIMARY KEY,
    "full ""name""" text NOT NULL,
    "note'; DROP TABLE users; --" text,
    "lit" text
);
CREATE TABLE "v2 ""x"""."units" ("id" int PRIMARY KEY, "unit ""u""" text);
'''

SKIP = "skip'; DROP TABLE users; --"
WEIRD = {
    "name": "weird",
    "source": '"we\'ird ""sch"""."src ""q"" tab"',
    "target": '"v2 ""x"""."tgt \'tab\'"',
    "key": ['k"ey'],
    "filter": "\"semi;colon --\" IS DISTINCT FROM 'skip''; DROP TABLE users; --'",
    "columns": {
        'k"ey': '"i d"',
        'full "name"': "\"na\"\"me\" || ' it''s $$ \\ $q$ ' || coalesce(\"back\\slash\", '')",
        "note'; DROP TABLE users; --": '"semi;colon --"',
        "lit": "E'tab\\there \\' quote' || $x$ $$ dollar $x$ || coalesce(\"$$dollar\", 'NULL')",
    },
}
UNITS = {
    "name": "units",
    "source": '"Mixed ""Case"" Ünits"',  # unqualified: resolved through search_path
    "target": '"v2 ""x""".units',
    "key": ["id"],
    "columns": {"id": '"Id"', 'unit "u"': "upper(\"Ünit\") || '$$'"},
}

TABLE = '"we\'ird ""sch"""."src ""q"" tab"'
COLUMNS = '("i d", "na""me", "semi;colon --", "$$dollar", "back\\slash")'


def expected_target(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """The mapping of one source row, computed here in Python."""
    key, name, semi, dollar, backslash = row
    return (
        key,
        name + " it's $$ \\ $q$ " + (backslash or ""),
        semi,
        "tab\there ' quote" + " $$ dollar " + (dollar if dollar is not None else "NULL"),
    )


def relations(db) -> list[tuple[str, str]]:
    return db.sql(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2"
    )


@pytest.mark.parametrize("mode", ["outbox", "sync"])
def test_crafted_identifiers_literals_and_comments_inject_nothing(db, sidecar, mode):
    pos.load_schema(db)  # the real tables, which an injection would try to drop
    db.sql(SCHEMA)
    db.sql(
        "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
        "VALUES (1, 'victim@x', 'V', 'Ictim', 'customer')"
    )
    migration = {"mappings": [{**WEIRD, "mode": mode}, {**UNITS, "mode": mode}]}
    pos.run_setup(db, migration)
    handle = sidecar({**migration, "applier": {"poll_interval_seconds": 0.05}})
    before = relations(db)
    rewritten = pos.counter_by_mapping("dualwrite_statements_rewritten_total")

    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        # simple protocol: literals, comments and dollar quotes that look like SQL
        conn.execute(
            f"/* leading ; DROP TABLE users; */ INSERT INTO {TABLE} {COLUMNS} VALUES "
            "(1, $q$ ) ; DROP TABLE users; -- $q$, /* ) ; DROP TABLE users; */ 'a''b', "
            "E'\\\\x', $$ $q$ ' $$) -- trailing ) ; DROP TABLE users"
        )
        conn.execute(
            f'INSERT INTO {TABLE} AS "t;--" {COLUMNS} VALUES '
            "(2, 'it''s', 'plain', NULL, '\\'), "
            f"(3, $tag$'; DROP TABLE users; --$tag$, {pos._literal(SKIP)}, '$$', NULL) "
            'RETURNING "t;--"."i d", "na""me" -- no newline at the end'
        )
        conn.execute(
            f'UPDATE {TABLE} SET "na""me" = $body$ \'; DROP TABLE users; -- $body$ '
            'WHERE "i d" = 2 /* ; */ RETURNING "i d"; -- after the statement'
        )
        # extended protocol: the same text as parameters
        conn.execute(
            f"INSERT INTO {TABLE} {COLUMNS} VALUES (%s, %s, %s, %s, %s)",
            (4, "'); DROP TABLE users; --", "/* x */", "$$; DROP TABLE users; $$", "\\'"),
        )
        conn.execute(f'UPDATE {TABLE} SET "semi;colon --" = %s WHERE "i d" = %s', (SKIP, 4))
        conn.execute(
            'INSERT INTO "Mixed ""Case"" Ünits" ("Id", "Ünit") VALUES (1, \'m²\'), (2, $$x\'$$)'
        )

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(handle.dsn())
        try:
            await conn.execute(
                f"INSERT INTO {TABLE} {COLUMNS} VALUES ($1, $2, $3, $4, $5)",
                5,
                "$q$",
                "--",
                "'",
                "\\\\",
            )
            await conn.execute(
                'UPDATE "Mixed ""Case"" Ünits" SET "Ünit" = $1 WHERE "Id" = 2', "ünit'; --"
            )
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    if mode == "outbox":
        pos.drain(handle)

    assert relations(db) == before
    assert db.sql("SELECT email FROM users") == [("victim@x",)]
    source = db.sql(f"SELECT * FROM {TABLE} ORDER BY 1")
    assert source == [
        (1, " ) ; DROP TABLE users; -- ", "a'b", "\\x", " $q$ ' "),
        (2, " '; DROP TABLE users; -- ", "plain", None, "\\"),
        (3, "'; DROP TABLE users; --", SKIP, "$$", None),
        (4, "'); DROP TABLE users; --", SKIP, "$$; DROP TABLE users; $$", "\\'"),
        (5, "$q$", "--", "'", "\\\\"),
    ]
    target = db.sql('SELECT * FROM "v2 ""x"""."tgt \'tab\'" ORDER BY 1')
    assert target == [expected_target(row) for row in source if row[2] != SKIP]
    assert db.sql('SELECT * FROM "v2 ""x""".units ORDER BY 1') == [(1, "M²$$"), (2, "ÜNIT'; --$$")]
    moved = pos.counter_delta(rewritten, "dualwrite_statements_rewritten_total")
    assert moved == {"weird": 6, "units": 2}
