"""Shadow reads through the real proxy: the application's reads (psql, psycopg prepared, binary
and pipelined, asyncpg) are sampled, replayed against compatibility views in one snapshot and
judged; what the control schema and the metrics then say. Also what the shadow must never do:
alarm on concurrent writes, write, make the application wait, or change its replies."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from support import Database, InProcessSidecar, PgServer
from support.procs import free_port, run_psql, wait_until
from support.transparency import RawClient, query

from compare.report.history import tenant_trouble
from core import metrics
from core.control import install
from core.logs import configure_logging
from dualwrite.cli import main

SCHEMA = """
CREATE TABLE users (
    id bigint PRIMARY KEY,
    tenant int NOT NULL,
    name text NOT NULL,
    amount numeric(10, 2) NOT NULL
);
INSERT INTO users SELECT i, i % 3, 'user ' || i, i * 1.25 FROM generate_series(1, 40) AS i;
CREATE SEQUENCE tickets;
CREATE SCHEMA v2compat;
CREATE VIEW v2compat.users AS SELECT id, tenant, name, amount FROM users;
-- a compatibility view with two bugs: one row lost, amounts rounded
CREATE SCHEMA v2bug;
CREATE VIEW v2bug.users AS
    SELECT id, tenant, name, round(amount)::numeric(10, 2) AS amount FROM users WHERE id <> 7;
-- a view that lost one row (id 7, of tenant 1) and nothing else
CREATE SCHEMA v2lost;
CREATE VIEW v2lost.users AS SELECT id, tenant, name, amount FROM users WHERE id <> 7;
-- a mapping's target, for a tenant_column
CREATE SCHEMA v2;
CREATE TABLE v2.customers (id bigint PRIMARY KEY, tenant int NOT NULL);
-- a correct view that takes 0.3 s a read: a replay is under way long enough to be killed
CREATE SCHEMA v2slow;
CREATE VIEW v2slow.users AS
    SELECT u.id, u.tenant, u.name, u.amount FROM users u CROSS JOIN pg_sleep(0.3) AS s;
"""
OUTCOMES = ("match", "mismatch", "noise", "error", "unsafe")


async def _install(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await install(conn)
    finally:
        await conn.close()


@pytest.fixture
def app_db(db: Database) -> Database:
    db.sql(SCHEMA)
    asyncio.run(_install(db.dsn))
    return db


def start(
    sidecar: Any,
    view: str = "v2compat.users",
    relay: dict[str, Any] | None = None,
    **shadow: Any,
) -> InProcessSidecar:
    settings = {
        "sample_rate": 1.0,
        "max_replays_per_second": 10_000,
        "flush_interval_seconds": 3600,
        "views": {"public.users": view},
        **shadow,
    }
    extra = {} if relay is None else {"relay": relay}
    handle: InProcessSidecar = sidecar({"shadow": settings, **extra})
    return handle


def judged() -> int:
    return sum(metrics.HOT.shadow_statements[outcome] for outcome in OUTCOMES)


def settle(handle: InProcessSidecar, since: int, replays: int) -> dict[str, dict[str, Any]]:
    """Wait for ``replays`` verdicts after ``since``, flush them; the control schema's rows."""
    wait_until(lambda: judged() - since >= replays, timeout=60, what=f"{replays} replays")
    sidecar = handle.sidecar
    assert sidecar is not None
    assert sidecar.shadow is not None
    handle.call(sidecar.shadow.flush)
    with psycopg.connect(handle.config.effective_service_dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT fingerprint, statement, matched, mismatched, noise, errors, unsafe, "
            "samples FROM dualwrite.shadow_statements"
        ).fetchall()
    return {
        row[0]: {
            "statement": row[1],
            **dict(zip(OUTCOMES, row[2:7], strict=True)),
            "samples": row[7],
        }
        for row in rows
    }


def total(shapes: dict[str, dict[str, Any]], outcome: str) -> int:
    return sum(shape[outcome] for shape in shapes.values())


