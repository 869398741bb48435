"""The point-of-sale seed and its example migrations, as the mirror tests use them.

- :func:`load_schema` loads ``dualwrite/demo/pos_v1.sql`` + ``pos_v2.sql`` and a few tenants.
- :func:`ensure_app_role` creates the application role ``pos_app`` and grants it the old schema.
- :func:`migration` reads ``config/*.yaml`` (only what a migration declares: ``mappings``,
  ``invariants`` and ``app_role``; listen/upstream/service_dsn/admin come from the fixtures).
- :func:`run_setup` runs ``dualwrite setup`` (control schema, validation, grants).
- :func:`drain` runs the in-process sidecar's applier until every unpaused outbox is empty.
- :class:`ApplierProcess` runs ``python -m dualwrite apply --config FILE`` as a child.
- :func:`scrape` reads one sample of the in-process Prometheus registry.
- :func:`divergence` compares every target with the mapping applied to its source, by SQL
  written here by hand (not dualwrite's own).
- :class:`Workload` runs concurrent asyncpg and psycopg writers that survive a proxy restart.
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import psycopg
import yaml
from prometheus_client import REGISTRY

from core.config import parse_config
from dualwrite.service import setup
from mirror.applier import Applier

from .postgres import Database
from .sidecar import InProcessSidecar

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILES = (ROOT / "dualwrite/demo/pos_v1.sql", ROOT / "dualwrite/demo/pos_v2.sql")
CONFIG_DIR = ROOT / "config"
#: the example migrations shipped in config/, by file stem
MIGRATIONS = (
    "split-users",
    "tier-pricing",
    "transactions-total",
    "inventory-normalization",
    "audit-log-rls",
)
APP_ROLE = "pos_app"
TENANTS = (1, 2, 3)


def load_schema(db: Database, *, tenants: Iterable[int] = TENANTS) -> None:
    """The old and the new POS schema, plus tenants (written directly, before any mirroring)."""
    db.sql("\n".join(path.read_text() for path in SCHEMA_FILES))
    for tenant in tenants:
        db.sql("INSERT INTO tenants (id, name) VALUES (%s, %s)", tenant, f"Store group {tenant}")


def ensure_app_role(db: Database, role: str = APP_ROLE) -> None:
    """A LOGIN role the application connects as, with what an application has on its schema.

    Roles are cluster-wide: created once (tolerating a concurrent creator), granted per database.
    """
    db.sql(
        "DO $$ BEGIN EXECUTE format('CREATE ROLE %I LOGIN', "
        f"{_literal(role)}); EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; "
        "END $$"
    )
    who = '"' + role.replace('"', '""') + '"'
    db.sql(
        f"GRANT USAGE ON SCHEMA public TO {who};"
        f"GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON ALL TABLES IN SCHEMA public TO {who};"
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {who};"
        f"GRANT USAGE ON SCHEMA v2 TO {who}"
    )


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def migration(
    *names: str, modes: Mapping[str, str] | None = None, **mapping_overrides: Any
) -> dict[str, Any]:
    """The config a set of ``config/<name>.yaml`` migrations declares (mappings and app_role).

    ``modes`` sets a mapping's mode by mapping name; ``mapping_overrides`` (e.g.
    ``unsupported="reject"``) apply to every mapping.
    """
    mappings: list[dict[str, Any]] = []
    invariants: list[dict[str, Any]] = []
    app_role = None
    for name in names or MIGRATIONS:
        data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
        app_role = data.get("app_role", app_role)
        mappings += copy.deepcopy(data["mappings"])
        invariants += copy.deepcopy(data.get("invariants", []))
    for mapping in mappings:
        mapping.update(mapping_overrides)
        if modes and mapping["name"] in modes:
            mapping["mode"] = modes[mapping["name"]]
    config: dict[str, Any] = {"mappings": mappings}
    if invariants:
        config["invariants"] = invariants
    if app_role is not None:
        config["app_role"] = app_role
    return config


def service_config(db: Database, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {"service_dsn": db.dsn, **overrides}


def run_setup(db: Database, overrides: Mapping[str, Any]) -> list[str]:
    """``dualwrite setup`` for this database and migration config; its report lines."""
    config = parse_config(service_config(db, overrides))
    return asyncio.run(setup(config))


def prepare(db: Database, overrides: Mapping[str, Any], *, app_role: bool = True) -> None:
    """Schema, application role and ``dualwrite setup``: ready for a sidecar to start."""
    load_schema(db)
    if app_role:
        ensure_app_role(db)
    run_setup(
        db, overrides if app_role else {k: v for k, v in overrides.items() if k != "app_role"}
    )


def drain(handle: InProcessSidecar, within_seconds: float = 60.0) -> None:
    """Apply the outbox of every unpaused mapping until it is empty (with the sidecar's own
    applier, or one made for the purpose when ``applier.enabled`` is false)."""
    sidecar = handle.sidecar
    assert sidecar is not None
    assert sidecar.pool is not None
    applier = sidecar.applier or Applier(
        sidecar.pool, sidecar.mappings, sidecar.config.applier, sidecar.states
    )
    handle.call(applier.drain, within_seconds, timeout=within_seconds + 5)


def flush_activity(handle: InProcessSidecar) -> None:
    """Write the buffered unmirrored-statement and activity counts to the control schema now."""
    assert handle.sidecar is not None
    handle.call(handle.sidecar._flush_once)


def set_paused(handle: InProcessSidecar, mapping: str, paused: bool) -> None:
    """Pause or resume a mapping the way the admin action does (persisted, announced, applied)."""
    assert handle.sidecar is not None
    handle.call(handle.sidecar._set_paused, mapping, paused, {"by": "test"})


def scrape(name: str, **labels: str) -> float:
    """The current value of one sample of this process's Prometheus registry (0 if absent)."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


