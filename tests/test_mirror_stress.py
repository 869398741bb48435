"""Many concurrent clients, and crashes: nothing is lost, nothing is duplicated.

Twelve clients (asyncpg and psycopg; simple and prepared statements) write at random to the
split users and the transactions mappings, in autocommit and in explicit transactions that
commit, roll back, or roll back to a savepoint. Afterwards, with the outbox drained, every
target equals the mapping applied to its source, by this suite's own SQL (EXCEPT ALL both ways
and counts, support/pos.py): in sync mode also *during* the run, in one snapshot.

Then the crashes: the proxy (a real ``dualwrite run`` process) is killed with SIGKILL in the
middle of the workload and restarted, clients reconnect and go on; separately an applier run as
``python -m dualwrite apply`` is killed mid-drain and restarted. Still equal.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from support import free_port, pos, wait_until

MAPPINGS = ["customers", "employees", "transactions"]
#: rows that exist before the window opens (copied into the targets by the test's backfill)
SEED = """
INSERT INTO users (tenant_id, email, first_name, last_name, role)
SELECT 1 + g % 3, 'seed' || g || '@x', 'Seed', 'User' || g,
       (ARRAY['customer', 'employee', 'manager'])[1 + g % 3]
FROM generate_series(1, 300) AS g;
INSERT INTO transactions (tenant_id, user_id, quantity, unit_price)
SELECT 1 + g % 3, g, 1 + g % 5, 9.99 FROM generate_series(1, 300) AS g;
"""


def migration(mode: str) -> dict[str, Any]:
    return pos.migration(
        "split-users",
        "transactions-total",
        modes={"customers": mode, "employees": mode, "transactions": mode},
    )


def prepare(db, mode: str) -> dict[str, Any]:
    config = migration(mode)
    pos.prepare(db, config)
    db.sql(SEED)
    pos.backfill(db, MAPPINGS)
    return config


def settled(db) -> None:
    """Every key applied, none dead-lettered, every target exact."""
    assert db.scalar("SELECT count(*) FROM dualwrite.dead_letters") == 0
    assert pos.outbox_depth(db) == 0
    assert pos.divergence(db, MAPPINGS) == {}


def busy(workload: pos.Workload, at_least: int) -> None:
    """Wait until the clients have done ``at_least`` more units of work (or one has failed)."""
    target = workload.total() + at_least
    wait_until(
        lambda: workload.failures or workload.total() >= target,
        timeout=60,
        what=f"{at_least} more units of work",
    )
    if workload.failures:
        raise workload.failures[0]


def check_tally(tally: pos.WorkloadTally) -> None:
    """The workload really did what the test is about."""
    for operation in ("insert_user", "change_role", "delete_user", "insert_sale", "refund"):
        assert tally.committed[operation] > 10, tally
        assert tally.rolled_back[operation] > 0, tally


@pytest.mark.parametrize("mode", ["sync", "outbox"])
def test_concurrent_clients_leave_every_target_equal_to_the_mapping(db, sidecar, mode):
    """Every client moves, updates and deletes rows of all clients, in both modes (two
    transactions moving the same user at once: see the racing test below)."""
    config = prepare(db, mode)
    handle = sidecar({**config, "applier": {"poll_interval_seconds": 0.05, "workers": 2}})
    workload = pos.Workload(
        lambda: handle.dsn(user=pos.APP_ROLE), clients=12, shared=True
    ).start()
    try:
        for _ in range(4):
            busy(workload, 2000)
            if mode == "sync":
                # written in the application's own statements: exact at every instant
                assert pos.divergence(db, MAPPINGS, snapshot=True) == {}
    finally:
        tally = workload.stop()
    check_tally(tally)
    assert not tally.errors.keys() - {"DeadlockDetectedError", "DeadlockDetected"}, tally.errors
    if mode == "sync":
        assert pos.outbox_depth(db) == 0  # nothing went through the outbox
    pos.drain(handle)
    settled(db)
    assert db.scalar("SELECT count(*) FROM v2.customers") > 100
    assert db.scalar("SELECT count(*) FROM v2.employees") > 100


@pytest.mark.parametrize(
    "mode",
    ["sync", "outbox"],
)
def test_a_move_racing_a_concurrent_move_of_the_same_user(db, sidecar, mode):
    """A moves a user into customers and holds the lock; B, whose snapshot is older, waits on
    that lock and then deletes the user. The user must be in no target afterwards."""
    config = migration(mode)
    pos.prepare(db, config)
    handle = sidecar({**config, "applier": {"poll_interval_seconds": 0.05}})
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "VALUES (1, 'k@x', 'K', 'K', 'employee')"
        )
    mover = psycopg.connect(handle.dsn(user=pos.APP_ROLE))
    mover.execute("UPDATE users SET role = 'customer' WHERE email = 'k@x'")
    failures: list[BaseException] = []

    def delete() -> None:
        try:
            with psycopg.connect(
                handle.dsn(user=pos.APP_ROLE), autocommit=True, application_name="racer"
            ) as conn:
                conn.execute("DELETE FROM users WHERE email = 'k@x'")
        except BaseException as exc:
            failures.append(exc)

    racer = threading.Thread(target=delete)
    racer.start()
    wait_until(
        lambda: db.scalar(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = 'racer' AND wait_event_type = 'Lock'"
        ),
        what="the delete to wait on the mover's row lock",
    )
    mover.commit()
    mover.close()
    racer.join(30)
    assert not failures
    assert db.scalar("SELECT count(*) FROM users") == 0
    pos.drain(handle)
    assert db.sql("SELECT id FROM v2.customers UNION ALL SELECT id FROM v2.employees") == []
    settled(db)


# --- crashes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["outbox", "sync"])
def test_proxy_killed_mid_workload_and_restarted_loses_nothing(db, sidecar_process, mode):
    config = prepare(db, mode)
    ports = {"listen": {"port": free_port()}, "admin": {"port": free_port()}}
    overrides = {**config, **ports, "applier": {"poll_interval_seconds": 0.05}}
    proxy = sidecar_process(overrides)
    workload = pos.Workload(
        lambda: proxy.dsn(user=pos.APP_ROLE), clients=12, shared=mode == "outbox"
    ).start()
    try:
        busy(workload, 1500)
        proxy.kill()  # SIGKILL: mid-statement, mid-transaction, mid-applier-batch
        assert proxy.wait() == -9
        reconnects = workload.tally.reconnects
        proxy = sidecar_process(overrides)  # same ports: the clients' DSN does not change
        busy(workload, 1500)
        assert workload.tally.reconnects > reconnects
    finally:
        tally = workload.stop()
    check_tally(tally)
    wait_until(lambda: pos.outbox_depth(db) == 0, timeout=60, what="the restarted applier")
    settled(db)


def test_applier_killed_mid_drain_and_restarted_loses_nothing(db, sidecar, tmp_path):
    config = migration("outbox")
    pos.prepare(db, config)
    db.sql(SEED)
    pos.backfill(db, ["customers", "employees"])
    # A backlog: sales that exist before the window, captured through the proxy all at once.
    db.sql(
        "INSERT INTO transactions (tenant_id, quantity, unit_price) "
        "SELECT 1 + g % 3, 1 + g % 7, 1.50 FROM generate_series(1, 15000) AS g"
    )
    handle = sidecar({**config, "applier": {"enabled": False}})
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        captured = conn.execute("UPDATE transactions SET status = status").rowcount
    assert pos.outbox_depth(db, "transactions") == captured > 15000

    apply_config = {**config, "applier": {"batch_size": 100, "poll_interval_seconds": 0.05}}
    applier = pos.ApplierProcess(db, apply_config, tmp_path / "applier").start()
    workload = pos.Workload(lambda: handle.dsn(user=pos.APP_ROLE), clients=12).start()
    try:
        wait_until(
            lambda: pos.target_count(db, "transactions") >= 3000 or not applier.running,
            timeout=60,
            what="the applier to be well into the backlog",
        )
        assert applier.running, applier.output()
        assert applier.kill() == -9
        left = pos.outbox_depth(db, "transactions")
        assert left > 1000  # killed mid-drain, the rest still queued
        applier = pos.ApplierProcess(db, apply_config, tmp_path / "applier").start()
        busy(workload, 1000)
    finally:
        tally = workload.stop()
    try:
        wait_until(lambda: pos.outbox_depth(db) == 0, timeout=120, what="the restarted applier")
    finally:
        applier.stop()
    check_tally(tally)
    settled(db)
