"""Mirror modes: sync (the target is written by the application's statement, so a failing mirror
fails it), outbox (an applier copies current state; what the target rejects is dead-lettered,
retried with backoff, and blocks nothing else), pause/resume (a paused outbox mapping still
captures keys; a paused sync mapping falls back to outbox capture, even through statements
prepared before the pause), and the metrics that show each of these.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support import pos, wait_until

from mirror.applier import Applier

FAST_APPLIER = {
    "poll_interval_seconds": 0.05,
    "retry_base_seconds": 0.2,
    "retry_max_seconds": 1.0,
}


def start(db, sidecar, *names: str, applier: dict[str, Any] | None = None, **mapping: Any):
    migration = pos.migration(*names, **mapping)
    pos.prepare(db, migration)
    return sidecar({**migration, "applier": {**FAST_APPLIER, **(applier or {})}})


def scrape_http(handle) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample /metrics serves, keyed by (name, labels)."""
    status, text = handle.http("/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def refresh_gauges(handle) -> None:
    """What the applier's gauge task does every few seconds, now."""
    handle.call(handle.sidecar.applier.refresh_gauges)


# --- sync ---------------------------------------------------------------------------------------


def test_a_failing_sync_mirror_fails_the_statement_and_nothing_lands(db, sidecar):
    handle = start(db, sidecar, "tier-pricing")
    # the target refuses what the source accepts
    db.sql("ALTER TABLE v2.products ADD CONSTRAINT gold_floor CHECK (price_gold >= 1)")
    db.sql("INSERT INTO products (tenant_id, sku, name, price) VALUES (1, 'OLD', 'old', 50)")
    pos.backfill(db, ["products"])
    failures = pos.scrape("dualwrite_mirror_failures_total", mapping="products", stage="statement")
    errors: list[psycopg.Error | asyncpg.PostgresError] = []

    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        insert = "INSERT INTO products (tenant_id, sku, name, price) VALUES (1, {}, 'cheap', {})"
        for sql, params in (
            (insert.format("'CHEAP'", "1.00"), None),  # simple protocol
            (insert.format("%s", "%s"), ("CHEAP", Decimal("1.00"))),  # extended protocol
        ):
            with pytest.raises(psycopg.errors.CheckViolation) as failed:
                conn.execute(sql, params)
            errors.append(failed.value)
        with conn.transaction():  # inside a transaction, the transaction is what fails
            conn.execute("UPDATE products SET name = 'renamed' WHERE sku = 'OLD'")
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("UPDATE products SET price = 0.5 WHERE sku = 'OLD'")
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
            raise psycopg.Rollback()

    async def with_asyncpg() -> None:
        conn = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        try:
            with pytest.raises(asyncpg.CheckViolationError) as failed:
                await conn.fetch(
                    "UPDATE products SET price = $1 WHERE sku = 'OLD' RETURNING id", Decimal("0.99")
                )
            errors.append(failed.value)
        finally:
            await conn.close()

    asyncio.run(with_asyncpg())
    for error in errors:
        assert error.sqlstate == "23514"
        diag = error.diag if isinstance(error, psycopg.Error) else error
        assert (diag.schema_name, diag.table_name, diag.constraint_name) == (
            "v2",
            "products",
            "gold_floor",
        )
    assert db.sql("SELECT sku, name, price FROM products") == [("OLD", "old", Decimal("50.00"))]
    assert db.sql("SELECT sku, name, price FROM v2.products") == [("OLD", "old", Decimal("50.00"))]
    assert pos.outbox_depth(db) == 0
    # four statements failed on the target (the transaction's failing UPDATE included)
    moved = pos.scrape("dualwrite_mirror_failures_total", mapping="products", stage="statement")
    assert moved - failures == 4


def test_a_source_error_is_not_a_mirror_failure(db, sidecar):
    """public.products and v2.products share a name: only the target's errors are the mirror's."""
    handle = start(db, sidecar, "tier-pricing")
    failures = pos.scrape("dualwrite_mirror_failures_total", mapping="products", stage="statement")
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation) as failed:
            conn.execute(
                "INSERT INTO products (tenant_id, sku, name, price) VALUES (1, 'N', 'n', -1)"
            )
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                "INSERT INTO products (id, tenant_id, sku, name, price) VALUES "
                "(1, 1, 'U', 'u', 1), (1, 1, 'V', 'v', 1)"
            )
    assert failed.value.diag.schema_name == "public"
    moved = pos.scrape("dualwrite_mirror_failures_total", mapping="products", stage="statement")
    assert moved - failures == 0
    assert db.scalar("SELECT count(*) FROM v2.products") == 0