async def asyncpg_reads(dsn: str) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        first = await conn.fetch(
            "SELECT id, amount FROM users WHERE tenant = $1 AND amount > $2 ORDER BY id",
            1,
            Decimal("3.5"),
        )
        second = await conn.fetchval("SELECT name FROM users WHERE id = $1", 4)
        return [first, second]
    finally:
        await conn.close()


def application_reads(dsn: str) -> int:
    """Reads with every client the issue names; returns how many statements were sent."""
    done = run_psql(dsn, "SELECT id, name FROM users WHERE tenant = 1", "-v", "ON_ERROR_STOP=1")
    assert done.returncode == 0, done.stderr
    with psycopg.connect(dsn, autocommit=True) as app:
        for user in (1, 2, 3):  # a named prepared statement, text parameters
            app.execute("SELECT name, amount FROM users WHERE id = %s", (user,), prepare=True)
        app.execute("SELECT count(*) FROM users WHERE id > %b", (10,))  # a binary parameter
        with app.pipeline():
            app.execute("SELECT sum(amount) FROM users WHERE tenant = %s", (2,))
            app.execute("SELECT max(id) FROM users u WHERE u.name <> %s", ("x",))
    asyncio.run(asyncpg_reads(dsn))
    return 1 + 3 + 1 + 2 + 2


def test_correct_views_give_only_matches(app_db: Database, sidecar) -> None:
    handle = start(sidecar)
    before = judged()
    sent = application_reads(handle.dsn())
    shapes = settle(handle, before, sent)
    assert total(shapes, "match") == sent, shapes
    assert total(shapes, "mismatch") == 0
    assert total(shapes, "error") == 0
    assert len(shapes) == 7  # grouped by shape: the three prepared executions are one
    statements = [shape["statement"] for shape in shapes.values()]
    assert "SELECT id, name FROM users WHERE tenant = $1" in statements  # psql's literal hidden


def test_a_buggy_view_gives_mismatches_under_its_shape_with_a_redacted_sample(
    app_db: Database, sidecar
) -> None:
    handle = start(sidecar, view="v2bug.users", reveal_columns=["id"])
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        rows = app.execute(
            "SELECT id, amount FROM users WHERE tenant = %s", (1,), prepare=True
        ).fetchall()
        assert (7, Decimal("8.75")) in rows  # the application's own answer is the old one
        app.execute("SELECT count(*) FROM users WHERE name = 'user 12'")  # unaffected rows
    shapes = settle(handle, before, 2)
    (bad,) = [s for s in shapes.values() if s["mismatch"]]
    assert bad["mismatch"] == 1
    assert "tenant = $1" in bad["statement"]
    sample = bad["samples"]["mismatch"]
    assert sample["old_rows"] == 14
    assert sample["new_rows"] == 13
    assert {"id": 7, "amount": "<redacted>"} in sample["only_old"]
    assert "8.75" not in json.dumps(sample)
    (good,) = [s for s in shapes.values() if not s["mismatch"]]
    assert good["match"] == 1


def test_nondeterministic_statements_are_noise_not_mismatches(app_db: Database, sidecar) -> None:
    handle = start(sidecar)
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        app.execute("SELECT id, random() FROM users WHERE id < 5")
        app.execute("SELECT clock_timestamp(), count(*) FROM users")
        # now() is the transaction's start: the same for all three runs of one replay
        app.execute("SELECT now(), count(*) FROM users WHERE tenant = 0")
    shapes = settle(handle, before, 3)
    assert total(shapes, "noise") == 2
    assert total(shapes, "mismatch") == 0
    assert total(shapes, "match") == 1


