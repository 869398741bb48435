"""Reconciling while the application writes through the proxy: a clean database reconciles to
zero under load (pending allowed), a lagging cross-database mirror is pending, never divergent;
the continuous pass in ``dualwrite run``; throttling."""

from __future__ import annotations

import asyncio
import random
import threading

import asyncpg
import psycopg
import pytest
from structlog.testing import capture_logs
from support import wait_until
from test_compare_support import config_data, prepare, reconcile

from compare import throttle as throttle_module
from compare.throttle import Throttle
from core.config import PressureConfig
from core.control import set_paused

_TABLES = """
CREATE TABLE items (id serial PRIMARY KEY, tenant int NOT NULL, qty int, label text);
"""
_TARGET = """
CREATE SCHEMA v2;
CREATE TABLE v2.items (id int PRIMARY KEY, tenant int NOT NULL, qty int, label text);
"""


def _mapping(**extra: object) -> dict[str, object]:
    return {
        "name": "items",
        "source": "items",
        "target": "v2.items",
        "key": ["id"],
        "columns": {"id": "id", "tenant": "tenant", "qty": "qty * 2", "label": "upper(label)"},
        "tenant_column": "tenant",
        **extra,
    }


class Writer:
    """Random inserts, updates and deletes through the proxy until stopped."""

    def __init__(self, dsn: str, seed: int, max_id: int = 400) -> None:
        self.dsn = dsn
        self.random = random.Random(seed)
        self.max_id = max_id
        self.statements = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, self.errors

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self._stop.is_set():
                    self._one(conn)
                    self.statements += 1
        except BaseException as exc:
            self.errors.append(exc)

    def _one(self, conn: psycopg.Connection) -> None:
        r = self.random
        choice = r.random()
        some = r.randint(1, self.max_id)
        if choice < 0.3:
            conn.execute(
                "INSERT INTO items (tenant, qty, label) VALUES (%s, %s, %s)",
                (r.randint(0, 3), r.randint(0, 99), f"new {r.random():.4f}"),
            )
        elif choice < 0.8:
            conn.execute(
                "UPDATE items SET qty = qty + 1, label = label || 'x' WHERE id = %s", (some,)
            )
        elif choice < 0.9:
            with conn.transaction():
                conn.execute(
                    "UPDATE items SET label = 'batch' WHERE id BETWEEN %s AND %s", (some, some + 5)
                )
                conn.execute("DELETE FROM items WHERE id = %s", (some + 7,))
        else:
            conn.execute("DELETE FROM items WHERE id = %s", (some,))


@pytest.mark.parametrize(
    ("mode", "workers"),
    [("outbox", 1), ("sync", 1), ("outbox", 3)],
    ids=["outbox", "sync", "outbox-3-workers"],
)
async def test_clean_database_reconciles_to_zero_under_write_load(db, sidecar, mode, workers):
    db.sql(_TABLES + _TARGET)
    data = config_data(
        db.dsn, [_mapping(mode=mode)], reconcile={"chunk_rows": 25, "workers": workers}
    )
    config, mappings = await prepare(data)
    handle = sidecar({"mappings": data["mappings"], "applier": {"poll_interval_seconds": 0.05}})
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items (tenant, qty, label) "
            "SELECT g % 4, g, 'item ' || g FROM generate_series(1, 400) AS g"
        )
    pending = passes = 0
    with Writer(handle.dsn(), 1) as one, Writer(handle.dsn(), 2):
        wait_until(lambda: one.statements > 20, what="the load to start")
        while passes < 3 or one.statements < 600:
            during = one.statements
            result = await reconcile(config, mappings["items"])
            assert result.tally.counts == {"missing": 0, "extra": 0, "changed": 0}
            assert one.statements > during  # writes landed while the pass ran
            pending += result.tally.pending
            passes += 1
    if mode == "sync":
        assert pending == 0  # the mirror lands in the application's own statement
    handle.call(handle.sidecar.applier.drain)
    final = await reconcile(config, mappings["items"])
    assert final.tally.clean
    assert final.tally.pending == 0
    assert final.tally.compared == db.scalar("SELECT count(*) FROM items")


async def test_a_lagging_cross_database_mirror_is_pending_not_divergent(db, pg, sidecar):
    other = pg.create_database()
    try:
        await _lagging_mirror(db, other, pg, sidecar)
    finally:
        other.drop()


