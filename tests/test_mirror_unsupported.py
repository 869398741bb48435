"""Statements that cannot be rewritten safely follow the mapping's ``unsupported`` policy.

``passthrough``: the statement runs unchanged, is counted in
``dualwrite_unmirrored_statements_total{mapping, reason}`` and recorded in
``dualwrite.unmirrored_events`` (so the reconciler knows the target may have drifted).
``reject``: the client gets an ErrorResponse (SQLSTATE 0A000 naming the mapping and the reason),
nothing is written, in the simple and the extended protocol, and the session stays usable after
the Sync and in the next transaction.

The mapped tables: users (split into customers and employees), inventory (stock_levels) and
transactions, which has a rule, so every write to it is unsupported.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos

from proxy.rewrite import REASONS, REJECT_HINT

USERS = ("customers", "employees")
SEED = """
INSERT INTO users (tenant_id, email, first_name, last_name, role)
    VALUES (1, 'seed@x', 'Sam', 'Seed', 'customer'), (1, 'staff@x', 'Stu', 'Staff', 'employee');
INSERT INTO products (tenant_id, sku, name, price) VALUES (1, 'A', 'a', 1);
INSERT INTO inventory (product_id, store_code, tenant_id, on_hand) VALUES (1, 'north', 1, 5);
INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, 1, 1);
"""
MIGRATIONS = ("split-users", "inventory-normalization", "transactions-total")
MAPPINGS = ["customers", "employees", "stock_levels", "transactions"]


def start(db, sidecar, policy: str):
    migration = pos.migration(*MIGRATIONS, unsupported=policy)
    pos.load_schema(db)
    pos.ensure_app_role(db)
    db.sql(SEED)
    # A rule on a mapped table: statements writing it cannot be rewritten (validated at start).
    db.sql("CREATE RULE refunds AS ON UPDATE TO transactions DO ALSO NOTIFY refunds")
    pos.run_setup(db, migration)
    pos.backfill(db, MAPPINGS)
    return sidecar({**migration, "applier": {"enabled": False}})


def source_state(db) -> dict[str, Any]:
    return {
        "users": db.sql("SELECT * FROM users ORDER BY id"),
        "inventory": db.sql("SELECT * FROM inventory ORDER BY 1, 2"),
        "transactions": db.sql("SELECT * FROM transactions ORDER BY 1"),
    }


def target_state(db) -> dict[str, Any]:
    return {
        "customers": db.sql("SELECT * FROM v2.customers ORDER BY id"),
        "employees": db.sql("SELECT * FROM v2.employees ORDER BY id"),
        "stock_levels": db.sql("SELECT * FROM v2.stock_levels ORDER BY 1, 2"),
        "transactions": db.sql("SELECT * FROM v2.transactions ORDER BY 1"),
        "outbox": db.sql("SELECT mapping, key FROM dualwrite.outbox ORDER BY id"),
    }


# --- the statements -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    reason: str
    mappings: tuple[str, ...]
    #: run the statement on a psycopg connection (autocommit off); ``extended``: through the
    #: extended protocol (parameters or a named prepared statement)
    run: Callable[[psycopg.Connection[Any], bool], None]
    #: the statement changes the source when it runs (an unparseable one does not)
    writes: bool = True
    simple_only: bool = False
    #: run after the statement (in the same transaction): what makes it write
    after: str | None = None


def _copy(conn: psycopg.Connection[Any], extended: bool) -> None:
    with conn.cursor().copy(
        "COPY users (tenant_id, email, first_name, last_name, role) FROM STDIN"
    ) as copy:
        copy.write_row((1, "copied@x", "Co", "Py", "customer"))


def _where_current_of(conn: psycopg.Connection[Any], extended: bool) -> None:
    conn.execute("DECLARE c CURSOR FOR SELECT id FROM users WHERE email = 'seed@x' FOR UPDATE")
    conn.execute("FETCH c")
    if extended:
        conn.execute("UPDATE users SET phone = %s WHERE CURRENT OF c", ("cursor",))
    else:
        conn.execute("UPDATE users SET phone = 'cursor' WHERE CURRENT OF c")


def _statement(
    sql: str, params: tuple[Any, ...] = ()
) -> Callable[[psycopg.Connection[Any], bool], None]:
    def run(conn: psycopg.Connection[Any], extended: bool) -> None:
        if extended:
            conn.execute(sql.replace("{}", "%s"), params, prepare=True)
        else:
            conn.execute(sql.replace("{}", "{!r}").format(*params) if params else sql)

    return run


CASES: dict[str, Case] = {
    "copy": Case("copy", USERS, _copy, simple_only=True),
    "where current of": Case("where_current_of", USERS, _where_current_of),
    "table with a rule": Case(
        "rules",
        ("transactions",),
        _statement("UPDATE transactions SET status = {} WHERE quantity = 1", ("refunded",)),
    ),
    "unparseable": Case(
        "unparseable", USERS, _statement("UPDATE users SET phone = 'x' WHERE id = ("), writes=False
    ),
    "key update": Case(
        "key_update",
        USERS,
        _statement("UPDATE users SET id = id + {} WHERE email = 'seed@x'", (1000,)),
    ),
    "key update of a composite key's expression": Case(
        "key_update",
        ("stock_levels",),
        _statement("UPDATE inventory SET store_code = {} WHERE product_id = 1", ("south",)),
    ),
    "merge": Case(
        "merge",
        USERS,
        _statement(
            "MERGE INTO users u USING (SELECT {}::text AS email) s ON u.email = s.email "
            "WHEN MATCHED THEN UPDATE SET phone = 'merged'",
            ("seed@x",),
        ),
    ),
    "truncate": Case("truncate", USERS, _statement("TRUNCATE users")),
    "writable cte": Case(
        "writable_cte",
        USERS,
        _statement(
            "WITH w AS (UPDATE users SET phone = {} WHERE email = 'seed@x' RETURNING id) "
            "SELECT count(*) FROM w",
            ("cte",),
        ),
    ),
    "explain analyze": Case(
        "explain",
        USERS,
        _statement(
            "EXPLAIN ANALYZE UPDATE users SET phone = {} WHERE email = 'seed@x'", ("explained",)
        ),
    ),
    "sql-level prepare": Case(
        "prepare",
        USERS,
        _statement("PREPARE p AS UPDATE users SET phone = 'p' WHERE id = $1"),
        after="EXECUTE p (1)",  # the prepared write itself is not seen again
    ),
}

PROTOCOLS = ["simple", "extended"]


def cases_and_protocols() -> list[Any]:
    return [
        pytest.param(case, protocol, id=f"{name}-{protocol}")
        for name, case in CASES.items()
        for protocol in PROTOCOLS
        if not (case.simple_only and protocol == "extended")
    ]


def rejected_message(case: Case) -> str:
    return (
        f"dualwrite: statement rejected for mapping {', '.join(case.mappings)}: "
        f"{REASONS[case.reason]}"
    )


# --- passthrough ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "protocol"), cases_and_protocols())
def test_passthrough_forwards_counts_and_records(db, sidecar, case, protocol):
    handle = start(db, sidecar, "passthrough")
    before_source, before_target = source_state(db), target_state(db)
    counted = {
        m: pos.scrape("dualwrite_unmirrored_statements_total", mapping=m, reason=case.reason)
        for m in case.mappings
    }

    with psycopg.connect(handle.dsn(user=pos.APP_ROLE)) as conn:
        if case.writes:
            case.run(conn, protocol == "extended")
            if case.after:
                conn.execute(case.after)
            conn.commit()
        else:
            with pytest.raises(psycopg.errors.SyntaxError) as failed:
                case.run(conn, protocol == "extended")
            conn.rollback()
            # the server's own error, unchanged
            assert failed.value.diag.message_primary == "syntax error at end of input"

    if case.writes:
        assert source_state(db) != before_source
    # nothing was mirrored: no target row changed, no key captured
    assert target_state(db) == before_target
    # Counted once per statement run. The exception: an unparseable statement sent with Parse
    # never runs (the server refuses the Parse) and is counted at Execute, so not at all; a
    # simple Query is counted when the proxy sees it.
    expected = 0 if case.reason == "unparseable" and protocol == "extended" else 1
    for mapping in case.mappings:
        moved = (
            pos.scrape("dualwrite_unmirrored_statements_total", mapping=mapping, reason=case.reason)
            - counted[mapping]
        )
        assert moved == expected, mapping
    pos.flush_activity(handle)
    recorded = db.sql(
        "SELECT mapping, reason, sum(statements)::int FROM dualwrite.unmirrored_events "
        "GROUP BY 1, 2 ORDER BY 1"
    )
    assert recorded == [(m, case.reason, 1) for m in sorted(case.mappings) if expected]


def test_passthrough_through_asyncpg_is_counted_per_execution(db, sidecar):
    handle = start(db, sidecar, "passthrough")
    before = pos.scrape(
        "dualwrite_unmirrored_statements_total", mapping="customers", reason="key_update"
    )

    async def run() -> None:
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            statement = await conn.prepare("UPDATE users SET id = id + $1 WHERE email = $2")
            for step in (1000, 1000):
                await statement.fetch(step, "seed@x")
        finally:
            await conn.close()

    asyncio.run(run())
    assert db.scalar("SELECT id FROM users WHERE email = 'seed@x'") == 2001
    assert (
        pos.scrape(
            "dualwrite_unmirrored_statements_total", mapping="customers", reason="key_update"
        )
        - before
        == 2
    )
    # the target still has the old key: the reconciler's job now
    assert pos.divergence(db, ["customers"])["customers"]["missing"][0][0] == 2001


# --- reject ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "protocol"), cases_and_protocols())
def test_reject_refuses_with_a_clear_error_and_writes_nothing(db, sidecar, case, protocol):
    handle = start(db, sidecar, "reject")
    before_source, before_target = source_state(db), target_state(db)
    rejected = {
        m: pos.scrape("dualwrite_rejected_statements_total", mapping=m, reason=case.reason)
        for m in case.mappings
    }

    with psycopg.connect(handle.dsn(user=pos.APP_ROLE)) as conn:
        # an earlier write of the same transaction: rolled back with it
        conn.execute("UPDATE users SET phone = 'earlier' WHERE email = 'staff@x'")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as refused:
            case.run(conn, protocol == "extended")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        # the session is usable, and mirrors, in the next transaction
        conn.execute("UPDATE users SET last_name = 'Next' WHERE email = 'seed@x'")
        conn.commit()
        assert conn.execute("SELECT 1").fetchone() == (1,)

    diag = refused.value.diag
    assert refused.value.sqlstate == "0A000"
    assert diag.message_primary == rejected_message(case)
    assert diag.message_hint == REJECT_HINT
    assert diag.severity == "ERROR"
    for mapping in case.mappings:
        moved = (
            pos.scrape("dualwrite_rejected_statements_total", mapping=mapping, reason=case.reason)
            - rejected[mapping]
        )
        assert moved == 1, mapping

    # nothing written but the next transaction's own change
    after = source_state(db)
    next_user = [
        (*row[:4], "Next", *row[5:]) if row[2] == "seed@x" else row
        for row in before_source["users"]
    ]
    assert after == {**before_source, "users": next_user}
    pos.drain(handle)
    after_target = target_state(db)
    assert after_target["employees"] == before_target["employees"]
    assert after_target["stock_levels"] == before_target["stock_levels"]
    assert after_target["transactions"] == before_target["transactions"]
    assert db.scalar("SELECT full_name FROM v2.customers WHERE email = 'seed@x'") == "Sam Next"
    assert pos.divergence(db, MAPPINGS) == {}


def pipeline_with_a_key_update(conn: psycopg.Connection[Any]) -> None:
    with conn.pipeline():
        conn.execute("UPDATE users SET phone = %s WHERE email = 'staff@x'", ("before",))
        conn.execute("UPDATE users SET id = %s WHERE email = 'seed@x'", (77,))
        conn.execute("UPDATE users SET phone = %s WHERE email = 'seed@x'", ("after",))


def test_reject_in_a_psycopg_pipeline_fails_the_rest_until_sync(db, sidecar):
    handle = start(db, sidecar, "reject")
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            pipeline_with_a_key_update(conn)
        assert conn.execute("SELECT count(*) FROM users WHERE phone IS NOT NULL").fetchone() == (0,)
        with conn.pipeline():
            conn.execute("UPDATE users SET phone = %s WHERE email = 'seed@x'", ("later",))
    assert db.sql("SELECT email, phone FROM users ORDER BY id") == [
        ("seed@x", "later"),
        ("staff@x", None),
    ]
    pos.drain(handle)
    assert pos.divergence(db, MAPPINGS) == {}


def test_reject_through_asyncpg_and_the_session_goes_on(db, sidecar):
    handle = start(db, sidecar, "reject")

    async def run() -> list[Any]:
        seen: list[Any] = []
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            for sql, args in (
                ("UPDATE users SET id = $1 WHERE email = $2", (5, "seed@x")),
                ("UPDATE transactions SET status = $1", ("void",)),
                ("UPDATE users SET phone = 'x' WHERE id = (", ()),
            ):
                try:
                    await conn.fetch(sql, *args)
                except asyncpg.FeatureNotSupportedError as exc:
                    seen.append((exc.sqlstate, exc.message))
                seen.append(await conn.fetchval("SELECT count(*) FROM users"))
            try:
                async with conn.transaction():
                    await conn.execute(
                        "UPDATE users SET phone = $1 WHERE email = $2", "tx", "staff@x"
                    )
                    await conn.execute("UPDATE users SET id = $1 WHERE email = $2", 5, "seed@x")
            except asyncpg.FeatureNotSupportedError as exc:
                seen.append(exc.sqlstate)
            async with conn.transaction():
                await conn.execute("UPDATE users SET phone = $1 WHERE email = $2", "ok", "staff@x")
        finally:
            await conn.close()
        return seen

    seen = asyncio.run(run())
    assert seen == [
        ("0A000", rejected_message(CASES["key update"])),
        2,
        ("0A000", rejected_message(CASES["table with a rule"])),
        2,
        ("0A000", rejected_message(CASES["unparseable"])),
        2,
        "0A000",
    ]
    assert db.sql("SELECT email, phone FROM users ORDER BY id") == [
        ("seed@x", None),
        ("staff@x", "ok"),
    ]
    pos.drain(handle)
    assert pos.divergence(db, MAPPINGS) == {}