# --- outbox: dead letters -------------------------------------------------------------------------

SALE = "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, %s, %s) RETURNING id"


def test_dead_letters_retry_with_backoff_block_nothing_and_drain_once_fixed(db, sidecar):
    handle = start(db, sidecar, "transactions-total")
    db.sql("ALTER TABLE v2.transactions ADD CONSTRAINT modest CHECK (total_amount < 1000)")
    dead_lettered = pos.scrape("dualwrite_dead_lettered_total", mapping="transactions")
    applier_failures = pos.scrape(
        "dualwrite_mirror_failures_total", mapping="transactions", stage="applier"
    )

    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        # one statement, three keys in one outbox batch: the big one must not hold the others
        ids = [
            r[0]
            for r in conn.execute(
                "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES "
                "(1, 1, 10), (1, 500, 10), (1, 2, 10) RETURNING id"
            )
        ]
    small, big, other = ids

    def dead() -> list[tuple[Any, ...]]:
        return db.sql(
            "SELECT key, sqlstate, error, attempts, "
            "extract(epoch FROM next_attempt_at - last_failed_at)::float8 "
            "FROM dualwrite.dead_letters WHERE mapping = 'transactions'"
        )

    wait_until(
        lambda: len(dead()) == 1 and pos.target_count(db, "transactions") == 2,
        what="the big sale dead-lettered and the others applied",
    )
    assert {r[0] for r in db.sql("SELECT id FROM v2.transactions")} == {small, other}
    key, sqlstate, error, _, _ = dead()[0]
    assert (key, sqlstate) == ([big], "23514")
    assert 'violates check constraint "modest"' in error

    # retried with exponential backoff (base 0.2 s, capped at 1 s)
    wait_until(lambda: dead()[0][3] >= 4, timeout=20, what="four attempts")
    attempts, delay = dead()[0][3:5]
    assert delay == pytest.approx(min(1.0, 0.2 * 2 ** (attempts - 1)))

    # meanwhile other keys flow, and a later write of the dead key is retried, not lost
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        later = conn.execute(SALE, (3, 10)).fetchone()[0]
        conn.execute("UPDATE transactions SET status = 'disputed' WHERE id = %s", (big,))
    wait_until(
        lambda: db.scalar("SELECT count(*) FROM v2.transactions WHERE id = %s", later),
        what="a later key applied while a dead letter waits",
    )
    assert pos.outbox_depth(db) == 0 or wait_until(lambda: pos.outbox_depth(db) == 0)
    assert len(dead()) == 1

    refresh_gauges(handle)
    samples = scrape_http(handle)
    assert sample(samples, "dualwrite_dead_letters", mapping="transactions") == 1
    assert pos.scrape("dualwrite_dead_lettered_total", mapping="transactions") - dead_lettered >= 4
    assert (
        pos.scrape("dualwrite_mirror_failures_total", mapping="transactions", stage="applier")
        > applier_failures
    )

    # fix the target: the dead letter drains at its next attempt
    db.sql("ALTER TABLE v2.transactions DROP CONSTRAINT modest")
    wait_until(lambda: not dead(), timeout=20, what="the dead letter to drain")
    assert db.sql("SELECT status, total_amount FROM v2.transactions WHERE id = %s", big) == [
        ("disputed", Decimal("5000.00"))
    ]
    refresh_gauges(handle)
    assert sample(scrape_http(handle), "dualwrite_dead_letters", mapping="transactions") == 0
    assert pos.divergence(db, ["transactions"]) == {}


def test_a_few_rejected_keys_in_a_big_batch_are_found_by_bisection(db, sidecar):
    """1000 keys in one batch, 3 of them rejected: the 997 land, the 3 are dead-lettered, and
    finding them takes a few dozen attempts, not one per key."""
    handle = start(
        db, sidecar, "transactions-total", applier={"enabled": False, "batch_size": 2000}
    )
    db.sql("ALTER TABLE v2.transactions ADD CONSTRAINT modest CHECK (total_amount < 1000)")
    # Count apply statements: a sequence advances even in a rolled-back savepoint.
    db.sql("CREATE SEQUENCE public.apply_attempts")
    db.sql(
        "CREATE FUNCTION public.count_attempt() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM nextval('public.apply_attempts'); RETURN NULL; END $$"
    )
    db.sql(
        "CREATE TRIGGER count_attempt BEFORE INSERT ON v2.transactions "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.count_attempt()"
    )
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "INSERT INTO transactions (tenant_id, quantity, unit_price) "
                "SELECT 1, CASE WHEN g IN (7, 500, 993) THEN 500 ELSE 1 END, 10 "
                "FROM generate_series(1, 1000) AS g ORDER BY g RETURNING id"
            )
        ]
    bad = {ids[6], ids[499], ids[992]}
    assert pos.outbox_depth(db, "transactions") == 1000
    sidecar = handle.sidecar
    applier = Applier(sidecar.pool, sidecar.mappings, sidecar.config.applier, sidecar.states)
    outcome = handle.call(applier.apply_batch, sidecar.mappings[0])
    assert (outcome.claimed, outcome.dead_lettered, outcome.applied.upserted) == (1000, 3, 997)
    assert {r[0][0] for r in db.sql("SELECT key FROM dualwrite.dead_letters")} == bad
    assert db.scalar("SELECT count(*) FROM v2.transactions") == 997
    assert pos.outbox_depth(db, "transactions") == 0
    attempts = db.scalar("SELECT last_value FROM public.apply_attempts")
    assert attempts <= 2 * 3 * 10 + 1  # 2k·log2(n) + the first try; one per key would be 1000