async def _lagging_mirror(db, other, pg, sidecar) -> None:
    seed = (
        "INSERT INTO items (tenant, qty, label) "
        "SELECT g % 4, g, 'item ' || g FROM generate_series(1, 300) AS g"
    )
    db.sql(_TABLES + seed)
    other.sql(
        _TABLES
        + seed
        + ";"
        + _TARGET
        + "INSERT INTO v2.items SELECT id, tenant, qty * 2, upper(label) FROM items;"
        "DROP TABLE items;"
    )
    mapping = _mapping(target_dsn=pg.dsn(other.name, password=""))
    data = config_data(db.dsn, [mapping], reconcile={"recheck_delay_seconds": 0.3})
    config, mappings = await prepare(data)
    assert (await reconcile(config, mappings["items"])).tally.clean
    handle = sidecar({"mappings": [mapping], "applier": {"poll_interval_seconds": 0.05}})
    await _pause(db.dsn, True)
    wait_until(lambda: handle.call(lambda: handle.sidecar.states.is_paused("items")))
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("UPDATE items SET qty = qty + 1 WHERE id <= 100")
        conn.execute(
            "INSERT INTO items (tenant, qty, label) SELECT 1, g, 'late' "
            "FROM generate_series(1, 50) AS g"
        )
        conn.execute("DELETE FROM items WHERE id BETWEEN 201 AND 220")
    queued = db.scalar("SELECT count(DISTINCT key) FROM dualwrite.outbox")
    assert queued == 170
    lagging = await reconcile(config, mappings["items"])
    assert lagging.tally.counts == {"missing": 0, "extra": 0, "changed": 0}
    assert lagging.tally.pending == 170
    # resume while a pass runs: the applier drains under the reconciler's feet
    running = asyncio.ensure_future(reconcile(config, mappings["items"]))
    await _pause(db.dsn, False)
    with Writer(handle.dsn(), 3, max_id=350):
        during = await running
        assert during.tally.counts == {"missing": 0, "extra": 0, "changed": 0}
    wait_until(lambda: db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0, 30)
    final = await reconcile(config, mappings["items"])
    assert final.tally.clean
    assert final.tally.pending == 0


async def _pause(dsn: str, paused: bool) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await set_paused(conn, "items", paused, by="test")
    finally:
        await conn.close()


def test_the_sidecar_reconciles_continuously_when_an_interval_is_set(db, sidecar):
    db.sql(_TABLES + _TARGET)
    data = config_data(db.dsn, [_mapping()])
    asyncio.run(prepare(data))
    handle = sidecar({"mappings": data["mappings"], "reconcile": {"interval_seconds": 0.3}})
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO items (tenant, qty, label) VALUES (1, 1, 'one')")
    runs = wait_until(
        lambda: db.sql(
            "SELECT status, requested_by, sidecar FROM dualwrite.reconcile_runs "
            "WHERE kind = 'reconcile' AND status = 'done'"
        )[1:],
        20,
        "two continuous passes",
    )
    assert {r[1] for r in runs} == {f"continuous:{handle.sidecar.recorder.sidecar}"}


# --- throttling ---------------------------------------------------------------------------------


async def test_pace_sleeps_to_keep_the_rate(monkeypatch):
    now = [100.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(throttle_module.asyncio, "sleep", fake_sleep)
    pace = Throttle("m", 100, PressureConfig(), [], activity="test", clock=lambda: now[0])
    await pace.pace(50)
    assert slept == [0.5]
    now[0] += 0.2  # the next chunk took 0.2 s of work
    await pace.pace(50)
    assert slept == [0.5, pytest.approx(0.3)]
    now[0] += 5  # slower than the rate: no sleep
    await pace.pace(50)
    assert len(slept) == 2
    unlimited = Throttle("m", None, PressureConfig(), [], activity="test")
    await unlimited.pace(10_000)
    assert len(slept) == 2


async def test_a_pass_pauses_while_the_database_is_busy_and_says_so(logical_db):
    # pressure counts the whole server's active sessions; on the shared server other test runs
    # keep that count up, so this test uses the session's own cluster, where only it runs
    db = logical_db
    db.sql(
        _TABLES + _TARGET + "INSERT INTO items (tenant, qty, label) VALUES (1, 1, 'a');"
        "INSERT INTO v2.items VALUES (1, 1, 2, 'A');"
    )
    pressure = {"max_active_connections": 1, "check_interval_seconds": 0.1}
    data = config_data(db.dsn, [_mapping()], reconcile={"pressure": pressure})
    config, mappings = await prepare(data)
    busy = [
        threading.Thread(target=db.server.sql, args=("SELECT pg_sleep(1.5)",)) for _ in range(2)
    ]
    for thread in busy:
        thread.start()
    wait_until(
        lambda: (
            db.server.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(1.5)' "
                "AND state = 'active'"
            )[0][0]
            == 2
        )
    )
    with capture_logs() as logs:
        result = await reconcile(config, mappings["items"])
    for thread in busy:
        thread.join()
    events = [e["event"] for e in logs if e.get("component") == "throttle"]
    assert events[:2] == ["throttle_paused", "throttle_resumed"]
    paused = next(e for e in logs if e["event"] == "throttle_paused")
    assert "active connections (limit 1)" in paused["reason"]
    assert result.tally.clean
