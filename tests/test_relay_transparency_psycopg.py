"""psycopg 3 sees the same results, errors, statuses and notices through the proxy.

One scenario runs directly against a fresh database and through the proxy against another;
each step's outcome (rows, command status, error fields, transaction status) goes into a
transcript and the two must be equal. psycopg exercises libpq's pipeline mode (many
statements in flight, an error in the middle), server-side cursors, text and binary results,
COPY both ways and notices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from support.transparency import Transcript, assert_same_transcript, metric, scrape

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, label text NOT NULL, amount numeric(10, 2),
                tags text[], doc jsonb, at timestamptz, raw bytea);
CREATE TABLE log (n int PRIMARY KEY);
"""

VALUES_QUERY = """
SELECT 42::int4, 9007199254740993::int8, 2.5::float8, 'NaN'::float8, 1.10::numeric(4, 2),
       'ünïcødé ✓ 😀'::text, NULL::text, ''::text, '\\xdeadbeef'::bytea, true,
       date '2024-02-29', timestamptz '2024-03-01 12:00:00+00', interval '3 days 04:00',
       ARRAY[1, NULL, 3], ARRAY['x', NULL], '{"a": [1, 2.5, null]}'::jsonb, '{"b": 1}'::json,
       'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '[1,3)'::int4range, '192.168.1.1'::inet
"""


def step(log: Transcript, label: str, conn: psycopg.Connection[Any], fn: Callable[[], Any]) -> Any:
    """Run one step; record its value (or error) and the transaction status after it."""
    try:
        value = fn()
    except psycopg.Error as exc:
        log.failure(label, exc)
        value = None
    else:
        log.ok(label, value)
    log.ok(f"{label}: status", conn.info.transaction_status.name)
    return value