class ApplierProcess:
    """``python -m dualwrite apply --config FILE`` as a child process (output to files)."""

    def __init__(self, db: Database, overrides: Mapping[str, Any], workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "apply.yaml"
        self.config_path.write_text(yaml.safe_dump(service_config(db, overrides), sort_keys=False))
        self.stdout_path = workdir / "apply.stdout"
        self.stderr_path = workdir / "apply.stderr"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "DUALWRITE_SERVICE_DSN": db.dsn}
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApplierProcess:
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dualwrite", "apply", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                cwd=self.workdir,
            )
        return self

    def kill(self) -> int:
        """SIGKILL, and the exit status (negative: the signal)."""
        assert self.proc is not None
        self.proc.kill()
        return self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        def read(path: Path) -> str:
            return path.read_text(errors="replace") if path.exists() else ""

        return f"--- stdout ---\n{read(self.stdout_path)}--- stderr ---\n{read(self.stderr_path)}"


# --- the mapping applied to the source, written out by hand ---------------------------------
#
# Independent of dualwrite's compiled SQL on purpose: (expected rows from the source, actual
# rows of the target) per mapping of config/*.yaml, in the same column order.

EXPECTED: dict[str, tuple[str, str]] = {
    "customers": (
        "SELECT id, tenant_id, email, first_name || ' ' || last_name, phone, created_at "
        "FROM public.users WHERE role = 'customer'",
        "SELECT id, tenant_id, email, full_name, phone, created_at FROM v2.customers",
    ),
    "employees": (
        "SELECT id, tenant_id, email, first_name || ' ' || last_name, role = 'manager', "
        "created_at FROM public.users WHERE role IN ('employee', 'manager')",
        "SELECT id, tenant_id, email, full_name, is_manager, created_at FROM v2.employees",
    ),
    "products": (
        "SELECT id, tenant_id, sku, name, price, round(price * 0.95, 2), round(price * 0.90, 2), "
        "CASE WHEN price > 0 AND cost IS NOT NULL THEN round((price - cost) / price * 100, 2) "
        "END FROM public.products",
        "SELECT id, tenant_id, sku, name, price, price_silver, price_gold, margin_pct "
        "FROM v2.products",
    ),
    "transactions": (
        "SELECT id, tenant_id, user_id, product_id, quantity, unit_price, discount, tax, "
        "quantity * unit_price - discount + tax, status, created_at FROM public.transactions",
        "SELECT id, tenant_id, user_id, product_id, quantity, unit_price, discount, tax, "
        "total_amount, status, created_at FROM v2.transactions",
    ),
    "stock_levels": (
        "SELECT product_id, upper(store_code), tenant_id, on_hand, greatest(on_hand - reserved, 0) "
        "FROM public.inventory",
        "SELECT product_id, store, tenant_id, on_hand, available FROM v2.stock_levels",
    ),
    "audit_events": (
        "SELECT id, tenant_id, actor_id, action, entity, entity_id, details, at "
        "FROM public.audit_log",
        "SELECT id, tenant_id, actor_id, action, entity, entity_id, details, occurred_at "
        "FROM v2.audit_events",
    ),
}


