"""``dualwrite_rows_mirrored_total`` counts the rows written to each mapping's target.

- asyncpg's ``fetchval``/``fetchrow`` run a statement under a portal row limit (the reply ends
  with PortalSuspended, not CommandComplete): the rows are counted all the same, once.
- A split counts a row only for the mapping whose filter includes it.
- In both modes, and through the simple and the extended protocol, the counts equal what the
  targets hold afterwards.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest
from support import pos

MIRRORED = "dualwrite_rows_mirrored_total"
REWRITTEN = "dualwrite_statements_rewritten_total"
FAST_APPLIER = {"poll_interval_seconds": 0.05}


def start(db, sidecar, mode: str):
    migration = pos.migration("split-users", modes={"customers": mode, "employees": mode})
    pos.prepare(db, migration)
    return sidecar({**migration, "applier": FAST_APPLIER})


class Counts:
    """How much a sample moved since this object was made."""

    def __init__(self) -> None:
        self._start: dict[tuple[str, str, str], float] = {}
        for name in (MIRRORED, REWRITTEN):
            for mapping in ("customers", "employees"):
                for operation in ("insert", "update", "delete"):
                    key = (name, mapping, operation)
                    self._start[key] = pos.scrape(name, mapping=mapping, operation=operation)

    def moved(self, name: str, mapping: str, operation: str) -> float:
        now = pos.scrape(name, mapping=mapping, operation=operation)
        return now - self._start[(name, mapping, operation)]


_INSERT = (
    "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
    "VALUES (1, $1, 'F', 'L', $2)"
)


@pytest.mark.parametrize("mode", ["sync", "outbox"])
def test_asyncpg_fetchval_and_fetchrow_writes_are_counted_once(db, sidecar, mode):
    handle = start(db, sidecar, mode)
    counts = Counts()

    async def write() -> None:
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            # a portal row limit of 1: the reply ends with PortalSuspended
            new_id = await conn.fetchval(_INSERT + " RETURNING id", "a@x", "customer")
            assert isinstance(new_id, int)
            row = await conn.fetchrow(_INSERT + " RETURNING id, email", "b@x", "employee")
            assert row is not None
            assert row["email"] == "b@x"
            # without RETURNING: the count row is the only row
            assert await conn.fetchval(_INSERT, "c@x", "customer") is None
            # several rows returned under a row limit of one: still one statement, 3 rows
            await conn.fetchval(
                "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
                "SELECT 1, 'm' || g || '@x', 'F', 'L', 'manager' FROM generate_series(1, 3) g "
                "RETURNING id"
            )
            await conn.fetchrow("UPDATE users SET phone = '1' WHERE role = 'customer' RETURNING id")
            await conn.fetchval("DELETE FROM users WHERE email = 'a@x'")
        finally:
            await conn.close()

    asyncio.run(write())
    assert counts.moved(MIRRORED, "customers", "insert") == 2
    assert counts.moved(MIRRORED, "employees", "insert") == 4
    assert counts.moved(REWRITTEN, "customers", "insert") == 4
    assert counts.moved(REWRITTEN, "employees", "insert") == 4
    assert counts.moved(MIRRORED, "customers", "update") == 2
    assert counts.moved(MIRRORED, "employees", "update") == 0
    assert counts.moved(MIRRORED, "customers", "delete") == 1
    assert counts.moved(MIRRORED, "employees", "delete") == 0
    pos.drain(handle)
    assert db.scalar("SELECT count(*) FROM v2.customers") == 1
    assert db.scalar("SELECT count(*) FROM v2.employees") == 4
    assert pos.divergence(db, ["customers", "employees"]) == {}


@pytest.mark.parametrize("mode", ["sync", "outbox"])
def test_a_split_counts_each_row_for_the_target_that_gets_it(db, sidecar, mode):
    handle = start(db, sidecar, mode)
    counts = Counts()
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        conn.execute(  # simple protocol
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) VALUES "
            "(1, 'a@x', 'A', 'A', 'customer'), (1, 'b@x', 'B', 'B', 'employee'), "
            "(1, 'c@x', 'C', 'C', 'manager')"
        )
        conn.execute(  # extended protocol, binary results
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "VALUES (1, %s, 'D', 'D', 'customer') RETURNING id, email",
            ("d@x",),
            binary=True,
        )
        conn.execute("UPDATE users SET phone = %s WHERE role <> 'customer'", ("+1",))
        conn.execute("UPDATE users SET phone = NULL WHERE false")
    pos.drain(handle)
    customers = db.scalar("SELECT count(*) FROM v2.customers")
    employees = db.scalar("SELECT count(*) FROM v2.employees")
    assert (customers, employees) == (2, 2)
    assert counts.moved(MIRRORED, "customers", "insert") == customers
    assert counts.moved(MIRRORED, "employees", "insert") == employees
    assert counts.moved(MIRRORED, "customers", "update") == 0
    assert counts.moved(MIRRORED, "employees", "update") == 2
    # every statement still counts as rewritten for both halves of the split
    assert counts.moved(REWRITTEN, "customers", "update") == 2
    assert counts.moved(REWRITTEN, "employees", "update") == 2
