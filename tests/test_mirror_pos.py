"""The seed's real migrations (config/*.yaml over dualwrite/demo/pos_v1.sql + pos_v2.sql), end to
end through the proxy, as the application role ``pos_app``, with asyncpg and psycopg clients.

Each test checks the targets twice: the specific rows the scenario is about, and then the whole
of every target against the mapping applied to the source (hand-written SQL, support/pos.py).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos

from dualwrite.demo.workload import WorkloadStats, run_workload, seed

INS_USER = (
    "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
    "VALUES (%s, %s, %s, %s, %s) RETURNING id"
)
INS_USER_PG = (
    "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
    "VALUES ($1, $2, $3, $4, $5) RETURNING id"
)


def start(db, sidecar, *names: str, modes: dict[str, str] | None = None, **extra: Any):
    """Schema, pos_app, `dualwrite setup` for these migrations, and a sidecar mirroring them."""
    migration = pos.migration(*names, modes=modes)
    pos.prepare(db, migration)
    return sidecar({**migration, "applier": {"poll_interval_seconds": 0.05}, **extra})


def app_dsn(handle) -> str:
    """Through the proxy, as the application role."""
    return handle.dsn(user=pos.APP_ROLE)


def where_is(db, user_id: int) -> list[tuple[str, Any]]:
    """Which split target holds a user, and its is_manager flag (None for customers)."""
    found: list[tuple[str, Any]] = []
    if db.scalar("SELECT count(*) FROM v2.customers WHERE id = %s", user_id):
        found.append(("customers", None))
    manager = db.sql("SELECT is_manager FROM v2.employees WHERE id = %s", user_id)
    if manager:
        found.append(("employees", manager[0][0]))
    return found


@pytest.mark.parametrize("mode", ["outbox", "sync"])
def test_split_users_by_role_moves_rows_between_targets(db, sidecar, mode):
    handle = start(db, sidecar, "split-users", modes={"customers": mode, "employees": mode})

    with psycopg.connect(app_dsn(handle), autocommit=True) as conn:
        ana = conn.execute(INS_USER, (1, "ana@x", "Ana", "Silva", "customer")).fetchone()[0]
        bo = conn.execute(INS_USER, (1, "bo@x", "Bo", "Chen", "employee"), prepare=True).fetchone()[
            0
        ]
        conn.execute(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) VALUES "
            "(2, 'cy@x', 'Cy', 'Diaz', 'manager'), (2, 'di@x', 'Di', 'Evans', 'customer')"
        )
        cy, di = (
            r[0]
            for r in conn.execute(
                "SELECT id FROM users WHERE email IN ('cy@x', 'di@x') ORDER BY email"
            )
        )

    async def with_asyncpg() -> int:
        conn = await asyncpg.connect(app_dsn(handle))
        try:
            eve = await conn.fetchval(INS_USER_PG, 3, "eve@x", "Eve", "Fox", "customer")
            # role changes: customer -> employee, employee -> manager, manager -> customer
            await conn.execute("UPDATE users SET role = 'employee' WHERE id = $1", ana)
            await conn.execute("UPDATE users SET role = 'manager' WHERE id = $1", bo)
            status = await conn.execute(
                "UPDATE users SET role = 'customer', last_name = 'Díaz' WHERE id = $1", cy
            )
            assert status == "UPDATE 1"
            await conn.execute("DELETE FROM users WHERE id = $1", di)
            return int(eve)
        finally:
            await conn.close()

    eve = asyncio.run(with_asyncpg())
    if mode == "outbox":
        pos.drain(handle)
    # sync mode: the targets were written by the statements themselves, nothing to drain
    assert pos.outbox_depth(db) == 0

    assert where_is(db, ana) == [("employees", False)]
    assert where_is(db, bo) == [("employees", True)]
    assert where_is(db, cy) == [("customers", None)]
    assert db.scalar("SELECT full_name FROM v2.customers WHERE id = %s", cy) == "Cy Díaz"
    assert where_is(db, di) == []
    assert where_is(db, eve) == [("customers", None)]
    assert pos.divergence(db, ["customers", "employees"]) == {}


def test_tier_pricing_is_written_in_the_same_statement(db, sidecar):
    handle = start(db, sidecar, "tier-pricing")
    with psycopg.connect(app_dsn(handle)) as conn:
        product = conn.execute(
            "INSERT INTO products (tenant_id, sku, name, price, cost) VALUES (%s, %s, %s, %s, %s) "
            "RETURNING id",
            (1, "SKU-1", "Coffee", Decimal("10.00"), Decimal("4.00")),
        ).fetchone()[0]
        # inside the application's transaction, its own target row is already there...
        assert conn.execute(
            "SELECT price_silver, price_gold, margin_pct FROM v2.products WHERE id = %s", (product,)
        ).fetchone() == (Decimal("9.50"), Decimal("9.00"), Decimal("60.00"))
        # ...and nobody else sees it before the commit: it is the same transaction
        assert db.scalar("SELECT count(*) FROM v2.products") == 0
        conn.commit()
    assert db.sql("SELECT price, price_silver, price_gold, margin_pct FROM v2.products") == [
        (Decimal("10.00"), Decimal("9.50"), Decimal("9.00"), Decimal("60.00"))
    ]

    async def reprice() -> None:
        conn = await asyncpg.connect(app_dsn(handle))
        try:
            await conn.execute(
                "UPDATE products SET price = $1, cost = NULL WHERE id = $2",
                Decimal("19.99"),
                product,
            )
            await conn.execute(
                "INSERT INTO products (tenant_id, sku, name, price) VALUES ($1, $2, $3, $4)",
                2,
                "SKU-2",
                "Free sample",
                Decimal("0.00"),
            )
        finally:
            await conn.close()

    asyncio.run(reprice())
    assert pos.outbox_depth(db) == 0  # sync mode captures nothing
    assert db.sql(
        "SELECT sku, price, price_silver, price_gold, margin_pct FROM v2.products ORDER BY sku"
    ) == [
        ("SKU-1", Decimal("19.99"), Decimal("18.99"), Decimal("17.99"), None),
        ("SKU-2", Decimal("0.00"), Decimal("0.00"), Decimal("0.00"), None),
    ]
    with psycopg.connect(app_dsn(handle), autocommit=True) as conn:
        assert conn.execute("DELETE FROM products WHERE sku = 'SKU-2'").rowcount == 1
    assert db.scalar("SELECT count(*) FROM v2.products WHERE sku = 'SKU-2'") == 0
    assert pos.divergence(db, ["products"]) == {}


def test_transactions_total_amount_through_the_outbox(db, sidecar):
    handle = start(db, sidecar, "transactions-total", applier={"enabled": False})

    async def sell() -> list[int]:
        conn = await asyncpg.connect(app_dsn(handle))
        try:
            ids = [
                await conn.fetchval(
                    "INSERT INTO transactions (tenant_id, quantity, unit_price, discount) "
                    "VALUES ($1, $2, $3, $4) RETURNING id",
                    1,
                    quantity,
                    Decimal("2.50"),
                    Decimal(discount),
                )
                for quantity, discount in ((1, "0"), (4, "1.25"), (10, "0.50"))
            ]
            await conn.execute(
                "UPDATE transactions SET quantity = quantity * 2 WHERE id = $1", ids[0]
            )
            return ids
        finally:
            await conn.close()

    ids = asyncio.run(sell())
    # captured (the update's key twice: once per statement), applied later
    keys = db.sql("SELECT key FROM dualwrite.outbox WHERE mapping = 'transactions' ORDER BY id")
    assert [key for (key,) in keys] == [[ids[0]], [ids[1]], [ids[2]], [ids[0]]]
    assert db.scalar("SELECT count(*) FROM v2.transactions") == 0
    pos.drain(handle)
    assert db.sql("SELECT id, quantity, total_amount FROM v2.transactions ORDER BY id") == [
        (ids[0], 2, Decimal("5.00")),
        (ids[1], 4, Decimal("8.75")),
        (ids[2], 10, Decimal("24.50")),
    ]
    with psycopg.connect(app_dsn(handle), autocommit=True) as conn:
        conn.execute(
            "UPDATE transactions SET status = 'refunded', discount = 5 WHERE id = %s", (ids[2],)
        )
        conn.execute("DELETE FROM transactions WHERE id = %s", (ids[1],))
    pos.drain(handle)
    assert db.sql("SELECT id, status, total_amount FROM v2.transactions ORDER BY id") == [
        (ids[0], "completed", Decimal("5.00")),
        (ids[2], "refunded", Decimal("20.00")),
    ]
    assert pos.divergence(db, ["transactions"]) == {}


def test_inventory_normalisation_composite_key_with_upper_store_code(db, sidecar):
    handle = start(db, sidecar, "inventory-normalization")
    db.sql(
        "INSERT INTO products (tenant_id, sku, name, price) VALUES "
        "(1, 'A', 'a', 1), (1, 'B', 'b', 2)"
    )

    async def stock() -> None:
        conn = await asyncpg.connect(app_dsn(handle))
        try:
            await conn.executemany(
                "INSERT INTO inventory (product_id, store_code, tenant_id, on_hand, reserved) "
                "VALUES ($1, $2, 1, $3, $4)",
                [(1, "north", 10, 3), (1, "south", 2, 5), (2, "north", 7, 0), (2, "East", 1, 1)],
            )
        finally:
            await conn.close()

    asyncio.run(stock())
    with psycopg.connect(app_dsn(handle), autocommit=True) as conn:
        conn.execute(
            "UPDATE inventory SET reserved = reserved + %s WHERE store_code = %s", (4, "north")
        )
        conn.execute("DELETE FROM inventory WHERE product_id = 2 AND store_code = 'East'")
    pos.drain(handle)
    assert db.sql(
        "SELECT product_id, store, on_hand, available FROM v2.stock_levels ORDER BY 1, 2"
    ) == [
        (1, "NORTH", 10, 3),
        (1, "SOUTH", 2, 0),
        (2, "NORTH", 7, 3),
    ]
    assert pos.divergence(db, ["stock_levels"]) == {}


AUDIT_INSERT = (
    "INSERT INTO audit_log (tenant_id, actor_id, action, entity, entity_id, details) "
    "VALUES (%s, %s, %s, %s, %s, %s::jsonb) RETURNING id"
)


def test_audit_log_rls_for_the_application_role(db, sidecar):
    """Sync mode writes the target as pos_app: the RLS policy applies to the mirrored rows."""
    handle = start(db, sidecar, "audit-log-rls")
    with psycopg.connect(app_dsn(handle), autocommit=True) as conn:
        conn.execute("SET app.tenant_id = '1'")
        mine = conn.execute(
            AUDIT_INSERT, (1, 7, "login", "user", 7, '{"ip": "10.0.0.1"}')
        ).fetchone()[0]
        # the mirrored row is there, and visible to the tenant through the policy
        assert conn.execute("SELECT id, tenant_id, details FROM v2.audit_events").fetchall() == [
            (mine, 1, {"ip": "10.0.0.1"})
        ]
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as simple:
            conn.execute(
                AUDIT_INSERT.replace("%s", "2", 1).replace(", %s", ", NULL", 1)
                % ("'login'", "'user'", "8", "'{}'")
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as extended:
            conn.execute(AUDIT_INSERT, (2, 8, "login", "user", 8, "{}"))
        # the session goes on: the application's own tenant still writes
        conn.execute(
            "UPDATE audit_log SET details = details || '{\"ok\": true}' WHERE id = %s", (mine,)
        )
    for error in (simple.value, extended.value):
        assert error.sqlstate == "42501"
        assert error.diag.message_primary == (
            'new row violates row-level security policy for table "audit_events"'
        )

    async def other_tenant() -> dict[str, Any]:
        conn = await asyncpg.connect(app_dsn(handle), server_settings={"app.tenant_id": "2"})
        try:
            ok = await conn.fetchval(
                AUDIT_INSERT.replace("%s", "${}").format(1, 2, 3, 4, 5, 6),
                2,
                9,
                "refund",
                "transaction",
                3,
                "{}",
            )
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO audit_log (tenant_id, action, entity) VALUES ($1, 'x', 'y')", 1
                    )
            except asyncpg.PostgresError as exc:
                return {"ok": ok, "sqlstate": exc.sqlstate, "message": str(exc)}
            return {"ok": ok}
        finally:
            await conn.close()

    seen = asyncio.run(other_tenant())
    assert seen["sqlstate"] == "42501"
    assert "audit_events" in seen["message"]
    # as the superuser (no RLS): exactly the two allowed rows, in source and target alike
    assert db.sql("SELECT id, tenant_id FROM audit_log ORDER BY id") == [(mine, 1), (seen["ok"], 2)]
    assert db.sql("SELECT id, tenant_id, details FROM v2.audit_events ORDER BY id") == [
        (mine, 1, {"ip": "10.0.0.1", "ok": True}),
        (seen["ok"], 2, {}),
    ]
    assert pos.outbox_depth(db) == 0
    assert pos.divergence(db, ["audit_events"]) == {}


def test_all_migrations_at_once_with_the_demo_workload(db, sidecar):
    """The five migrations together under the demo's own point-of-sale workload (asyncpg).

    It runs as the test's superuser, like ``dualwrite demo``: the workload never sets
    app.tenant_id, so as pos_app every sale's audit row would be refused by the RLS policy.
    """
    handle = start(db, sidecar)

    async def go() -> WorkloadStats:
        conn = await asyncpg.connect(db.dsn)
        try:
            await seed(conn)  # written directly: exists before the window opens
        finally:
            await conn.close()
        pos.backfill(db)
        stats = WorkloadStats()
        await run_workload(handle.dsn(), clients=4, seconds=3, stats=stats)
        return stats

    stats = asyncio.run(go())
    assert stats.operations["sell"] > 10, (stats.operations, stats.errors)
    assert stats.operations["change_role"] > 0
    assert not stats.errors
    pos.drain(handle)
    assert pos.divergence(db) == {}