def divergence(
    db: Database, names: Iterable[str] = EXPECTED, *, snapshot: bool = False
) -> dict[str, dict[str, Any]]:
    """Per mapping, rows expected but missing from the target and rows the target should not
    have (EXCEPT ALL both ways), and both row counts; empty dict when every target is exact.

    ``snapshot``: every query sees one snapshot (REPEATABLE READ), so it can run while
    writers are busy (sync mode must be exact at every instant).
    """
    found: dict[str, dict[str, Any]] = {}
    with db.connect(autocommit=False) as conn:
        if snapshot:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for name in names:
            expected, actual = EXPECTED[name]
            missing = conn.execute(f"{expected} EXCEPT ALL {actual}").fetchall()
            extra = conn.execute(f"{actual} EXCEPT ALL {expected}").fetchall()
            counts = conn.execute(
                f"SELECT (SELECT count(*) FROM ({expected}) e), (SELECT count(*) FROM ({actual}) a)"
            ).fetchone()
            assert counts is not None
            if missing or extra or counts[0] != counts[1]:
                found[name] = {"missing": missing[:5], "extra": extra[:5], "counts": counts}
            if not snapshot:
                conn.commit()
        conn.rollback()
    return found


def target_count(db: Database, mapping: str) -> int:
    return int(db.scalar(f"SELECT count(*) FROM ({EXPECTED[mapping][1]}) t"))


def outbox_depth(db: Database, mapping: str | None = None) -> int:
    if mapping is None:
        return int(db.scalar("SELECT count(*) FROM dualwrite.outbox"))
    return int(db.scalar("SELECT count(*) FROM dualwrite.outbox WHERE mapping = %s", mapping))


def backfill(db: Database, names: Iterable[str] = EXPECTED) -> None:
    """Copy the rows that existed before mirroring began into the targets (by hand-written SQL,
    the way a backfill would), so that a test can compare whole tables afterwards."""
    for name in names:
        expected, actual = EXPECTED[name]
        target = actual.split(" FROM ")[-1]
        columns = actual.removeprefix("SELECT ").split(" FROM ")[0]
        db.sql(f"INSERT INTO {target} ({columns}) {expected}")


def counter_by_mapping(name: str) -> dict[str, float]:
    """A counter of this process's registry summed per ``mapping`` label (other labels summed)."""
    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and "mapping" in sample.labels:
                mapping = sample.labels["mapping"]
                totals[mapping] = totals.get(mapping, 0.0) + sample.value
    return totals


def counter_delta(before: Mapping[str, float], name: str) -> dict[str, float]:
    """How much a per-mapping counter moved since ``before`` (only mappings that moved)."""
    after = counter_by_mapping(name)
    return {m: v - before.get(m, 0.0) for m, v in after.items() if v != before.get(m, 0.0)}


# --- a concurrent write workload -------------------------------------------------------------
#
# Random INSERT/UPDATE/DELETE on users (role changes move rows between the split targets) and
# transactions, from asyncpg and psycopg clients, simple and prepared, in autocommit and in
# explicit transactions that commit, roll back, or roll back to savepoints. Clients that lose
# their connection (a proxy killed under them) reconnect and go on.

ROLES = ("customer", "employee", "manager")
#: errors a client may meet and shrug off: lost connections while the proxy is down, deadlocks
#: and serialization failures between clients (which PostgreSQL would raise without a proxy too)
RETRYABLE_STATES = ("08", "40P01", "40001", "57P01", "55P03")


@dataclass
class WorkloadTally:
    """What the clients did: per operation, how many committed, rolled back, failed."""

    committed: Counter[str] = field(default_factory=Counter)
    rolled_back: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0


def _retryable(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    if state.startswith(RETRYABLE_STATES):
        return True
    return isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError
        | asyncpg.ConnectionDoesNotExistError
        | psycopg.OperationalError
        | psycopg.InterfaceError,
    )


