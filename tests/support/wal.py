"""WAL-capture test helpers: the audit-log migration captured from the WAL, the paths that write
``audit_log`` around statement capture (a function, a DO block, a trigger, COPY, a direct
connection), and waiting until the reader has confirmed everything committed so far."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg

from . import pos
from .postgres import Database
from .procs import wait_until

MAPPING = "audit_events"

#: what the paths around statement capture need: a function that inserts, another table whose
#: trigger inserts
EXTRAS = """
CREATE OR REPLACE FUNCTION log_sale(sale bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO audit_log (tenant_id, action, entity, entity_id, details)
    VALUES (1, 'sale', 'sale', sale, '{"via": "function"}')
$$;
CREATE TABLE IF NOT EXISTS sales (
    id bigserial PRIMARY KEY, tenant_id bigint NOT NULL, amount numeric NOT NULL
);
CREATE OR REPLACE FUNCTION audit_sale() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO audit_log (tenant_id, action, entity, entity_id, details)
    VALUES (NEW.tenant_id, 'insert', 'sales', NEW.id, jsonb_build_object('amount', NEW.amount));
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS sales_audit ON sales;
CREATE TRIGGER sales_audit AFTER INSERT ON sales FOR EACH ROW EXECUTE FUNCTION audit_sale();
"""
APP_GRANTS = """
GRANT SELECT, INSERT, UPDATE, DELETE ON sales TO pos_app;
GRANT USAGE ON SEQUENCE sales_id_seq TO pos_app;
"""


def migration(capture: str, slot: str, **wal: Any) -> dict[str, Any]:
    """config/audit-log-wal.yaml's mapping with this capture, a slot of the test's own, and a
    fast reader and applier."""
    config = pos.migration("audit-log-wal", capture=capture)
    config["wal"] = {
        "slot_name": slot,
        "publication_name": slot,
        "poll_interval_seconds": 0.05,
        **wal,
    }
    config["applier"] = {"poll_interval_seconds": 0.05}
    return config


def prepare(db: Database, config: dict[str, Any]) -> list[str]:
    """The POS schema, the extra writers, the app role, then ``dualwrite setup``."""
    pos.load_schema(db)
    db.sql(EXTRAS)
    pos.ensure_app_role(db)
    db.sql(APP_GRANTS)
    return pos.run_setup(db, config)


class Writes:
    """Counts committed writes to audit_log by path (thread-safe): ``captured`` ones went through
    the sidecar as plain statements; every other path bypasses statement capture."""

    def __init__(self) -> None:
        self.rows: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add(self, path: str, rows: int) -> None:
        with self._lock:
            self.rows[path] += rows

    @property
    def bypassing(self) -> int:
        return sum(n for path, n in self.rows.items() if path != "statement")


def write_every_way(proxy_dsn: str, direct_dsn: str, writes: Writes, tenant: int = 1) -> None:
    """One round of every path: through the sidecar a plain INSERT, UPDATE and DELETE, a
    function, a DO block, a trigger and COPY; then a direct connection around it."""
    with psycopg.connect(proxy_dsn, autocommit=True) as conn:
        new_id = conn.execute(
            "INSERT INTO audit_log (tenant_id, action, entity, entity_id) "
            "VALUES (%s, 'login', 'user', 1) RETURNING id",
            (tenant,),
        ).fetchone()[0]
        writes.add("statement", 1)
        conn.execute("UPDATE audit_log SET details = '{\"ok\": true}' WHERE id = %s", (new_id,))
        writes.add("statement", 1)
        gone = conn.execute(
            "INSERT INTO audit_log (tenant_id, action, entity) VALUES (%s, 'tmp', 'x') "
            "RETURNING id",
            (tenant,),
        ).fetchone()[0]
        writes.add("statement", 1)
        conn.execute("DELETE FROM audit_log WHERE id = %s", (gone,))
        writes.add("statement", 1)
        conn.execute("SELECT log_sale(%s)", (new_id,))
        writes.add("function", 1)
        conn.execute(
            "DO $$ BEGIN INSERT INTO audit_log (tenant_id, action, entity) "
            "SELECT 2, 'batch', 'do' FROM generate_series(1, 3); END $$"
        )
        writes.add("do_block", 3)
        conn.execute("INSERT INTO sales (tenant_id, amount) VALUES (%s, 9.99)", (tenant,))
        writes.add("trigger", 1)
        with conn.cursor().copy(
            "COPY audit_log (tenant_id, action, entity) FROM STDIN"
        ) as copy:
            copy.write_row((tenant, "import", "copy"))
            copy.write_row((tenant, "import", "copy"))
        writes.add("copy", 2)
    with psycopg.connect(direct_dsn, autocommit=True) as conn:
        direct = conn.execute(
            "INSERT INTO audit_log (tenant_id, action, entity) VALUES (3, 'cron', 'job') "
            "RETURNING id"
        ).fetchone()[0]
        conn.execute("UPDATE audit_log SET action = 'cron-done' WHERE id = %s", (direct,))
        doomed = conn.execute(
            "INSERT INTO audit_log (tenant_id, action, entity) VALUES (3, 'oops', 'job') "
            "RETURNING id"
        ).fetchone()[0]
        conn.execute("DELETE FROM audit_log WHERE id = %s", (doomed,))
        writes.add("direct", 4)


def run_concurrently(work: Callable[[int], None], threads: int) -> None:
    """``work(i)`` in ``threads`` threads; re-raise the first failure."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def wait_confirmed(db: Database, slot: str, timeout: float = 60.0) -> None:
    """Until the slot is confirmed past everything committed before this call."""
    with db.connect() as conn:
        # the test clusters commit asynchronously: a synchronous commit flushes all WAL before
        # it, so the flushed position (what the reader reads up to) covers every commit so far
        # (a transaction that writes no WAL of its own commits asynchronously anyway:
        # creating a temporary table writes catalog WAL)
        conn.execute("SET synchronous_commit = on")
        conn.execute("CREATE TEMPORARY TABLE flush_marker (x int)")
        target = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()[0]
    wait_until(
        lambda: db.scalar(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = %s",
            target,
            slot,
        ),
        timeout=timeout,
        what=f"slot {slot} to confirm {target}",
        interval=0.05,
    )


def wait_applied(db: Database, slot: str, timeout: float = 60.0) -> None:
    """Until the reader confirmed everything committed so far and the outbox is empty."""
    wait_confirmed(db, slot, timeout)
    wait_until(
        lambda: pos.outbox_depth(db) == 0, timeout=timeout, what="the outbox to drain"
    )


def uncaptured_rows(db: Database) -> int:
    return int(db.scalar("SELECT count(*) FROM dualwrite.uncaptured_changes"))
