"""The rewrite sees what PostgreSQL sees (issue 11, items 4 to 8).

- Any spelling PostgreSQL resolves to a mapped table is that table: ``U&"\\0061udit_log"``.
- ``standard_conforming_strings = off`` changes where literals end: the proxy lexes as the
  server will, and where it cannot know the setting (a pipeline that may change it) a statement
  that lexes differently under the two settings gets the mapping's ``unsupported`` policy.
- Invalid UTF-8 naming a mapped table: ERROR 22021 from the server, the session stays open.
- A session's ``search_path`` cannot change what a mapping expression computes.
- A temp table or a session ``search_path`` changes which table an unqualified name means: the
  mirror follows the table the statement actually wrote.

Every statement goes through the real proxy, to a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos

SCHEMA = """
CREATE TABLE orders (
    id bigint PRIMARY KEY, status text NOT NULL, amount numeric NOT NULL DEFAULT 0
);
CREATE TABLE audit_log (id bigint PRIMARY KEY, action text NOT NULL);
CREATE SCHEMA app;
CREATE TABLE app.items (id bigint PRIMARY KEY, name text NOT NULL);
CREATE SCHEMA v2;
CREATE TABLE v2.orders (id bigint PRIMARY KEY, status text NOT NULL, amount numeric);
CREATE TABLE v2.audit_log (id bigint PRIMARY KEY, action text NOT NULL);
CREATE TABLE v2.items (id bigint PRIMARY KEY, name text NOT NULL);
CREATE TABLE app.events (id bigint PRIMARY KEY, kind text NOT NULL) PARTITION BY RANGE (id);
CREATE TABLE app.events_low PARTITION OF app.events FOR VALUES FROM (0) TO (100);
CREATE TABLE app.events_high PARTITION OF app.events FOR VALUES FROM (100) TO (200);
CREATE TABLE v2.events (id bigint PRIMARY KEY, kind text NOT NULL);
INSERT INTO audit_log VALUES (1, 'login'), (2, 'sale');
"""


def mappings(mode: str = "sync") -> dict[str, Any]:
    return {
        "mappings": [
            {
                "name": "orders",
                "source": "orders",
                "target": "v2.orders",
                "key": ["id"],
                "columns": {"id": "id", "status": "upper(status) || '!'", "amount": "amount"},
                "mode": mode,
                "unsupported": "passthrough",
            },
            {
                "name": "audit",
                "source": "public.audit_log",
                "target": "v2.audit_log",
                "key": ["id"],
                "columns": {"id": "id", "action": "action"},
                "mode": "sync",
                "unsupported": "reject",
            },
            {
                "name": "items",
                "source": "app.items",
                "target": "v2.items",
                "key": ["id"],
                "columns": {"id": "id", "name": "name"},
                "mode": mode,
                "unsupported": "passthrough",
            },
            {
                "name": "events",
                "source": "app.events",
                "target": "v2.events",
                "key": ["id"],
                "columns": {"id": "id", "kind": "kind"},
                "mode": mode,
                "unsupported": "passthrough",
            },
        ]
    }


def start(db, sidecar, mode: str = "sync"):
    db.sql(SCHEMA)
    config = mappings(mode)
    pos.run_setup(db, config)
    db.sql("INSERT INTO v2.audit_log SELECT * FROM audit_log")
    return sidecar({**config, "applier": {"poll_interval_seconds": 0.05}})


def target_orders(db) -> list[tuple[Any, ...]]:
    return db.sql("SELECT id, status FROM v2.orders ORDER BY id")


def audit_rows(db) -> int:
    return int(db.scalar("SELECT count(*) FROM audit_log"))


# --- 4: Unicode-escape identifiers ---------------------------------------------------------------


def test_unicode_escape_spellings_of_a_mapped_table_are_that_table(db, sidecar):
    handle = start(db, sidecar)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO U&\"\\006Frders\" (id, status) VALUES (1, 'paid')")
        conn.execute("UPDATE U&\"!006Frders\" UESCAPE '!' SET amount = 5 WHERE id = 1 RETURNING id")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="mapping audit"):
            conn.execute('TRUNCATE U&"\\0061udit_log"')

        # asyncpg: the extended protocol
        async def extended() -> None:
            client = await asyncpg.connect(handle.dsn())
            try:
                await client.execute(
                    'INSERT INTO U&"\\006Frders" (id, status) VALUES ($1, $2)', 2, "open"
                )
            finally:
                await client.close()

        asyncio.run(extended())
    # psql: the simple protocol from libpq's own client
    result = subprocess.run(
        [
            "psql",
            handle.dsn(),
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            'TRUNCATE public.U&"\\0061udit_log"',
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "mapping audit" in result.stderr, result.stderr
    assert target_orders(db) == [(1, "PAID!"), (2, "OPEN!")]
    assert db.scalar("SELECT amount FROM v2.orders WHERE id = 1") == 5
    assert audit_rows(db) == 2


# --- 5: standard_conforming_strings ---------------------------------------------------------------

#: one SELECT of one literal when backslashes are literal; a SELECT, then a write, when not
HIDDEN_INSERT = "SELECT 'a\\'\n' ; INSERT INTO orders (id, status) VALUES (3, $$paid$$) -- '"
HIDDEN_TRUNCATE = "SELECT 'a\\'\n' ; TRUNCATE audit_log -- '"
#: one read when backslashes are literal; a write to audit_log in a CTE when not
HIDDEN_CTE = (
    "WITH x AS (SELECT 'a\\'\n' AS a), y AS (INSERT INTO audit_log VALUES (9, $$x$$) "
    "RETURNING 1) SELECT 1 FROM x, y -- ') SELECT 1"
)


def test_standard_conforming_strings_off_is_lexed_as_the_server_lexes(db, sidecar):
    handle = start(db, sidecar)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        cursor = psycopg.ClientCursor(conn)  # the simple protocol, several statements a Query
        cursor.execute("SET standard_conforming_strings = off")
        cursor.execute(HIDDEN_INSERT)
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="mapping audit"):
            cursor.execute(HIDDEN_TRUNCATE)
        # a literal with backslashes, rewritten: the value is what the server made of it
        cursor.execute("INSERT INTO orders (id, status) VALUES (4, 'tab\\there') RETURNING id")
        assert cursor.fetchall() == [(4,)]
        # the extended protocol, and an error position behind a literal the proxy re-spelled
        conn.execute("INSERT INTO orders (id, status) VALUES (5, 'x\\'y')")
        failing = "INSERT INTO orders (id, status) VALUES (6, 'a\\\\b' || nope)"
        with pytest.raises(psycopg.errors.UndefinedColumn) as caught:
            conn.execute(failing)
        assert caught.value.diag.statement_position == str(failing.index("nope") + 1)
        cursor.execute("SET standard_conforming_strings = on")
        cursor.execute("INSERT INTO orders (id, status) VALUES (7, 'b\\') RETURNING id")
    assert target_orders(db) == [
        (3, "PAID!"),
        (4, "TAB\tHERE!"),
        (5, "X'Y!"),
        (7, "B\\!"),
    ]
    assert db.sql("SELECT status FROM orders WHERE id = 4") == [("tab\there",)]
    assert audit_rows(db) == 2


def test_a_prepared_write_shape_is_not_reused_once_the_lexing_changed(db, sidecar):
    handle = start(db, sidecar)
    text = "INSERT INTO orders (id, status) VALUES ({}, 'a\\' || 'b')"
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        cursor = psycopg.ClientCursor(conn)
        for key in (20, 21, 22):  # often enough for a shape to be prepared and reused
            cursor.execute(text.format(key))
        cursor.execute("SET standard_conforming_strings = off")
        # now 'a\' || ' is one literal and the statement does not parse: as PostgreSQL says
        with pytest.raises(psycopg.errors.SyntaxError):
            cursor.execute(text.format(23))
    assert target_orders(db) == [(20, "A\\B!"), (21, "A\\B!"), (22, "A\\B!")]
    assert db.scalar("SELECT count(*) FROM orders WHERE id = 23") == 0


def test_a_pipeline_that_may_change_the_lexing_gets_the_unsupported_policy(db, sidecar):
    handle = start(db, sidecar)

    def pipelined(conn: psycopg.Connection[Any]) -> None:
        # one batch: the SET is not answered when the next statement arrives
        with conn.pipeline():
            conn.execute("SET standard_conforming_strings = off")
            conn.execute(HIDDEN_CTE)

    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="mapping audit"):
            pipelined(conn)
        # the error rolled the batch back, SET included
        assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
        conn.execute(HIDDEN_CTE)  # a read, as sent
        # known again once the SET is answered: lexed as the server lexes
        conn.execute("SET standard_conforming_strings = off")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="data-modifying WITH"):
            conn.execute(HIDDEN_CTE)
    assert audit_rows(db) == 2


# --- 6: invalid UTF-8 -----------------------------------------------------------------------------


def test_invalid_utf8_naming_a_mapped_table_gets_postgresql_s_error(db, sidecar):
    handle = start(db, sidecar)
    bad = b"INSERT INTO orders (id, status) VALUES (8, '\xff\xfe')"
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            conn.execute(bad)  # extended protocol
        with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
            psycopg.ClientCursor(conn).execute(bad)  # simple protocol
        conn.execute("INSERT INTO orders (id, status) VALUES (8, 'ok')")
    assert target_orders(db) == [(8, "OK!")]


# --- 7: the session's search_path and the mapping's expressions ---------------------------------

EVIL = """
CREATE SCHEMA evil;
CREATE FUNCTION evil.upper(text) RETURNS text LANGUAGE sql AS $$SELECT 'HACKED'$$;
CREATE FUNCTION evil.cat(text, text) RETURNS text LANGUAGE sql AS $$SELECT 'CAT'$$;
CREATE OPERATOR evil.|| (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.cat);
CREATE FUNCTION evil.same(text, text) RETURNS boolean LANGUAGE sql AS $$SELECT true$$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.same);
CREATE FUNCTION evil.jsonb_build_array(bigint) RETURNS jsonb LANGUAGE sql
    AS $$SELECT '[666]'::jsonb$$;