class _Ops:
    """The statements, shared by both drivers: (sql with {} placeholders, args)."""

    def __init__(self, rng: random.Random, tag: str, *, shared: bool) -> None:
        self.rng = rng
        self.tag = tag
        self.n = 0
        #: role changes and deletes may hit any client's users (else only this client's own)
        self.shared = shared

    def _some_user(self) -> str:
        """SQL for the id of a recent user (any client's, or this client's own when not
        shared); one ``{}`` placeholder: how far back."""
        if self.shared:
            return "(SELECT max(id) - {} FROM users)"
        return (
            f"(SELECT id FROM users WHERE starts_with(email, '{self.tag}-') "
            "ORDER BY id DESC LIMIT 1 OFFSET {})"
        )

    def pick(self) -> tuple[str, str, tuple[Any, ...]]:
        rng = self.rng
        self.n += 1
        roll = rng.random()
        if roll < 0.25:
            return (
                "insert_user",
                "INSERT INTO users (tenant_id, email, first_name, last_name, role, phone) "
                "VALUES ({}, {}, {}, {}, {}, {})",
                (
                    rng.randint(1, 3),
                    f"{self.tag}-{self.n}@x",
                    rng.choice(("Ana", "Bo", "Zoë")),
                    rng.choice(("Lee", "O'Neil", "Ünal")),
                    rng.choice(ROLES),
                    rng.choice((None, "+1-555-0100")),
                ),
            )
        if roll < 0.45:
            return (
                "change_role",
                "UPDATE users SET role = {}, updated_at = now() WHERE id = " + self._some_user(),
                (rng.choice(ROLES), rng.randint(0, 30 if self.shared else 3)),
            )
        if roll < 0.55:
            return (
                "rename_many",
                "UPDATE users SET last_name = last_name || 'x', phone = NULL "
                "WHERE mod(id, 97) = {} AND length(last_name) < 12",
                (rng.randint(0, 96),),
            )
        if roll < 0.65:
            return (
                "delete_user",
                "DELETE FROM users WHERE id = " + self._some_user(),
                (rng.randint(0, 40 if self.shared else 4),),
            )
        if roll < 0.85:
            return (
                "insert_sale",
                "INSERT INTO transactions (tenant_id, user_id, quantity, unit_price, discount) "
                "VALUES ({}, {}, {}, {}, {})",
                (
                    rng.randint(1, 3),
                    rng.randint(1, 500),
                    rng.randint(1, 9),
                    Decimal(rng.randint(100, 9999)) / 100,
                    Decimal(rng.choice((0, 0, 50))) / 100,
                ),
            )
        if roll < 0.95:
            return (
                "refund",
                "UPDATE transactions SET status = 'refunded', quantity = quantity + 1 "
                "WHERE id = (SELECT max(id) - {} FROM transactions)",
                (rng.randint(0, 30),),
            )
        return (
            "delete_sale",
            "DELETE FROM transactions WHERE id = (SELECT max(id) - {} FROM transactions)",
            (rng.randint(0, 30),),
        )

    def unit(self) -> tuple[str, int]:
        """How the next unit of work ends: ``commit``/``rollback``/``savepoint``/``auto``, with
        how many statements it runs."""
        roll = self.rng.random()
        if roll < 0.45:
            return "auto", 1
        if roll < 0.75:
            return "commit", self.rng.randint(2, 4)
        if roll < 0.88:
            return "rollback", self.rng.randint(1, 3)
        return "savepoint", self.rng.randint(2, 4)


class _RollBack(Exception):
    """Raised inside ``async with conn.transaction()`` to roll the unit of work back."""


def _roll_back() -> NoReturn:
    raise _RollBack