def test_concurrent_writes_cause_no_mismatch(app_db: Database, sidecar) -> None:
    handle = start(sidecar)
    stop = threading.Event()

    def writer() -> None:
        with app_db.connect() as conn:
            n = 1000
            while not stop.is_set():
                n += 1
                conn.execute("UPDATE users SET amount = amount + 1 WHERE id = %s", (n % 40 + 1,))
                conn.execute("INSERT INTO users VALUES (%s, %s, 'new', 1)", (n, n % 3))

    thread = threading.Thread(target=writer)
    before = judged()
    thread.start()
    try:
        with psycopg.connect(handle.dsn(), autocommit=True) as app:
            for _ in range(30):
                app.execute("SELECT tenant, sum(amount), count(*) FROM users GROUP BY tenant")
        shapes = settle(handle, before, 30)
    finally:
        stop.set()
        thread.join()
    assert total(shapes, "mismatch") == 0
    assert total(shapes, "noise") == 0
    assert total(shapes, "match") == 30


def test_a_statement_that_writes_is_unsafe_and_the_replay_writes_nothing(
    app_db: Database, sidecar
) -> None:
    handle = start(sidecar)
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        app.execute("SELECT nextval('tickets'), name FROM users WHERE id = 1")
    shapes = settle(handle, before, 1)
    assert total(shapes, "unsafe") == 1
    # the application's own call advanced the sequence once; the replay did not
    assert app_db.scalar("SELECT last_value FROM tickets") == 1


def test_a_saturated_shadow_drops_and_counts_and_the_application_does_not_wait(
    app_db: Database, sidecar
) -> None:
    handle = start(sidecar, queue=2, max_replays_per_second=0.5, max_sessions=1)
    dropped = metrics.HOT.shadow_statements["dropped"]
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for user in range(1, 41):
            row = app.execute("SELECT name FROM users WHERE id = %s", (user,)).fetchone()
            assert row == (f"user {user}",)
    # at most one replay started, two wait in the queue: the rest were dropped, not waited for
    assert metrics.HOT.shadow_statements["dropped"] - dropped >= 40 - 3
    sidecar_obj = handle.sidecar
    assert sidecar_obj is not None
    assert sidecar_obj.shadow is not None
    assert sidecar_obj.shadow.tap.depth() <= 2


def test_a_worker_killed_mid_replay_is_restarted_and_the_application_never_notices(
    app_db: Database, sidecar
) -> None:
    """kill -9 of the shadow's worker process while it replays: the application's reads keep
    their answers and their pace, the worker is started again (counted), results continue."""
    handle = start(sidecar, view="v2slow.users", max_sessions=1)
    shadow = handle.sidecar.shadow  # type: ignore[union-attr]
    assert shadow is not None
    restarts = metrics.SHADOW_WORKER_RESTARTS._value.get()
    stop = threading.Event()
    answers: list[tuple[int, Any]] = []
    failures: list[BaseException] = []

    def application() -> None:
        try:
            with psycopg.connect(handle.dsn(), autocommit=True) as app:
                n = 0
                while not stop.is_set():
                    n = n % 40 + 1
                    row = app.execute("SELECT name FROM users WHERE id = %s", (n,)).fetchone()
                    answers.append((n, row))
        except BaseException as exc:  # reported by the assertion below
            failures.append(exc)

    def replaying() -> bool:
        # a shadow session inside its replay transaction (the view makes that last 0.3 s)
        return bool(
            app_db.sql(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'dualwrite-shadow' "
                "AND datname = current_database() AND xact_start IS NOT NULL"
            )
        )

    thread = threading.Thread(target=application)
    thread.start()
    try:
        first = wait_until(lambda: shadow.pid, timeout=30, what="a shadow worker")
        wait_until(replaying, timeout=30, what="a replay under way")
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: shadow.restarts == 1, timeout=30, what="the dead worker noticed")
        answered = len(answers)
        second = wait_until(lambda: shadow.pid, timeout=30, what="a new shadow worker")
        assert second != first
        after_restart = judged()
        wait_until(lambda: judged() > after_restart, timeout=60, what="replays after the restart")
        wait_until(lambda: len(answers) > answered + 20, timeout=30, what="the application")
    finally:
        stop.set()
        thread.join()
    assert not failures, failures
    assert answers
    assert all(row == (f"user {n}",) for n, row in answers)
    assert metrics.SHADOW_WORKER_RESTARTS._value.get() == restarts + 1
    # the dead worker's shadow connection went with it: the new one is within max_sessions
    wait_until(
        lambda: app_db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dualwrite-shadow' "
            "AND datname = current_database()"
        )
        <= 1,
        timeout=30,
        what="the killed worker's session gone",
    )
    # and the new worker writes results to the control schema
    shapes = settle(handle, judged(), 0)
    assert total(shapes, "match") >= 1
    assert total(shapes, "mismatch") == 0


