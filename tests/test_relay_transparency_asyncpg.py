"""asyncpg sees the same results, errors, command tags and notifications through the proxy.

One scenario runs twice, directly against a fresh database and through the proxy against
another; every step's outcome goes into a transcript and the two transcripts must be equal.
asyncpg uses the extended protocol with binary results, pipelines ``executemany``, opens
portals with a row limit for cursors, runs binary COPY, and sends a CancelRequest of its own
when a query times out, so this covers what psql does not.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Awaitable
from typing import Any

import asyncpg
from support.transparency import Transcript, assert_same_transcript, metric, scrape

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (l int, r text);
CREATE TABLE items (
    id int PRIMARY KEY,
    name text NOT NULL,
    price numeric(10, 2),
    tags text[],
    attrs jsonb,
    seen timestamptz,
    raw bytea,
    mood mood,
    CHECK (price >= 0)
);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, pid int REFERENCES parent (id));
"""

TYPED_VALUES = """
SELECT 1::int2, 2::int4, 9223372036854775807::int8, 1.5::float4, 'NaN'::float8,
       123456789012345678901234567890.12345::numeric, 'NaN'::numeric, true, NULL::text,
       'ünïcødé 日本 😀', E'tab\\there', ''::text, '\\x00ff10'::bytea,
       date '2024-02-29', timestamp '2024-01-01 12:34:56.789', timestamptz '2024-06-01 00:00:00+02',
       'infinity'::timestamptz, time '23:59:59', interval '1 year 2 days 03:04:05',
       ARRAY[1, NULL, 3], ARRAY[['a', 'b'], ['c', NULL]], '{}'::int[],
       '{"k": [1, "two", null]}'::json, '{"b": 1, "a": [true]}'::jsonb,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '10.1.2.3/16'::inet, '[1,5)'::int4range,
       'happy'::mood, ROW(1, 'x')::pair, 'x'::"char", B'101'::bit(3), point(1, 2)
"""