GRANT USAGE ON SCHEMA evil TO PUBLIC;
"""


@pytest.mark.parametrize("mode", ["sync", "outbox"])
def test_a_session_search_path_cannot_change_what_the_mapping_computes(db, sidecar, mode):
    handle = start(db, sidecar, mode)
    db.sql(EVIL)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("SET search_path = evil, pg_catalog, public")
        conn.execute("INSERT INTO orders (id, status) VALUES (1, 'paid')")
        conn.execute("INSERT INTO orders (id, status) VALUES (2, 'open') RETURNING id")
        # the upsert's "did it change" test must not use the session's = for text
        conn.execute("UPDATE orders SET status = 'shipped' WHERE id = %s", (1,))
        conn.execute("DELETE FROM orders WHERE id = 2")
    if mode == "outbox":
        assert db.sql("SELECT DISTINCT key::text FROM dualwrite.outbox ORDER BY 1") == [
            ("[1]",),
            ("[2]",),
        ]
        pos.drain(handle)
    assert target_orders(db) == [(1, "SHIPPED!")]


# --- 8: temp tables and the session's search_path decide which table is written -------------


def test_the_mirror_follows_the_table_an_unqualified_name_means(db, sidecar):
    handle = start(db, sidecar)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO orders (id, status) VALUES (1, 'real')")
        # a temp table of the same name comes first in every session's path
        conn.execute("CREATE TEMP TABLE orders (LIKE public.orders INCLUDING DEFAULTS)")
        conn.execute("INSERT INTO orders (id, status) VALUES (1, 'phantom'), (2, 'phantom')")
        conn.execute("UPDATE orders SET status = %s WHERE id = %s", ("phantom too", 2))
        conn.execute("DELETE FROM orders WHERE id = 1 RETURNING id")
        conn.execute("INSERT INTO public.orders (id, status) VALUES (3, 'qualified')")
        # the reverse: a path that reaches mapped tables the configured path does not
        conn.execute("SET search_path = app, public")
        conn.execute("INSERT INTO items (id, name) VALUES (1, 'widget')")
        conn.execute("UPDATE items SET name = 'gadget' WHERE id = 1 RETURNING name")
        conn.execute("INSERT INTO events (id, kind) VALUES (1, 'low'), (150, 'high')")
    db.sql("CREATE TABLE app.events_top PARTITION OF app.events FOR VALUES FROM (200) TO (300)")

    async def extended() -> None:
        client = await asyncpg.connect(handle.dsn(), server_settings={"search_path": "app"})
        try:
            await client.execute("INSERT INTO events (id, kind) VALUES ($1, $2)", 250, "top")
            await client.execute("CREATE TEMP TABLE items (LIKE app.items)")
            await client.execute("INSERT INTO items (id, name) VALUES ($1, $2)", 1, "phantom")
            await client.execute("DELETE FROM items WHERE id = $1", 1)
        finally:
            await client.close()

    asyncio.run(extended())
    assert target_orders(db) == [(1, "REAL!"), (3, "QUALIFIED!")]
    assert db.sql("SELECT * FROM v2.items") == [(1, "gadget")]
    assert db.sql("SELECT * FROM v2.events ORDER BY id") == [
        (1, "low"),
        (150, "high"),
        (250, "top"),
    ]