async def _asyncpg_client(
    dsn: Callable[[], str],
    index: int,
    stop: asyncio.Event,
    tally: WorkloadTally,
    prepared: bool,
    shared: bool,
) -> None:
    ops = _Ops(random.Random(index), f"a{index}", shared=shared)
    conn: asyncpg.Connection | None = None

    async def run(sql: str, args: tuple[Any, ...]) -> None:
        assert conn is not None
        if prepared:  # extended protocol, through asyncpg's statement cache
            await conn.execute(sql.format(*(f"${i + 1}" for i in range(len(args)))), *args)
        else:  # no arguments: the simple protocol
            await conn.execute(sql.format(*(_sql_literal(a) for a in args)))

    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn(), statement_cache_size=100 if prepared else 0)
            how, count = ops.unit()
            picked = [ops.pick() for _ in range(count)]
            if how == "auto":
                await run(picked[0][1], picked[0][2])
                tally.committed[picked[0][0]] += 1
                continue
            done: list[str] = []
            try:
                async with conn.transaction():
                    for i, (name, sql, args) in enumerate(picked):
                        if how == "savepoint" and i == 1:
                            await conn.execute("SAVEPOINT sp")
                        await run(sql, args)
                        done.append(name)
                    if how == "savepoint":
                        await conn.execute("ROLLBACK TO SAVEPOINT sp")
                        tally.rolled_back.update(done[1:])
                        done = done[:1]
                    if how == "rollback":
                        _roll_back()
            except _RollBack:
                tally.rolled_back.update(done)
            else:
                tally.committed.update(done)
        except Exception as exc:
            if not _retryable(exc):
                raise
            tally.errors[type(exc).__name__] += 1
            if conn is not None and conn.is_closed():
                tally.reconnects += 1
                await asyncio.sleep(0.05)
    if conn is not None:
        conn.terminate()


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, int | Decimal):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _psycopg_client(
    dsn: Callable[[], str],
    index: int,
    stop: threading.Event,
    tally: WorkloadTally,
    prepared: bool,
    shared: bool,
) -> None:
    ops = _Ops(random.Random(1000 + index), f"p{index}", shared=shared)
    conn: psycopg.Connection[Any] | None = None

    def run(sql: str, args: tuple[Any, ...]) -> None:
        assert conn is not None
        if prepared:
            conn.execute(sql.replace("{}", "%s"), args, prepare=True)
        else:
            conn.execute(sql.format(*(_sql_literal(a) for a in args)))

    while not stop.is_set():
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(dsn(), autocommit=True, connect_timeout=5)
            how, count = ops.unit()
            picked = [ops.pick() for _ in range(count)]
            if how == "auto":
                run(picked[0][1], picked[0][2])
                tally.committed[picked[0][0]] += 1
                continue
            done: list[str] = []
            conn.execute("BEGIN")
            for i, (name, sql, args) in enumerate(picked):
                if how == "savepoint" and i == 1:
                    conn.execute("SAVEPOINT sp")
                run(sql, args)
                done.append(name)
            if how == "savepoint":
                conn.execute("ROLLBACK TO SAVEPOINT sp")
                tally.rolled_back.update(done[1:])
                done = done[:1]
            if how == "rollback":
                conn.execute("ROLLBACK")
                tally.rolled_back.update(done)
            else:
                conn.execute("COMMIT")
                tally.committed.update(done)
        except Exception as exc:
            if not _retryable(exc):
                raise
            tally.errors[type(exc).__name__] += 1
            if conn is not None and not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    conn.close()
                    tally.reconnects += 1
            else:
                tally.reconnects += 1
                time.sleep(0.05)
    if conn is not None:
        conn.close()


class Workload:
    """``clients`` connections (half asyncpg on a thread of their own, half psycopg threads;
    half of each prepared) writing until :meth:`stop`. ``shared``: role changes and deletes of
    users hit any client's rows (else each client moves and deletes only its own users).
    ``dsn`` is called at every (re)connect, so a test can move the proxy. Errors that are not
    retryable end the run and are raised by :meth:`stop`."""

    def __init__(self, dsn: Callable[[], str], *, clients: int = 12, shared: bool = True) -> None:
        self.dsn = dsn
        self.clients = clients
        self.shared = shared
        self.tally = WorkloadTally()
        self._stop = threading.Event()
        self._astop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads: list[threading.Thread] = []
        self._failures: list[BaseException] = []

    def start(self) -> Workload:
        half = self.clients // 2
        ready = threading.Event()

        def asyncpg_side() -> None:
            async def main() -> None:
                self._loop = asyncio.get_running_loop()
                self._astop = asyncio.Event()
                ready.set()
                results = await asyncio.gather(
                    *(
                        _asyncpg_client(
                            self.dsn, i, self._astop, self.tally, i % 2 == 0, self.shared
                        )
                        for i in range(half)
                    ),
                    return_exceptions=True,
                )
                self._failures += [r for r in results if isinstance(r, BaseException)]

            asyncio.run(main())

        def guarded(target: Callable[..., None], *args: Any) -> None:
            try:
                target(*args)
            except BaseException as exc:
                self._failures.append(exc)

        self._threads.append(threading.Thread(target=guarded, args=(asyncpg_side,)))
        for i in range(self.clients - half):
            self._threads.append(
                threading.Thread(
                    target=guarded,
                    args=(
                        _psycopg_client,
                        self.dsn,
                        i,
                        self._stop,
                        self.tally,
                        i % 2 == 0,
                        self.shared,
                    ),
                )
            )
        for thread in self._threads:
            thread.start()
        ready.wait(10)
        return self

    def total(self) -> int:
        return sum(self.tally.committed.values()) + sum(self.tally.rolled_back.values())

    @property
    def failures(self) -> list[BaseException]:
        return self._failures

    def stop(self) -> WorkloadTally:
        self._stop.set()
        if self._loop is not None and self._astop is not None:
            self._loop.call_soon_threadsafe(self._astop.set)
        for thread in self._threads:
            thread.join(60)
        if self._failures:
            raise self._failures[0]
        return self.tally