async def step(log: Transcript, label: str, awaitable: Awaitable[Any]) -> Any:
    try:
        value = await awaitable
    except asyncpg.PostgresError as exc:
        log.failure(label, exc)
        return None
    log.ok(label, value)
    return value


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def scenario(dsn: str) -> Transcript:
    log = Transcript()
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "asyncpg-scenario"})
    other = await asyncpg.connect(dsn)
    notes: list[tuple[Any, ...]] = []
    notifications: list[tuple[Any, ...]] = []
    try:
        conn.add_log_listener(
            lambda _c, msg: notes.append(
                (msg.severity, msg.sqlstate, msg.message, msg.detail, msg.hint)
            )
        )
        log.ok("application_name", conn.get_settings().application_name)
        await step(log, "schema", conn.execute(SCHEMA))

        # --- typed values, binary results, parameters both ways ---------------------------
        await step(log, "typed values", conn.fetchrow(TYPED_VALUES))
        await step(
            log,
            "parameters round trip",
            conn.fetchrow(
                "SELECT $1::text, $2::int8, $3::numeric, $4::bytea, $5::text[], $6::jsonb, $7::int",
                "ü" * 1000,
                -(2**62),
                "-0.000001",
                bytes(range(256)),
                ["a", None, "c"],
                '{"x": 1}',
                None,
            ),
        )

        # --- execute and command tags ------------------------------------------------------
        await step(
            log,
            "insert",
            conn.execute(
                "INSERT INTO items (id, name, price, tags, attrs, seen, raw, mood) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                1,
                "first",
                "9.99",
                ["a", "b"],
                '{"size": "L"}',
                None,
                b"\x00\x01",
                "ok",
            ),
        )
        await step(
            log,
            "insert returning",
            conn.fetch(
                "INSERT INTO items (id, name) VALUES (2, 'two'), (3, 'three') RETURNING id, name"
            ),
        )
        await step(log, "update tag", conn.execute("UPDATE items SET price = 1 WHERE id > 1"))
        await step(log, "delete tag", conn.execute("DELETE FROM items WHERE id = 3"))
        await step(log, "simple multi", conn.execute("SELECT 1; UPDATE items SET name = name"))
        await step(log, "empty query", conn.fetch(""))

        # --- executemany pipelines Bind/Execute; a failing row fails the whole batch -----
        rows = [(i, f"bulk {i}", str(i % 50)) for i in range(100, 600)]
        await step(
            log,
            "executemany",
            conn.executemany(
                "INSERT INTO items (id, name, price) VALUES ($1, $2, $3::numeric)", rows
            ),
        )
        bad = [(i, f"again {i}", "1") for i in range(600, 700)] + [(100, "duplicate", "1")]
        await step(
            log,
            "executemany with a duplicate",
            conn.executemany(
                "INSERT INTO items (id, name, price) VALUES ($1, $2, $3::numeric)", bad
            ),
        )
        await step(log, "count after batches", conn.fetchval("SELECT count(*) FROM items"))

        # --- prepared statements -------------------------------------------------------------
        stmt = await conn.prepare("SELECT id, name, price FROM items WHERE id >= $1 ORDER BY id")
        log.ok("attributes", [(a.name, a.type.name) for a in stmt.get_attributes()])
        log.ok("parameters", [p.name for p in stmt.get_parameters()])
        await step(log, "prepared fetch", stmt.fetch(590))
        await step(log, "prepared fetchrow", stmt.fetchrow(101))
        await step(log, "prepared fetchval", stmt.fetchval(599, column=1))
        await step(log, "prepared bad argument", stmt.fetch("not an int"))

        # --- transactions and savepoints ----------------------------------------------------
        async with conn.transaction():
            await conn.execute("INSERT INTO items (id, name) VALUES (10, 'ten')")
            log.ok("in transaction", conn.is_in_transaction())
            try:
                async with conn.transaction():  # a savepoint
                    await conn.execute("INSERT INTO items (id, name) VALUES (11, 'eleven')")
                    await conn.execute("INSERT INTO items (id, name) VALUES (10, 'dup')")
            except asyncpg.PostgresError as exc:
                log.failure("savepoint rolled back", exc)
            await conn.execute("INSERT INTO items (id, name) VALUES (12, 'twelve')")
        log.ok("after commit", conn.is_in_transaction())
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO items (id, name) VALUES (13, 'thirteen')")
                await conn.execute("INSERT INTO items (id, name, price) VALUES (14, 'x', -1)")
        except asyncpg.PostgresError as exc:
            log.failure("failed transaction", exc)
        try:
            async with conn.transaction(isolation="serializable", readonly=True):
                await conn.execute("DELETE FROM items")
        except asyncpg.PostgresError as exc:
            log.failure("read-only transaction", exc)
        await step(log, "ids 10-14", conn.fetch("SELECT id FROM items WHERE id BETWEEN 10 AND 14"))

        # --- cursors: portals executed with a row limit (PortalSuspended) ------------------
        async with conn.transaction():
            seen = [
                r["g"]
                async for r in conn.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=37)
            ]
            log.ok("cursor iteration", (len(seen), sum(seen)))
            cur = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
            await step(log, "cursor fetch", cur.fetch(5))
            await step(log, "cursor forward", cur.forward(50))
            await step(log, "cursor fetchrow", cur.fetchrow())

        # --- COPY both ways, text and binary ------------------------------------------------
        csv_in = io.BytesIO(b'1000,from csv,1.50\n1001,"quoted, comma",\n1002,\xc3\xbc,0\n')
        await step(
            log,
            "copy_to_table csv",
            conn.copy_to_table(
                "items", source=csv_in, columns=["id", "name", "price"], format="csv"
            ),
        )
        records = [(i, f"record {i}", None) for i in range(2000, 3000)]
        await step(
            log,
            "copy_records_to_table",
            conn.copy_records_to_table("items", records=records, columns=["id", "name", "price"]),
        )
        bad_csv = io.BytesIO(b"3000,ok,1\n3001,bad,not-a-number\n")
        await step(
            log,
            "copy_to_table bad data",
            conn.copy_to_table(
                "items", source=bad_csv, columns=["id", "name", "price"], format="csv"
            ),
        )
        out = io.BytesIO()
        await step(
            log,
            "copy_from_query csv",
            conn.copy_from_query(
                "SELECT id, name, price, tags FROM items ORDER BY id", output=out, format="csv"
            ),
        )
        log.ok("copy_from_query bytes", hashlib.sha256(out.getvalue()).hexdigest())
        binary_out = io.BytesIO()
        await step(
            log,
            "copy_from_table binary",
            conn.copy_from_table(
                "items", columns=["id", "name"], output=binary_out, format="binary"
            ),
        )
        log.ok("binary copy size", len(binary_out.getvalue()))

        # --- errors of several kinds, extended and simple protocol -------------------------
        for label, sql in [
            ("syntax", "SELEC 1"),
            ("undefined table", "SELECT * FROM nowhere"),
            ("division by zero", "SELECT 1 / 0"),
            ("fk violation", "INSERT INTO child VALUES (1, 42)"),
            ("not null", "INSERT INTO items (id) VALUES (5000)"),
            (
                "raise",
                "DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = 'P0099', "
                "DETAIL = 'the detail', HINT = 'the hint'; END $$",
            ),
        ]:
            await step(log, f"{label} (fetch)", conn.fetch(sql))
            await step(log, f"{label} (execute)", conn.execute(sql))
        await step(log, "usable after errors", conn.fetchval("SELECT 'still here'"))

        # --- notices ------------------------------------------------------------------------
        await conn.execute(
            "DO $$ BEGIN RAISE NOTICE 'hello %', 1; "
            "RAISE WARNING 'careful' USING DETAIL = 'd', HINT = 'h'; END $$"
        )
        await wait_for(lambda: len(notes) >= 2, "two notices")
        log.ok("notices", list(notes))

        # --- LISTEN/NOTIFY callbacks, from this connection and another ---------------------
        own_pid = conn.get_server_pid()
        other_pid = other.get_server_pid()
        await conn.add_listener(
            "events",
            lambda _c, pid, channel, payload: notifications.append(
                (channel, payload, {own_pid: "self", other_pid: "other"}.get(pid, "unknown"))
            ),
        )
        await other.execute("NOTIFY events, 'from the other connection'")
        await conn.execute("SELECT pg_notify('events', 'from myself')")
        async with other.transaction():
            await other.execute("NOTIFY events, 'at commit'")
        await wait_for(lambda: len(notifications) >= 3, "three notifications")
        log.ok("notifications", sorted(notifications))

        # --- ParameterStatus: settings the driver tracks --------------------------------------
        await conn.execute("SET application_name = 'changed'; SET TimeZone = 'Asia/Tokyo'")
        settings = conn.get_settings()
        log.ok("settings", (settings.application_name, settings.TimeZone))
        await step(
            log,
            "timestamptz in Tokyo",
            conn.fetchval("SELECT timestamptz '2024-01-01 00:00:00+00'::text"),
        )

        # --- large values and results --------------------------------------------------------
        big = "b" * (1 << 20)
        await step(log, "1 MB round trip", conn.fetchval("SELECT md5($1::text)", big))
        await step(log, "1 MB result", conn.fetchval("SELECT length(repeat('x', 1048576))"))
        many = await conn.fetch(
            "SELECT g, md5(g::text) AS h FROM generate_series(1, 100000) g ORDER BY g"
        )
        digest = hashlib.sha256("".join(r["h"] for r in many).encode()).hexdigest()
        log.ok("100k rows", (len(many), sum(r["g"] for r in many), digest))

        # --- a timeout makes asyncpg send a CancelRequest; the connection stays usable ------
        try:
            await conn.fetch("SELECT pg_sleep(30)", timeout=0.3)
        except TimeoutError:
            log.ok("timeout", "TimeoutError")
        await step(log, "after cancel", conn.fetchval("SELECT 'usable'"))

        # --- final state -----------------------------------------------------------------------
        await step(
            log,
            "final rows",
            conn.fetch("SELECT id, name, price, tags, attrs, raw, mood FROM items ORDER BY id"),
        )
    finally:
        await other.close()
        await conn.close()
    return log


async def test_asyncpg_sees_the_same_through_the_proxy(pg, db, sidecar):
    handle = sidecar()
    twin = pg.create_database()
    try:
        direct = await scenario(pg.dsn(db.name))
        before = scrape(handle)
        proxied = await scenario(handle.dsn(twin.name))
        after = scrape(handle)
    finally:
        twin.drop()
    # the scenario exercised what it claims: errors, notices, notifications, a cancel
    assert {"syntax (fetch)", "executemany with a duplicate", "copy_to_table bad data"} <= set(
        direct.labels("error")
    )
    assert len(direct.get("notifications")) == 3
    assert direct.get("timeout") == "TimeoutError"
    assert direct.get("100k rows")[0] == 100000
    assert_same_transcript(direct, proxied)
    # the proxied run really went through the proxy: two sessions and a cancel connection
    accepted = "dualwrite_client_connections_accepted_total"
    assert metric(after, accepted) - metric(before, accepted) >= 3
    cancels = "dualwrite_cancel_requests_total"
    assert metric(after, cancels, outcome="forwarded") > metric(
        before, cancels, outcome="forwarded"
    )
