"""A mirrored write belongs to the application's transaction: what rolls back (ROLLBACK, ROLLBACK
TO SAVEPOINT, an error in a pipeline, a deferred constraint failing at COMMIT) leaves no trace
in the target nor in the outbox; what commits is mirrored exactly.

The sidecar's applier is off here so the outbox can be inspected as the statements left it;
the tests drain it themselves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos

MODES = ["outbox", "sync"]
INS_USER = (
    "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
    "VALUES (%s, %s, 'F', 'L', %s) RETURNING id"
)
INS_SALE = (
    "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, %s, 1) RETURNING id"
)


@pytest.fixture(params=MODES)
def mirror(request, db, sidecar):
    """Users split and transactions in one mode (the test's parameter), as pos_app."""
    mode = request.param
    migration = pos.migration(
        "split-users",
        "transactions-total",
        modes={"customers": mode, "employees": mode, "transactions": mode},
    )
    pos.prepare(db, migration)
    handle = sidecar({**migration, "applier": {"enabled": False}})
    return handle, mode


def traces(db) -> dict[str, Any]:
    """Everything the mirror may have written: targets and outbox."""
    return {
        "customers": db.sql("SELECT id, full_name FROM v2.customers ORDER BY id"),
        "employees": db.sql("SELECT id, is_manager FROM v2.employees ORDER BY id"),
        "transactions": db.sql("SELECT id, quantity FROM v2.transactions ORDER BY id"),
        "outbox": db.sql("SELECT mapping, key FROM dualwrite.outbox ORDER BY id"),
    }


NOTHING = {"customers": [], "employees": [], "transactions": [], "outbox": []}


def outbox_keys(db) -> set[tuple[str, int]]:
    return {(m, k[0]) for m, k in db.sql("SELECT mapping, key FROM dualwrite.outbox")}


def test_rollback_leaves_no_trace(db, mirror):
    handle, _ = mirror
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE)) as conn:
        conn.execute(INS_USER, (1, "a@x", "customer"))
        conn.execute(INS_USER, (1, "b@x", "manager"), prepare=True)
        conn.execute(INS_SALE, (3,))
        conn.execute("UPDATE users SET role = 'employee' WHERE email = 'a@x'")
        conn.rollback()

    async def rolled_back_by_asyncpg() -> None:
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                INS_USER.replace("%s", "$1", 1).replace("%s", "$2", 1).replace("%s", "$3", 1),
                2,
                "c@x",
                "employee",
            )
            await conn.execute(
                "INSERT INTO transactions (tenant_id, quantity, unit_price) "
                "VALUES (1, 1, 1), (1, 2, 2)"
            )
            await tx.rollback()
        finally:
            await conn.close()

    asyncio.run(rolled_back_by_asyncpg())
    assert db.scalar("SELECT count(*) FROM users") == 0
    assert db.scalar("SELECT count(*) FROM transactions") == 0
    assert traces(db) == NOTHING


def test_rollback_to_savepoint_undoes_only_what_came_after(db, mirror):
    handle, mode = mirror
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE)) as conn:
        kept = conn.execute(INS_USER, (1, "kept@x", "customer")).fetchone()[0]
        sale = conn.execute(INS_SALE, (1,)).fetchone()[0]
        conn.execute("SAVEPOINT s1")
        gone = conn.execute(INS_USER, (1, "gone@x", "employee"), prepare=True).fetchone()[0]
        conn.execute("UPDATE users SET role = 'manager' WHERE id = %s", (kept,))  # a move...
        conn.execute("UPDATE transactions SET quantity = 99 WHERE id = %s", (sale,))
        conn.execute("ROLLBACK TO SAVEPOINT s1")  # ...undone
        with conn.transaction():  # psycopg's nested block: another savepoint, released
            late = conn.execute(INS_USER, (2, "late@x", "manager")).fetchone()[0]
        try:
            with conn.transaction():  # a savepoint rolled back by an error
                conn.execute(INS_USER, (2, "err@x", "customer"))
                conn.execute(INS_SALE, (0,))  # violates quantity > 0
        except psycopg.errors.CheckViolation:
            pass
        conn.commit()

    assert db.sql("SELECT email, role FROM users ORDER BY id") == [
        ("kept@x", "customer"),
        ("late@x", "manager"),
    ]
    if mode == "outbox":
        # only the committed statements' keys were captured
        assert outbox_keys(db) == {
            ("customers", kept),
            ("employees", kept),
            ("transactions", sale),
            ("customers", late),
            ("employees", late),
        }
        pos.drain(handle)
    assert traces(db) == {
        "customers": [(kept, "F L")],
        "employees": [(late, True)],
        "transactions": [(sale, 1)],
        "outbox": [],
    }
    assert gone not in {row[0] for row in db.sql("SELECT id FROM v2.employees")}
    assert pos.divergence(db, ["customers", "employees", "transactions"]) == {}


def failing_pipeline(conn: psycopg.Connection[Any]) -> None:
    with conn.pipeline():
        conn.execute(INS_USER, (1, "p1@x", "customer"))
        conn.execute(INS_SALE, (2,))
        conn.execute("UPDATE users SET role = 'employee' WHERE email = %s", ("p1@x",))
        conn.execute(INS_SALE, (-1,))  # fails: the server skips the rest until Sync
        conn.execute(INS_USER, (1, "p2@x", "customer"))


def test_error_mid_pipeline_rolls_the_pipeline_back(db, mirror):
    handle, _ = mirror
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation):
            failing_pipeline(conn)
        # the session is usable afterwards, and mirrors again
        conn.execute(INS_USER, (3, "after@x", "employee"))

    async def asyncpg_pipeline() -> str:
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            try:
                await conn.executemany(
                    "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, $1, 1)",
                    [(1,), (2,), (0,), (3,)],
                )
            except asyncpg.CheckViolationError as exc:
                return str(exc.constraint_name)
            return "no error"
        finally:
            await conn.close()

    assert asyncio.run(asyncpg_pipeline()) == "transactions_quantity_check"
    assert db.sql("SELECT email FROM users") == [("after@x",)]
    assert db.scalar("SELECT count(*) FROM transactions") == 0
    pos.drain(handle)
    after = db.scalar("SELECT id FROM users")
    assert traces(db) == {**NOTHING, "employees": [(after, False)]}


def test_deferred_constraint_failing_at_commit_takes_the_mirror_with_it(db, mirror):
    handle, _ = mirror
    db.sql(
        "ALTER TABLE transactions ADD CONSTRAINT sale_buyer FOREIGN KEY (user_id) "
        "REFERENCES users (id) DEFERRABLE INITIALLY DEFERRED"
    )
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE)) as conn:
        conn.execute(INS_USER, (1, "d@x", "customer"))
        conn.execute(
            "INSERT INTO transactions (tenant_id, user_id, quantity, unit_price) "
            "VALUES (1, 424242, 1, 1)"
        )
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.commit()
    assert db.scalar("SELECT count(*) FROM users") == 0
    assert traces(db) == NOTHING