def rows_and_status(cur: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    rows = cur.fetchall() if cur.description is not None else None
    return (cur.statusmessage, cur.rowcount, rows)


def scenario(dsn: str) -> Transcript:
    log = Transcript()
    notices: list[tuple[Any, ...]] = []
    with (
        psycopg.connect(dsn, application_name="psycopg-scenario") as conn,
        psycopg.connect(dsn, autocommit=True) as other,
    ):
        conn.add_notice_handler(
            lambda d: notices.append(
                (d.severity_nonlocalized, d.sqlstate, d.message_primary, d.message_detail)
            )
        )
        log.ok("application_name", conn.info.parameter_status("application_name"))
        log.ok("initial status", conn.info.transaction_status.name)
        step(log, "schema", conn, lambda: conn.execute(SCHEMA).statusmessage)
        step(log, "commit schema", conn, conn.commit)

        # --- text and binary results of the same values ------------------------------------------
        step(log, "text values", conn, lambda: conn.execute(VALUES_QUERY).fetchone())
        step(log, "binary values", conn, lambda: conn.execute(VALUES_QUERY, binary=True).fetchone())
        step(
            log,
            "parameters",
            conn,
            lambda: conn.execute(
                "SELECT %s::text, %s::int8, %s::bytea, %s::text[], %s",
                ("é" * 500, -7, b"\x00\x01", ["a", None], None),
            ).fetchone(),
        )
        step(
            log,
            "binary parameters",
            conn,
            lambda: conn.execute(
                "SELECT %b, %b, %b", (b"\xff" * 1000, 123456789, "binary text"), binary=True
            ).fetchone(),
        )

        # --- DML with RETURNING, command tags, transaction status --------------------------------
        with conn.cursor() as cur:
            step(
                log,
                "insert returning",
                conn,
                lambda: rows_and_status(
                    cur.execute(
                        "INSERT INTO t (id, label, amount, tags, doc, at, raw) VALUES "
                        "(1, 'one', 1.5, '{a}', '{\"k\": 1}', '2024-01-01 00:00+00', '\\x01'), "
                        "(2, 'two', NULL, NULL, NULL, NULL, NULL) RETURNING id, label"
                    )
                ),
            )
            step(
                log,
                "update",
                conn,
                lambda: rows_and_status(cur.execute("UPDATE t SET amount = 3 WHERE id = %s", (2,))),
            )
            step(log, "error in transaction", conn, lambda: cur.execute("SELECT 1 / 0"))
            step(log, "ignored in failed transaction", conn, lambda: cur.execute("SELECT 1"))
            step(log, "rollback", conn, conn.rollback)
            step(
                log,
                "count after rollback",
                conn,
                lambda: cur.execute("SELECT count(*) FROM t").fetchone(),
            )
            step(log, "rollback again", conn, conn.rollback)

        # --- transaction blocks and savepoints ---------------------------------------------------
        def nested() -> Any:
            with conn.transaction():
                conn.execute("INSERT INTO t (id, label) VALUES (10, 'ten')")
                try:
                    with conn.transaction():
                        conn.execute("INSERT INTO t (id, label) VALUES (11, 'eleven')")
                        conn.execute("INSERT INTO t (id, label) VALUES (10, 'duplicate')")
                except pg_errors.UniqueViolation as exc:
                    log.failure("inner savepoint", exc)
                conn.execute("INSERT INTO t (id, label) VALUES (12, 'twelve')")
            return conn.execute("SELECT array_agg(id ORDER BY id) FROM t").fetchone()

        step(log, "nested transactions", conn, nested)
        step(log, "commit", conn, conn.commit)

        # --- server-side cursor ------------------------------------------------------------------
        def server_side() -> Any:
            with conn.cursor(name="big_cursor") as cur:
                cur.itersize = 333
                cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 20000) g")
                first = cur.fetchmany(5)
                cur.scroll(100)
                after_scroll = cur.fetchone()
                rest = list(cur)
                return (first, after_scroll, len(rest), sum(r[0] for r in rest))

        step(log, "server-side cursor", conn, server_side)
        step(log, "binary server-side cursor", conn, lambda: _binary_named(conn))
        step(log, "commit cursors", conn, conn.commit)

        # --- COPY both ways ----------------------------------------------------------------------
        def copy_in() -> Any:
            with conn.cursor() as cur:
                with cur.copy("COPY t (id, label, amount, tags) FROM STDIN") as copy:
                    for i in range(100, 1100):
                        copy.write_row((i, f"copied ✓ {i}", i / 4, ["x", None] if i % 2 else None))
                return (cur.statusmessage, cur.rowcount)

        def copy_in_binary() -> Any:
            with conn.cursor() as cur:
                with cur.copy("COPY t (id, label, raw) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.set_types(["int4", "text", "bytea"])
                    for i in range(2000, 2500):
                        copy.write_row((i, f"binary {i}", bytes([i % 256]) * 10))
                return cur.statusmessage

        def copy_in_bad() -> Any:
            with conn.cursor() as cur:
                with cur.copy("COPY t (id, label) FROM STDIN") as copy:
                    copy.write(b"3000\tfine\n3001\n")
                return cur.statusmessage

        def copy_out() -> Any:
            with conn.cursor() as cur:
                with cur.copy("COPY (SELECT * FROM t ORDER BY id) TO STDOUT") as copy:
                    data = b"".join(bytes(chunk) for chunk in copy)
                return (cur.statusmessage, hashlib.sha256(data).hexdigest(), len(data))

        def copy_out_rows() -> Any:
            with (
                conn.cursor() as cur,
                cur.copy(
                    "COPY (SELECT id, label FROM t WHERE id < 200 ORDER BY id) TO STDOUT "
                    "(FORMAT BINARY)"
                ) as copy,
            ):
                copy.set_types(["int4", "text"])
                return list(copy.rows())

        step(log, "copy in", conn, copy_in)
        step(log, "copy in binary", conn, copy_in_binary)
        step(log, "commit copies", conn, conn.commit)
        step(log, "copy in with bad data", conn, copy_in_bad)
        step(log, "rollback bad copy", conn, conn.rollback)
        step(log, "copy out", conn, copy_out)
        step(log, "copy out binary rows", conn, copy_out_rows)
        step(log, "commit after copy out", conn, conn.commit)

        # --- notices -----------------------------------------------------------------------------
        step(
            log,
            "notices",
            conn,
            lambda: (
                conn.execute(
                    "DO $$ BEGIN RAISE NOTICE 'first %', 1; "
                    "RAISE WARNING 'second' USING DETAIL = 'why'; END $$"
                ).statusmessage
            ),
        )
        log.ok("notices seen", list(notices))
        step(log, "commit notices", conn, conn.commit)

        # --- errors of several SQLSTATEs ---------------------------------------------------------
        for label, sql in [
            ("syntax", "SELEC 1"),
            ("undefined column", "SELECT nope FROM t"),
            ("unique", "INSERT INTO t (id, label) VALUES (10, 'again')"),
            ("not null", "INSERT INTO t (id) VALUES (5)"),
            ("bad input", "SELECT 'x'::int"),
            (
                "custom",
                "DO $$ BEGIN RAISE EXCEPTION 'mine' USING ERRCODE = 'P0123', "
                "HINT = 'a hint'; END $$",
            ),
        ]:
            step(log, label, conn, lambda sql=sql: conn.execute(sql).statusmessage)
            step(log, f"{label}: rollback", conn, conn.rollback)

        # --- prepared statements (psycopg prepares after repeated use or when asked) -------------
        def prepared() -> Any:
            out = []
            for i in range(8):
                cur = conn.execute("SELECT label FROM t WHERE id = %s", (100 + i,), prepare=True)
                out.append(cur.fetchone())
            return out

        step(log, "prepared", conn, prepared)
        step(log, "commit prepared", conn, conn.commit)

        # --- pipeline mode: many statements in flight, an error in the middle --------------------
        conn.autocommit = True

        def pipeline_with_error() -> Any:
            results: list[Any] = []
            cursors = []
            try:
                with conn.pipeline():
                    for n in range(1, 101):
                        value = 50 if n == 70 else n  # the 70th insert repeats a key
                        cursors.append(conn.execute("INSERT INTO log VALUES (%s)", (value,)))
                    cursors.append(conn.execute("SELECT count(*) FROM log"))
            except psycopg.Error as exc:
                results.append(("pipeline raised", *(log_error(exc))))
            statuses = []
            for cur in cursors:
                try:
                    statuses.append(cur.statusmessage)
                except psycopg.Error as exc:
                    statuses.append(log_error(exc))
            # How many statements psycopg queued before it saw the error depends on timing
            # (directly as well); what the server answered does not.
            results.append(statuses[:69])
            results.append(sorted({repr(status) for status in statuses[69:]}))
            return results

        def pipeline_synced() -> Any:
            with conn.pipeline() as p:
                first = conn.execute("INSERT INTO log VALUES (1000) RETURNING n")
                p.sync()
                bad = conn.execute("INSERT INTO log VALUES (1000)")
                try:
                    p.sync()
                except psycopg.Error as exc:
                    outcome: Any = log_error(exc)
                else:
                    outcome = bad.statusmessage
                after = conn.execute("SELECT count(*) FROM log")
                p.sync()
                return (first.fetchone(), outcome, after.fetchone())

        def pipeline_in_transaction() -> Any:
            try:
                with conn.pipeline(), conn.transaction():
                    for n in range(2000, 2050):
                        conn.execute("INSERT INTO log VALUES (%s)", (n,))
                    conn.execute("INSERT INTO log VALUES (2000)")
            except psycopg.Error as exc:
                return log_error(exc)
            return "committed"

        step(log, "pipeline with an error", conn, pipeline_with_error)
        step(
            log,
            "after the pipeline",
            conn,
            lambda: conn.execute("SELECT count(*), sum(n) FROM log").fetchone(),
        )
        step(log, "pipeline with syncs", conn, pipeline_synced)
        step(log, "pipeline in a transaction", conn, pipeline_in_transaction)
        step(
            log,
            "after the transaction pipeline",
            conn,
            lambda: conn.execute("SELECT count(*), sum(n) FROM log").fetchone(),
        )
        step(log, "executemany", conn, lambda: _executemany(conn))

        # --- LISTEN/NOTIFY -----------------------------------------------------------------------
        conn.execute("LISTEN jobs")
        other.execute("NOTIFY jobs, 'one'")
        other.execute("SELECT pg_notify('jobs', 'two')")
        conn.execute("NOTIFY jobs, 'from myself'")
        who = {conn.info.backend_pid: "self", other.info.backend_pid: "other"}
        received = [
            (n.channel, n.payload, who.get(n.pid, "unknown"))
            for n in conn.notifies(timeout=10, stop_after=3)
        ]
        log.ok("notifications", sorted(received))

        # --- ParameterStatus ---------------------------------------------------------------------
        conn.execute("SET application_name = 'renamed'")
        conn.execute("SET TimeZone = 'Europe/Paris'")
        conn.execute("SET DateStyle = 'SQL, DMY'")
        log.ok(
            "parameter statuses",
            tuple(
                conn.info.parameter_status(name)
                for name in ("application_name", "TimeZone", "DateStyle", "server_encoding")
            ),
        )
        step(
            log,
            "timestamptz text",
            conn,
            lambda: conn.execute("SELECT timestamptz '2024-07-01 12:00+00'::text").fetchone(),
        )

        # --- large results -----------------------------------------------------------------------
        def large(binary: bool) -> Any:
            cur = conn.execute(
                "SELECT g, repeat('v', g % 100) FROM generate_series(1, 100000) g", binary=binary
            )
            rows = cur.fetchall()
            return (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest())

        step(log, "100k rows text", conn, lambda: large(False))
        step(log, "100k rows binary", conn, lambda: large(True))
        step(
            log,
            "1 MB value",
            conn,
            lambda: hashlib.sha256(
                conn.execute("SELECT repeat('m', 1048576) || %s", ("!",)).fetchone()[0].encode()
            ).hexdigest(),
        )
        step(log, "empty query", conn, lambda: conn.execute("").statusmessage)

        step(
            log,
            "final t",
            conn,
            lambda: conn.execute(
                "SELECT id, label, amount, tags, doc, raw FROM t ORDER BY id"
            ).fetchall(),
        )
        step(
            log,
            "final log",
            conn,
            lambda: conn.execute("SELECT array_agg(n ORDER BY n) FROM log").fetchone(),
        )
    return log


def log_error(exc: BaseException) -> tuple[Any, ...]:
    diag = getattr(exc, "diag", None)
    return (
        type(exc).__name__,
        getattr(diag, "sqlstate", None),
        getattr(diag, "message_primary", None),
    )


def _binary_named(conn: psycopg.Connection[Any]) -> Any:
    with conn.cursor(name="binary_cursor", binary=True) as cur:
        cur.execute("SELECT g, g * 1.5, ARRAY[g, NULL] FROM generate_series(1, 1000) g")
        rows = cur.fetchall()
    return (len(rows), rows[:3], rows[-1])


def _executemany(conn: psycopg.Connection[Any]) -> Any:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO log VALUES (%s) RETURNING n * 2",
            [(n,) for n in range(5000, 5300)],
            returning=True,
        )
        doubled = []
        while True:
            doubled.extend(cur.fetchall())
            if not cur.nextset():
                break
        return (cur.rowcount, sum(d for (d,) in doubled))


def test_psycopg_sees_the_same_through_the_proxy(pg, db, sidecar):
    handle = sidecar()
    twin = pg.create_database()
    try:
        direct = scenario(pg.dsn(db.name))
        before = scrape(handle)
        proxied = scenario(handle.dsn(twin.name))
        after = scrape(handle)
    finally:
        twin.drop()
    # the scenario exercised what it claims
    errors = set(direct.labels("error"))
    assert {"error in transaction", "copy in with bad data", "unique", "custom"} <= errors
    assert direct.get("error in transaction: status") == "INERROR"
    assert direct.get("rollback: status") == "IDLE"
    assert len(direct.get("notices seen")) == 2
    assert len(direct.get("notifications")) == 3
    pipeline = direct.get("pipeline with an error")
    assert pipeline[0][0] == "pipeline raised"
    assert pipeline[1] == ("INSERT 0 1",) * 69
    assert pipeline[2] == ("None",)  # nothing after the failing statement ran
    assert_same_transcript(direct, proxied)
    accepted = "dualwrite_client_connections_accepted_total"
    assert metric(after, accepted) - metric(before, accepted) >= 2