def test_the_applier_copies_current_state_not_events(db, sidecar):
    """Keys captured for several versions of a row apply its state now, once."""
    handle = start(db, sidecar, "transactions-total", applier={"enabled": False})
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        sale = conn.execute(SALE, (1, 10)).fetchone()[0]
        for quantity in (2, 3, 4):
            conn.execute("UPDATE transactions SET quantity = %s WHERE id = %s", (quantity, sale))
        gone = conn.execute(SALE, (9, 9)).fetchone()[0]
        conn.execute("DELETE FROM transactions WHERE id = %s", (gone,))
    assert pos.outbox_depth(db, "transactions") == 6
    upserted = pos.scrape(
        "dualwrite_applier_rows_total", mapping="transactions", outcome="upserted"
    )
    pos.drain(handle)
    assert db.sql("SELECT id, quantity, total_amount FROM v2.transactions") == [
        (sale, 4, Decimal("40.00"))
    ]
    assert (
        pos.scrape("dualwrite_applier_rows_total", mapping="transactions", outcome="upserted")
        - upserted
        == 1
    )


# --- pause / resume -------------------------------------------------------------------------------


def test_a_paused_outbox_mapping_still_captures_and_resume_drains(db, sidecar):
    handle = start(db, sidecar, "split-users", "transactions-total")
    pos.set_paused(handle, "transactions", True)
    assert sample(scrape_http(handle), "dualwrite_mapping_paused", mapping="transactions") == 1

    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        sales = [conn.execute(SALE, (q, 2)).fetchone()[0] for q in (1, 2, 3)]
        # Two customers one after the other: the second can only be applied in a later pass of
        # the applier over all mappings than the first, so the applier did pass over the
        # paused mapping (and left it alone) in between.
        for email in ("first@x", "second@x"):
            conn.execute(
                "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
                "VALUES (1, %s, 'A', 'B', 'customer')",
                (email,),
            )
            wait_until(
                lambda email=email: db.scalar(
                    "SELECT count(*) FROM v2.customers WHERE email = %s", email
                ),
                what=f"{email} applied",
            )
    assert pos.outbox_depth(db, "transactions") == 3
    assert pos.target_count(db, "transactions") == 0

    refresh_gauges(handle)
    samples = scrape_http(handle)
    assert sample(samples, "dualwrite_outbox_depth", mapping="transactions") == 3
    assert sample(samples, "dualwrite_outbox_oldest_age_seconds", mapping="transactions") > 0
    assert sample(samples, "dualwrite_outbox_depth", mapping="customers") == 0

    pos.set_paused(handle, "transactions", False)
    wait_until(lambda: pos.outbox_depth(db) == 0, what="the resumed mapping to drain")
    assert sorted(r[0] for r in db.sql("SELECT id FROM v2.transactions")) == sales
    refresh_gauges(handle)
    samples = scrape_http(handle)
    assert sample(samples, "dualwrite_outbox_depth", mapping="transactions") == 0
    assert sample(samples, "dualwrite_mapping_paused", mapping="transactions") == 0
    assert pos.divergence(db, ["customers", "employees", "transactions"]) == {}


PRICE = "UPDATE products SET price = %s WHERE sku = %s"
PRICE_PG = "UPDATE products SET price = $1 WHERE sku = $2 RETURNING sku, price"


