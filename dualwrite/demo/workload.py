"""A point-of-sale workload: several clients selling, restocking, promoting staff and repricing.

Used by ``dualwrite demo`` to drive live traffic through the proxy, and by the mirror tests. It
speaks only SQL over asyncpg, as an application would: it has no idea a proxy is in between.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

FIRST_NAMES = ("Ada", "Bo", "Cai", "Dee", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea")
LAST_NAMES = ("Nguyen", "Okafor", "Perez", "Quinn", "Rossi", "Sato", "Tan", "Umar", "Vega", "Wu")
STORES = ("north", "south", "east", "west")


@dataclass
class WorkloadStats:
    """What the clients did, for the progress line and the summary."""

    operations: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return sum(self.operations.values())

    def rate(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return self.total / elapsed


async def seed(
    conn: asyncpg.Connection, *, tenants: int = 3, users: int = 60, products: int = 40
) -> None:
    """Initial data, written directly (it exists before the migration window opens)."""
    rng = random.Random(7)
    await conn.executemany(
        "INSERT INTO tenants (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        [(t, f"Store group {t}") for t in range(1, tenants + 1)],
    )
    await conn.executemany(
        "INSERT INTO users (tenant_id, email, first_name, last_name, role, phone) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (
                rng.randint(1, tenants),
                f"user{i}@example.com",
                rng.choice(FIRST_NAMES),
                rng.choice(LAST_NAMES),
                rng.choices(("customer", "employee", "manager"), (8, 3, 1))[0],
                f"+1-555-{i:04d}",
            )
            for i in range(users)
        ],
    )
    await conn.executemany(
        "INSERT INTO products (tenant_id, sku, name, price, cost, category) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (
                rng.randint(1, tenants),
                f"SKU-{i:05d}",
                f"Product {i}",
                round(rng.uniform(1, 200), 2),
                round(rng.uniform(0.5, 120), 2),
                rng.choice(("food", "drink", "home", "toys")),
            )
            for i in range(products)
        ],
    )
    await conn.execute(
        "INSERT INTO inventory (product_id, store_code, tenant_id, on_hand, reserved) "
        "SELECT p.id, s.code, p.tenant_id, 50, 0 FROM products p "
        "CROSS JOIN unnest($1::text[]) AS s(code) ON CONFLICT DO NOTHING",
        list(STORES),
    )


class Client:
    """One application connection doing random point-of-sale work."""

    def __init__(self, conn: asyncpg.Connection, stats: WorkloadStats, seed_value: int) -> None:
        self.conn = conn
        self.stats = stats
        self.rng = random.Random(seed_value)

    async def step(self) -> None:
        """One business operation, chosen by weight."""
        operations: list[tuple[int, Callable[[], Awaitable[None]]]] = [
            (50, self.sell),
            (10, self.new_customer),
            (8, self.restock),
            (8, self.browse),
            (6, self.reprice),
            (4, self.change_role),
            (3, self.refund),
            (2, self.forget_customer),
        ]
        weights = [w for w, _ in operations]
        action = self.rng.choices([op for _, op in operations], weights)[0]
        name = action.__name__
        try:
            await action()
        except asyncpg.PostgresError as exc:
            self.stats.errors[f"{name}: {exc.sqlstate}"] += 1
        else:
            self.stats.operations[name] += 1

    async def sell(self) -> None:
        """A sale: transaction row, inventory decrement, audit entry, in one transaction."""
        conn = self.conn
        async with conn.transaction():
            product = await conn.fetchrow(
                "SELECT id, tenant_id, price FROM products WHERE active ORDER BY random() LIMIT 1"
            )
            if product is None:
                return
            buyer = await conn.fetchval(
                "SELECT id FROM users WHERE tenant_id = $1 AND role = 'customer' "
                "ORDER BY random() LIMIT 1",
                product["tenant_id"],
            )
            quantity = self.rng.randint(1, 4)
            # sales tax on the line after discount (8%), as the till computes it
            sale_id = await conn.fetchval(
                "INSERT INTO transactions (tenant_id, user_id, product_id, quantity, unit_price, "
                "discount, tax) VALUES ($1, $2, $3, $4::integer, $5::numeric, $6::numeric, "
                "round(($4::integer * $5::numeric - $6::numeric) * 0.08, 2)) RETURNING id",
                product["tenant_id"],
                buyer,
                product["id"],
                quantity,
                product["price"],
                round(self.rng.choice((0, 0, 0, 0.5, 1.0)), 2),
            )
            await conn.execute(
                "UPDATE inventory SET on_hand = greatest(on_hand - $1, 0), updated_at = now() "
                "WHERE product_id = $2 AND store_code = $3",
                quantity,
                product["id"],
                self.rng.choice(STORES),
            )
            await conn.execute(
                "INSERT INTO audit_log (tenant_id, actor_id, action, entity, entity_id, details) "
                "VALUES ($1, $2, 'sale', 'transaction', $3, $4::jsonb)",
                product["tenant_id"],
                buyer,
                sale_id,
                f'{{"quantity": {quantity}}}',
            )

    async def new_customer(self) -> None:
        await self.conn.execute(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "SELECT id, 'c' || floor(random() * 1e9)::bigint || '@example.com', $1, $2, 'customer' "
            "FROM tenants ORDER BY random() LIMIT 1",
            self.rng.choice(FIRST_NAMES),
            self.rng.choice(LAST_NAMES),
        )

    async def restock(self) -> None:
        await self.conn.execute(
            "UPDATE inventory SET on_hand = on_hand + $1, updated_at = now() "
            "WHERE product_id = (SELECT id FROM products ORDER BY random() LIMIT 1)",
            self.rng.randint(5, 30),
        )

    async def browse(self) -> None:
        """A catalogue page: one tenant's active products by SKU (a read shadow reads replay)."""
        await self.conn.fetch(
            "SELECT id, sku, name, price FROM products WHERE tenant_id = $1 AND active "
            "ORDER BY sku LIMIT 20",
            self.rng.randint(1, 3),
        )

    async def reprice(self) -> None:
        await self.conn.execute(
            "UPDATE products SET price = round(price * $1::numeric, 2) "
            "WHERE id = (SELECT id FROM products ORDER BY random() LIMIT 1)",
            self.rng.choice((0.9, 0.95, 1.05, 1.1)),
        )

    async def change_role(self) -> None:
        """Promote a customer to employee or the other way round (moves the row in v2)."""
        await self.conn.execute(
            "UPDATE users SET role = CASE role WHEN 'customer' THEN 'employee' "
            "WHEN 'employee' THEN 'manager' ELSE 'customer' END, updated_at = now() "
            "WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)"
        )

    async def refund(self) -> None:
        await self.conn.execute(
            "UPDATE transactions SET status = 'refunded' WHERE id = "
            "(SELECT id FROM transactions WHERE status = 'completed' ORDER BY random() LIMIT 1)"
        )

    async def forget_customer(self) -> None:
        """A deletion request: the customer and nothing else (transactions keep the id)."""
        await self.conn.execute(
            "DELETE FROM users WHERE id = (SELECT id FROM users WHERE role = 'customer' "
            "ORDER BY random() LIMIT 1)"
        )


async def run_workload(
    dsn: str,
    *,
    clients: int,
    seconds: float,
    stats: WorkloadStats,
    stop: asyncio.Event | None = None,
) -> WorkloadStats:
    """Run ``clients`` connections doing point-of-sale work for ``seconds`` (or until stopped)."""
    deadline = time.monotonic() + seconds
    stop = stop or asyncio.Event()

    async def one(index: int) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            client = Client(conn, stats, seed_value=index)
            while not stop.is_set() and time.monotonic() < deadline:
                await client.step()
        finally:
            await conn.close()

    await asyncio.gather(*(one(i) for i in range(clients)))
    return stats