def test_a_shadow_server_that_is_down_costs_the_application_nothing(
    app_db: Database, sidecar, pg: PgServer
) -> None:
    dead = f"postgresql://{pg.user}@127.0.0.1:{free_port()}/nowhere"
    handle: InProcessSidecar = sidecar(
        {"shadow": {"sample_rate": 1.0, "dsn": dead, "max_replays_per_second": 10_000}}
    )
    before = metrics.HOT.shadow_statements["error"]
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for user in range(1, 11):
            assert app.execute("SELECT id FROM users WHERE id = %s", (user,)).fetchone() == (user,)
    wait_until(lambda: metrics.HOT.shadow_statements["error"] > before, what="an error counted")


@pytest.fixture
def other_db(pg: PgServer) -> Iterator[Database]:
    database = pg.create_database()
    try:
        yield database
    finally:
        database.drop()


def test_dsn_mode_replays_unchanged_on_the_other_server(
    app_db: Database, other_db: Database, sidecar
) -> None:
    other_db.sql(SCHEMA)
    other_db.sql("UPDATE users SET name = 'renamed' WHERE id = 5")
    handle: InProcessSidecar = sidecar(
        {
            "shadow": {
                "sample_rate": 1.0,
                "dsn": other_db.dsn,
                "max_replays_per_second": 10_000,
                "flush_interval_seconds": 3600,
            }
        }
    )
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        app.execute("SELECT id, name FROM users WHERE id < %s", (4,), prepare=True)
        app.execute("SELECT id, name FROM users WHERE id BETWEEN %s AND %s", (4, 6), prepare=True)
    shapes = settle(handle, before, 2)
    assert total(shapes, "match") == 1
    assert total(shapes, "mismatch") == 1


def _transcript(port: int, user: str, database: str) -> list[tuple[bytes, bytes]]:
    statements = [
        "SELECT id, name, amount FROM users WHERE tenant = 2 ORDER BY id",
        "SELECT count(*), sum(amount) FROM users",
        "SELECT * FROM users WHERE id = -1",
        "SELECT no_such_column FROM users",
    ]
    with RawClient("127.0.0.1", port) as client:
        client.startup(user, database)
        out: list[tuple[bytes, bytes]] = []
        for sql in statements:
            client.send(query(sql))
            out += [(message.typ, message.body) for message in client.until_ready()]
        return out


def test_the_applications_replies_are_byte_identical_with_shadow_on(
    app_db: Database, sidecar, pg: PgServer
) -> None:
    handle = start(sidecar)
    before = judged()
    direct = _transcript(pg.port, pg.user, app_db.name)
    proxied = _transcript(handle.port, pg.user, app_db.name)
    assert proxied == direct
    settle(handle, before, 4)  # the shadow did replay them meanwhile