def test_a_paused_sync_mapping_falls_back_to_outbox_even_for_earlier_prepared_statements(
    db, sidecar
):
    handle = start(db, sidecar, "tier-pricing", applier={"enabled": False})
    db.sql(
        "INSERT INTO products (tenant_id, sku, name, price) VALUES "
        "(1, 'A', 'a', 10), (1, 'B', 'b', 20), (1, 'C', 'c', 30)"
    )
    pos.backfill(db, ["products"])

    def target_prices() -> dict[str, Decimal]:
        return dict(db.sql("SELECT sku, price FROM v2.products"))

    async def scenario() -> list[Any]:
        seen: list[Any] = []
        app = await asyncpg.connect(handle.dsn(user=pos.APP_ROLE))
        with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
            # prepared, and run once, before the pause: sync, the target follows at once
            reprice = await app.prepare(PRICE_PG)
            seen.append(await reprice.fetch(Decimal("11"), "A"))
            conn.execute(PRICE, (Decimal("21"), "B"), prepare=True)
            assert target_prices() == {
                "A": Decimal("11.00"),
                "B": Decimal("21.00"),
                "C": Decimal("30.00"),
            }
            assert pos.outbox_depth(db) == 0

            pos.set_paused(handle, "products", True)
            seen.append(await reprice.fetch(Decimal("12"), "A"))
            conn.execute(PRICE, (Decimal("22"), "B"), prepare=True)
            conn.execute("UPDATE products SET price = 32 WHERE sku = 'C'")  # simple protocol
            conn.execute(
                "INSERT INTO products (tenant_id, sku, name, price) VALUES (1, 'D', 'd', 40)"
            )
            # the target is untouched while paused; the keys wait in the outbox
            assert target_prices() == {
                "A": Decimal("11.00"),
                "B": Decimal("21.00"),
                "C": Decimal("30.00"),
            }
            assert pos.outbox_depth(db, "products") == 4

            pos.set_paused(handle, "products", False)
            pos.drain(handle)  # resume drains (this sidecar's applier is off: drained here)
            assert target_prices() == {
                "A": Decimal("12.00"),
                "B": Decimal("22.00"),
                "C": Decimal("32.00"),
                "D": Decimal("40.00"),
            }
            # and the same prepared statements are sync again
            seen.append(await reprice.fetch(Decimal("13"), "A"))
            conn.execute(PRICE, (Decimal("23"), "B"), prepare=True)
            assert target_prices()["A"] == Decimal("13.00")
            assert target_prices()["B"] == Decimal("23.00")
            assert pos.outbox_depth(db) == 0
        await app.close()
        return seen

    seen = asyncio.run(scenario())
    # what the application saw did not change with the mode
    assert [[tuple(r.items()) for r in rows] for rows in seen] == [
        [(("sku", "A"), ("price", Decimal(f"{price}.00")))] for price in (11, 12, 13)
    ]
    assert db.sql("SELECT price_silver FROM v2.products WHERE sku = 'A'") == [(Decimal("12.35"),)]
    assert pos.divergence(db, ["products"]) == {}


# --- metrics --------------------------------------------------------------------------------------


def test_rewritten_statements_and_rows_mirrored_are_counted(db, sidecar):
    handle = start(db, sidecar, "split-users", "tier-pricing")
    before = scrape_http(handle)
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) VALUES "
            "(1, 'a@x', 'A', 'A', 'customer'), (1, 'b@x', 'B', 'B', 'employee'), "
            "(1, 'c@x', 'C', 'C', 'manager')"
        )
        conn.execute("UPDATE users SET phone = %s WHERE role <> 'customer'", ("+1",))
        conn.execute("DELETE FROM users WHERE email = 'a@x'")
        conn.execute("UPDATE users SET phone = NULL WHERE false")
        conn.execute("INSERT INTO products (tenant_id, sku, name, price) VALUES (1, 'P', 'p', 1)")
    after = scrape_http(handle)

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    for mapping in ("customers", "employees"):  # one statement feeds both halves of the split
        assert (
            moved("dualwrite_statements_rewritten_total", mapping=mapping, operation="insert") == 1
        )
        assert (
            moved("dualwrite_statements_rewritten_total", mapping=mapping, operation="update") == 2
        )
        assert (
            moved("dualwrite_statements_rewritten_total", mapping=mapping, operation="delete") == 1
        )
    # rows are counted for the half of the split whose target gets them
    for mapping, written in (("customers", (1, 0, 1)), ("employees", (2, 2, 0))):
        for operation, rows in zip(("insert", "update", "delete"), written, strict=True):
            assert moved("dualwrite_rows_mirrored_total", mapping=mapping, operation=operation) == (
                rows
            )
    assert moved("dualwrite_rows_mirrored_total", mapping="products", operation="insert") == 1
    assert moved("dualwrite_mirror_failures_total", mapping="products", stage="statement") == 0
    pos.drain(handle)
    assert pos.divergence(db, ["customers", "employees", "products"]) == {}