def test_the_cutover_report_has_a_shadow_section_and_its_criteria(
    app_db: Database, sidecar, tmp_path, capsys
) -> None:
    handle = start(sidecar, view="v2bug.users")
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for tenant in (0, 1, 2):  # tenant 1 holds the lost row 7: one mismatch in three
            app.execute("SELECT id FROM users WHERE tenant = %s", (tenant,), prepare=True)
        for user in (1, 2):
            app.execute("SELECT id, amount FROM users WHERE id = %s", (user,))
    settle(handle, before, 5)
    handle.call(handle.sidecar.shadow.stop)  # type: ignore[union-attr]
    config = {
        "service_dsn": app_db.dsn,
        "shadow": {"sample_rate": 0.5, "views": {"public.users": "v2bug.users"}},
        "report": {
            "criteria": {
                "clean_window_hours": 0,
                "min_shadow_statements": 3,
                "max_shadow_mismatch_ratio": 0.1,
            }
        },
        "mappings": [
            {
                "name": "customers",
                "source": "public.users",
                "target": "v2.customers",
                "key": ["id"],
                "columns": {"id": "id"},
            }
        ],
    }
    path = tmp_path / "dualwrite.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()  # what the sidecar logged so far
    try:
        code = main(["report", "--config", str(path), "--format", "json"])
        data = json.loads(capsys.readouterr().out)
        assert main(["report", "--config", str(path), "--format", "md"]) == 1
        markdown = capsys.readouterr().out
    finally:
        # `dualwrite report` logs to the stderr of the moment, capsys's: point it back
        configure_logging(stream=sys.__stderr__)
    assert code == 1
    overall = {c["name"]: c for c in data["overall_criteria"]}
    assert overall["shadow_statements"]["measured"] == 5
    assert overall["shadow_statements"]["passed"]
    # 1 of 3 executions of the tenant shape, and 2 of 2 of the amount shape (rounded)
    assert overall["shadow_mismatch_ratio"]["measured"] == pytest.approx(3 / 5)
    assert not overall["shadow_mismatch_ratio"]["passed"]
    assert data["shadow"]["totals"]["mismatch"] == 3
    assert "## Shadow reads" in markdown
    assert "Match rate **40.00%** of 5 compared replays in 2 statement shapes" in markdown
    assert "SELECT id FROM users WHERE tenant = $1" in markdown


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        ("v2compat.users", None),
        ("v2compat.missing", "v2compat.missing does not exist"),
        ("v2compat.no_amount", "v2compat.no_amount has no column amount"),
        ("v2compat.text_ids", "v2compat.text_ids.id is text, public.users has bigint"),
        ("v2compat.locked", "v2compat.locked is not readable"),
    ],
)
def test_check_validates_every_view(
    app_db: Database, pg: PgServer, tmp_path, capsys, view: str, reason: str | None
) -> None:
    app_db.sql(
        "CREATE VIEW v2compat.no_amount AS SELECT id, tenant, name FROM users;"
        "CREATE VIEW v2compat.text_ids AS SELECT id::text AS id, tenant, name, amount FROM users;"
        "CREATE FUNCTION v2compat.boom() RETURNS SETOF users LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'no'; END $$;"
        "CREATE VIEW v2compat.locked AS SELECT * FROM v2compat.boom();"
    )
    config = {
        "service_dsn": app_db.dsn,
        "upstream": {"host": pg.host, "port": pg.port},
        "shadow": {"sample_rate": 0.1, "views": {"public.users": view}},
    }
    path = tmp_path / "dualwrite.yaml"
    path.write_text(json.dumps(config))
    capsys.readouterr()
    try:
        code = main(["check", "--config", str(path)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        configure_logging(stream=sys.__stderr__)
    out, err = capsys.readouterr()
    if reason is None:
        assert code == 0, err
        assert f"shadow view {view} answers for public.users: ok" in out
    else:
        assert code == 2
        assert "shadow.views[public.users]" in err
        assert reason in err


#: a mapping with a tenant_column (users.tenant -> v2.customers.tenant)
TENANT_MAPPING = {
    "name": "customers",
    "source": "public.users",
    "target": "v2.customers",
    "key": ["id"],
    "columns": {"id": "id", "tenant": "tenant"},
    "tenant_column": "tenant",
}


def test_shadow_mismatches_are_attributed_to_tenants_and_judged_per_tenant(
    app_db: Database, sidecar, tmp_path, capsys
) -> None:
    """Row 7 of tenant 1 is missing from the view: tenant 1's reads mismatch, tenants 0 and 2
    match; a result without the tenant column is attributed to the tenant its WHERE names;
    the per-tenant report holds the mismatch against tenant 1 only."""
    config: dict[str, Any] = {
        "service_dsn": app_db.dsn,
        "shadow": {"sample_rate": 1.0, "views": {"public.users": "v2lost.users"}},
        "mappings": [TENANT_MAPPING],
        "report": {
            "tenants": ["0", "1", "2"],
            "criteria": {"clean_window_hours": 0, "max_shadow_mismatch_ratio": 0.0},
        },
    }
    path = tmp_path / "dualwrite.yaml"
    path.write_text(json.dumps(config))
    assert main(["setup", "--config", str(path)]) == 0
    handle: InProcessSidecar = sidecar(
        {
            "mappings": [TENANT_MAPPING],
            "shadow": {
                "sample_rate": 1.0,
                "max_replays_per_second": 10_000,
                "flush_interval_seconds": 3600,
                "views": {"public.users": "v2lost.users"},
            },
        }
    )
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for tenant in (0, 1, 2):
            # the tenant column is in the result: the rows that differ name the tenant
            app.execute(
                "SELECT id, tenant, name FROM users WHERE tenant = %s", (tenant,), prepare=True
            )
            # it is not: the WHERE's parameter names it
            app.execute("SELECT count(*) FROM users WHERE tenant = %s", (tenant,))
        app.execute("SELECT max(id) FROM users WHERE id < 5")  # no tenant at all
    shapes = settle(handle, before, 7)
    assert total(shapes, "mismatch") == 2
    handle.call(handle.sidecar.shadow.stop)  # type: ignore[union-attr]
    rows = app_db.sql(
        "SELECT attributed, tenant, matched, mismatched, last_mismatch IS NOT NULL "
        "FROM dualwrite.shadow_tenants ORDER BY attributed, tenant"
    )
    assert rows == [
        (False, "", 1, 0, False),
        (True, "0", 2, 0, False),
        (True, "1", 0, 2, True),
        (True, "2", 2, 0, False),
    ]
    capsys.readouterr()
    try:
        code = main(["report", "--config", str(path), "--format", "json", "--tenant", "0"])
        data = json.loads(capsys.readouterr().out)
        main(["report", "--config", str(path), "--format", "md"])
        markdown = capsys.readouterr().out
    finally:
        configure_logging(stream=sys.__stderr__)
    tenants = {t["tenant"]: t for t in data["tenants"]}
    assert tenants["1"]["shadow_mismatches"] == 2
    assert tenants["0"]["shadow_mismatches"] == 0
    mine = {t: {c["name"]: c for c in tenants[t]["criteria"]} for t in ("0", "1", "2")}
    assert not mine["1"]["shadow_mismatch_ratio"]["passed"]
    # its two mismatches over its two replays and the unattributed one
    assert mine["1"]["shadow_mismatch_ratio"]["measured"] == pytest.approx(2 / 3)
    assert mine["0"]["shadow_mismatch_ratio"]["passed"]
    assert mine["2"]["shadow_mismatch_ratio"]["passed"]
    assert "shadow_mismatch_ratio" in tenants["1"]["failing"]
    assert "shadow_mismatch_ratio" not in tenants["0"]["failing"]
    # the deployment still sees every mismatch
    overall = {c["name"]: c for c in data["overall_criteria"]}
    assert overall["shadow_mismatch_ratio"]["measured"] == pytest.approx(2 / 7)
    assert not overall["shadow_mismatch_ratio"]["passed"]
    assert "| Shadow mismatches |" in markdown
    # the sidecar's worst-tenants gauge counts them as the tenant's trouble (capped labels)
    assert asyncio.run(_trouble(app_db.dsn)) == {"1": 2}
    assert code in (0, 1)  # tenant 0's other criteria (clean window, ...) decide the rest


async def _trouble(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await tenant_trouble(conn, [], [])
    finally:
        await conn.close()


def test_with_shadow_on_the_native_loop_relays_what_the_shadow_does_not_replay(
    app_db: Database, sidecar
) -> None:
    """The native relay loop stops only at texts naming a relation the shadow replays: those
    are sampled and replayed as on the Python path; other reads never leave the loop."""
    app_db.sql("CREATE TABLE other (a int); INSERT INTO other VALUES (1)")
    handle = start(sidecar, relay={"native": "on", "native_shadow": True})
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for _ in range(20):
            assert app.execute("SELECT a FROM other", prepare=False).fetchone() == (1,)
        sessions = list(handle.sidecar.proxy.sessions)
        (session,) = sessions
        loop = session.native
        assert loop is not None, "a shadow-on session must still qualify for the native loop"
        stops = sum(loop.reasons.values())
        for user in (1, 2, 3):
            row = app.execute("SELECT name FROM users WHERE id = %s", (user,), prepare=False)
            assert row.fetchone() == (f"user {user}",)
        for _ in range(20):
            assert app.execute("SELECT a FROM other", prepare=False).fetchone() == (1,)
        # the loop stopped at the first eligible read; psycopg's unnamed prepared read keeps the
        # session on the Python path (its executions are sampled there) until the next simple
        # Query destroys it; then the loop takes the session back. At most one stop per
        # eligible read, none for the others: a loop that stopped at every text shows 20 more
        assert sum(loop.reasons.values()) - stops <= 3, loop.reasons
        assert loop.entered >= 2
        assert loop.running
    shapes = settle(handle, before, 3)
    assert total(shapes, "match") == 3, shapes
    statements = [shape["statement"] for shape in shapes.values()]
    assert statements == ["SELECT name FROM users WHERE id = $1"]


def test_the_native_loop_samples_simple_queries_once_at_the_configured_rate(
    app_db: Database, sidecar
) -> None:
    """The loop draws for a simple Query the shadow may replay and Python does not draw again:
    at sample_rate 0.5, about half the reads are taken (a second draw would take a quarter)."""
    handle = start(sidecar, relay={"native": "on", "native_shadow": True}, sample_rate=0.5)

    def taken() -> int:
        return judged() + int(metrics.HOT.shadow_statements["dropped"])

    before = taken()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for _ in range(400):
            # (prepare=False: psycopg would prepare it after five runs, and a prepared read
            # keeps the session on the Python path, where the tap samples its executions)
            row = app.execute("SELECT name FROM users WHERE id = 1", prepare=False).fetchone()
            assert row == ("user 1",)
        (session,) = list(handle.sidecar.proxy.sessions)
        assert session.native is not None
        # it stopped for each sampled read and came back
        assert session.native.entered >= 100, session.native.reasons
    wait_until(lambda: taken() - before >= 140, timeout=60, what="about half the reads")
    # binomial(400, 0.5): 200 ± 10; rate 0.25 (a double draw) would give 100 ± 9
    assert 140 <= taken() - before <= 260


def test_by_default_a_shadow_session_stays_on_the_python_path(app_db: Database, sidecar) -> None:
    """Without relay.native_shadow the loop never takes a shadow-read session (a hand-back per
    sampled read costs more than relaying it in Python), and every read is still sampled."""
    handle = start(sidecar, relay={"native": "on"})
    before = judged()
    with psycopg.connect(handle.dsn(), autocommit=True) as app:
        for _ in range(3):
            app.execute("SELECT name FROM users WHERE id = 2", prepare=False)
        (session,) = list(handle.sidecar.proxy.sessions)
        assert session.native is None
    shapes = settle(handle, before, 3)
    assert total(shapes, "match") == 3, shapes
