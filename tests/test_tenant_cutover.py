"""Staged per-tenant cutover (``cutover:``): a tenant moves to the new schema and back under
live traffic through real proxies, and the careless configurations are refused.

The live test runs two in-process sidecars (so one keeps serving while the other restarts with
the new config), psycopg clients writing two tenants, and checks at the end with its own SQL,
not dualwrite's: old EXCEPT mapping(new) and mapping(old) EXCEPT new are both empty, and
every row equals the clients' own ledger of what they committed (nothing lost, nothing
applied twice).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import REGISTRY
from support import pos
from test_compare_support import run_dualwrite, write_config

from core.config import parse_config
from core.errors import ConfigError, ConfigErrors, MappingValidationError
from core.mapping import compile_all
from dualwrite.service import check_live, setup

SCHEMA = """
CREATE SEQUENCE account_ids;
CREATE TABLE public.accounts (
    id bigint PRIMARY KEY DEFAULT nextval('account_ids'),
    tenant_id int NOT NULL,
    name text NOT NULL,
    balance numeric(12, 2) NOT NULL,
    updated int NOT NULL DEFAULT 0
);
CREATE SCHEMA v2;
CREATE TABLE v2.accounts (
    id bigint PRIMARY KEY DEFAULT nextval('account_ids'),
    tenant_id int NOT NULL,
    display_name text NOT NULL,
    balance_cents bigint NOT NULL,
    version int NOT NULL DEFAULT 0
);
"""
FORWARD: dict[str, Any] = {
    "name": "accounts",
    "source": "public.accounts",
    "target": "v2.accounts",
    "key": ["id"],
    "columns": {
        "id": "id",
        "tenant_id": "tenant_id",
        "display_name": "name",
        "balance_cents": "(balance * 100)::bigint",
        "version": "updated",
    },
    "tenant_column": "tenant_id",
}
REVERSE: dict[str, Any] = {
    "name": "accounts_back",
    "source": "v2.accounts",
    "target": "public.accounts",
    "key": ["id"],
    "columns": {
        "id": "id",
        "tenant_id": "tenant_id",
        "name": "display_name",
        "balance": "balance_cents::numeric / 100",
        "updated": "version",
    },
    "tenant_column": "tenant_id",
}
#: the mapping, applied by hand (the independent check does not use dualwrite's SQL)
OLD_AS_NEW = "SELECT id, tenant_id, name, (balance * 100)::bigint, updated FROM public.accounts"
NEW_ROWS = "SELECT id, tenant_id, display_name, balance_cents, version FROM v2.accounts"
A, B = 1, 2


def migration(moved: list[int], **mapping: Any) -> dict[str, Any]:
    return {
        "mappings": [{**FORWARD, **mapping}, {**REVERSE, **mapping}],
        "cutover": {"tenants": moved, "reverse": {"accounts": "accounts_back"}},
        "applier": {"poll_interval_seconds": 0.05},
    }


def run_setup(db: Any, data: dict[str, Any]) -> None:
    asyncio.run(setup(parse_config({"service_dsn": db.dsn, **data})))


class Client(threading.Thread):
    """One application connection writing one tenant's rows (only its own), keeping a ledger
    of what it committed: id -> balance in cents and version. Autocommit, one statement per
    write, so a write is committed exactly when the statement returned."""

    def __init__(
        self, tenant: int, index: int, route: Callable[[int], tuple[int, str, bool]]
    ) -> None:
        super().__init__(daemon=True, name=f"client-{tenant}-{index}")
        self.tenant, self.index, self.route = tenant, index, route
        self.rng = random.Random(tenant * 100 + index)
        self.ledger: dict[int, tuple[int, int]] = {}
        self.writes = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        #: set while the client is at the top of its loop, between two writes
        self.idle = threading.Event()
        self.generation = -1

    def run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        try:
            while not self.stop.is_set():
                generation, dsn, new = self.route(self.tenant)
                if generation != self.generation:
                    if conn is not None:
                        conn.close()
                    conn = psycopg.connect(dsn, autocommit=True) if dsn else None
                    self.generation = generation
                if conn is None:  # quiesced: this tenant's writes are held
                    self.idle.set()
                    time.sleep(0.01)
                    continue
                self.idle.clear()
                self.write(conn, new=new)
        except BaseException as exc:
            self.error = exc
        finally:
            self.idle.set()
            if conn is not None:
                conn.close()

    def write(self, conn: psycopg.Connection[Any], *, new: bool) -> None:
        op = self.rng.random()
        if not self.ledger or op < 0.35:
            name = f"t{self.tenant}-c{self.index}-{self.writes}"
            if new:
                row = conn.execute(
                    "INSERT INTO v2.accounts (tenant_id, display_name, balance_cents) "
                    "VALUES (%s, %s, 1000) RETURNING id, balance_cents, version",
                    (self.tenant, name),
                ).fetchone()
            else:
                row = conn.execute(
                    "INSERT INTO accounts (tenant_id, name, balance) VALUES (%s, %s, 10.00) "
                    "RETURNING id, (balance * 100)::bigint, updated",
                    (self.tenant, name),
                ).fetchone()
            assert row is not None
            self.ledger[row[0]] = (row[1], row[2])
        elif op < 0.9:
            key = self.rng.choice(list(self.ledger))
            if new:
                sql = ("UPDATE v2.accounts SET balance_cents = balance_cents + 150, "
                       "version = version + 1 WHERE id = %s")
            else:
                sql = ("UPDATE accounts SET balance = balance + 1.50, updated = updated + 1 "
                       "WHERE id = %s")
            assert conn.execute(sql, (key,)).rowcount == 1
            cents, version = self.ledger[key]
            self.ledger[key] = (cents + 150, version + 1)
        else:
            key = self.rng.choice(list(self.ledger))
            table = "v2.accounts" if new else "accounts"
            assert conn.execute(f"DELETE FROM {table} WHERE id = %s", (key,)).rowcount == 1
            del self.ledger[key]
        self.writes += 1


class Traffic:
    """Clients of both tenants, routed through whichever sidecar the test names, to the old or
    the new schema per tenant; a tenant can be held (quiesced) while it moves."""

    def __init__(self, clients_per_tenant: int = 3) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.dsn = ""
        self.side = {A: "old", B: "old"}
        self.held: set[int] = set()
        self.clients = [
            Client(t, i, self.route) for t in (A, B) for i in range(clients_per_tenant)
        ]

    def route(self, tenant: int) -> tuple[int, str, bool]:
        with self.lock:
            if tenant in self.held or not self.dsn:
                return self.generation, "", False
            return self.generation, self.dsn, self.side[tenant] == "new"

    def switch(self, *, dsn: str | None = None, hold: set[int] | None = None,
               side: dict[int, str] | None = None) -> None:
        """Change routing and wait until every client has taken the change (its next write
        goes where it says; nothing is in flight on the old route)."""
        with self.lock:
            self.generation += 1
            if dsn is not None:
                self.dsn = dsn
            if hold is not None:
                self.held = set(hold)
            if side is not None:
                self.side.update(side)
            generation = self.generation
        deadline = time.monotonic() + 30
        for client in self.clients:
            while client.generation < generation and client.is_alive():
                assert time.monotonic() < deadline, "a client did not take the new route"
                time.sleep(0.005)
        self.check()

    def writes(self, tenant: int) -> int:
        return sum(c.writes for c in self.clients if c.tenant == tenant)

    def run_for(self, seconds: float, *, min_writes: int = 20) -> None:
        """Let the traffic run, and make sure every unheld tenant actually wrote."""
        before = {t: self.writes(t) for t in (A, B)}
        time.sleep(seconds)
        deadline = time.monotonic() + 30
        for tenant in (A, B):
            if tenant in self.held:
                continue
            while self.writes(tenant) - before[tenant] < min_writes:
                self.check()
                assert time.monotonic() < deadline, f"tenant {tenant} is not writing"
                time.sleep(0.05)

    def check(self) -> None:
        errors = [c.error for c in self.clients if c.error is not None]
        if errors:
            raise AssertionError(f"a client failed: {errors[0]!r}") from errors[0]

    def stop(self) -> dict[int, tuple[int, int]]:
        for client in self.clients:
            client.stop.set()
        for client in self.clients:
            client.join(30)
        self.check()
        ledger: dict[int, tuple[int, int]] = {}
        for client in self.clients:
            ledger.update(client.ledger)
        return ledger


def wait_drained(db: Any, within: float = 60.0) -> None:
    """Wait until every key captured so far is applied (the runbook's step: the outbox's
    oldest key is younger than the hold). Other tenants keep adding keys meanwhile."""
    upto = db.scalar("SELECT coalesce(max(id), 0) FROM dualwrite.outbox")
    deadline = time.monotonic() + within
    while db.scalar("SELECT count(*) FROM dualwrite.outbox WHERE id <= %s", upto):
        assert time.monotonic() < deadline, "the outbox did not drain"
        time.sleep(0.05)
    dead = db.scalar("SELECT count(*) FROM dualwrite.dead_letters")
    assert dead == 0, db.sql("SELECT mapping, key, error FROM dualwrite.dead_letters")


def independent_check(db: Any, ledger: dict[int, tuple[int, int]]) -> None:
    """Old and new agree under the mapping (EXCEPT both ways), and both equal the ledger."""
    assert db.sql(f"({OLD_AS_NEW}) EXCEPT ({NEW_ROWS})") == []
    assert db.sql(f"({NEW_ROWS}) EXCEPT ({OLD_AS_NEW})") == []
    for table, cents, version in (
        ("public.accounts", "(balance * 100)::bigint", "updated"),
        ("v2.accounts", "balance_cents", "version"),
    ):
        rows = db.sql(f"SELECT id, {cents}, {version} FROM {table}")
        assert {r[0]: (int(r[1]), r[2]) for r in rows} == ledger, table


def restart(
    sidecar: Callable[..., Any], handles: list[Any], data: dict[str, Any], traffic: Traffic
) -> list[Any]:
    """Restart the sidecars one at a time with ``data``: traffic moves to the other one first
    (as a load balancer drains a sidecar), so the unheld tenants never stop writing."""
    for index in range(len(handles)):
        other = handles[1 - index]
        traffic.switch(dsn=other.dsn())
        handles[index].stop(grace=5)
        handles[index] = sidecar(data)
        traffic.switch(dsn=handles[index].dsn())
    return handles


@pytest.mark.parametrize("mode", ["outbox", "sync"])
def test_a_tenant_moves_forward_and_back_under_live_traffic(
    db: Any, sidecar: Callable[..., Any], mode: str
) -> None:
    db.sql(SCHEMA)
    before = migration([], mode=mode)
    run_setup(db, before)
    handles = [sidecar(before), sidecar(before)]
    traffic = Traffic()
    traffic.switch(dsn=handles[0].dsn())
    for client in traffic.clients:
        client.start()
    traffic.run_for(1.0)

    # --- move tenant A forward: hold A, drain, new config everywhere, A writes the new schema
    traffic.switch(hold={A})
    wait_drained(db)
    moved = migration([A], mode=mode)
    run_setup(db, moved)  # sync mode: the delete functions know the new ownership
    handles = restart(sidecar, handles, moved, traffic)
    for handle in handles:
        assert handle.http_json("/status")[1]["cutover"]["tenants"] == [str(A)]
    traffic.switch(hold=set(), side={A: "new"})
    traffic.run_for(1.5)
    wait_drained(db)

    # --- and back
    traffic.switch(hold={A})
    wait_drained(db)
    run_setup(db, before)
    handles = restart(sidecar, handles, before, traffic)
    traffic.switch(hold=set(), side={A: "old"})
    traffic.run_for(1.0)

    ledger = traffic.stop()
    wait_drained(db)
    assert db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0
    assert traffic.writes(A) > 50
    assert traffic.writes(B) > 50
    assert {t for (t,) in db.sql("SELECT DISTINCT tenant_id FROM v2.accounts")} == {A, B}
    independent_check(db, ledger)


def test_while_moved_each_direction_carries_only_its_tenants(
    db: Any, sidecar: Callable[..., Any]
) -> None:
    """A moved tenant's write to the old table is not mirrored forward, a forward tenant's
    write to the new table is not mirrored back: each is divergence for reconcile to show."""
    db.sql(SCHEMA)
    data = migration([A])
    run_setup(db, data)
    handle = sidecar(data)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO accounts (id, tenant_id, name, balance) "
                     "VALUES (1, 1, 'a-old', 1), (2, 2, 'b-old', 2)")
        conn.execute("INSERT INTO v2.accounts (id, tenant_id, display_name, balance_cents) "
                     "VALUES (3, 1, 'a-new', 300), (4, 2, 'b-new', 400)")
    pos.drain(handle)
    assert db.sql("SELECT id FROM v2.accounts ORDER BY id") == [(2,), (3,), (4,)]
    assert db.sql("SELECT id FROM accounts ORDER BY id") == [(1,), (2,), (3,)]
    # psql's simple Queries (run as prepared mirrored writes from the second one on), naming
    # either table unqualified through its search_path: the tables' columns differ
    executed = REGISTRY.get_sample_value(
        "dualwrite_prepared_writes_total", {"outcome": "executed"}) or 0
    for path, sql in (
        ("public", "UPDATE accounts SET balance = balance + 1 WHERE id = {}"),
        ("v2", "UPDATE accounts SET balance_cents = balance_cents + 100 WHERE id = {}"),
    ):
        script = "".join(sql.format(key) + ";\n" for key in (1, 2, 3, 4) * 2)
        done = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", handle.dsn()],
            input=f"SET search_path = {path};\n{script}", capture_output=True, text=True,
            timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        pos.drain(handle)  # (else the forward key of row 2 could overwrite its direct write)
    assert (REGISTRY.get_sample_value(
        "dualwrite_prepared_writes_total", {"outcome": "executed"}) or 0) > executed
    pos.drain(handle)
    # tenant 2 written in the old table and tenant 1 in the new one are mirrored, the others
    # are not (old 2 stays at 400 while new 2 went on to 600: divergence reconcile would show)
    assert db.sql(f"{OLD_AS_NEW} ORDER BY id") == [
        (1, 1, "a-old", 300, 0), (2, 2, "b-old", 400, 0), (3, 1, "a-new", 500, 0)]
    assert db.sql(f"{NEW_ROWS} ORDER BY id") == [
        (2, 2, "b-old", 600, 0), (3, 1, "a-new", 500, 0), (4, 2, "b-new", 600, 0)]
    compiled = {m.name: m for m in compile_all(parse_config({"service_dsn": db.dsn, **data}))}
    assert compiled["accounts"].cutover is not None
    assert compiled["accounts"].cutover.phase("1") == "moved"


# --- careless operators ------------------------------------------------------------------------


def _problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    error = info.value
    return error.problems if isinstance(error, ConfigErrors) else [(error.path, error.reason)]


def test_a_cutover_without_a_tenant_column_is_refused_with_its_path() -> None:
    data = migration([A])
    for mapping in data["mappings"]:
        del mapping["tenant_column"]
    problems = _problems(data)
    assert ("mappings[0].tenant_column", problems[0][1]) in problems
    assert any(p == "mappings[1].tenant_column" for p, _ in problems)
    assert "a staged cutover splits its rows by tenant" in problems[0][1]


def test_a_cutover_of_a_mapping_without_a_reverse_mapping_is_refused() -> None:
    data = migration([A])
    data["mappings"] = data["mappings"][:1]
    data["cutover"]["reverse"] = {"accounts": "accounts_back"}
    problems = _problems(data)
    assert problems[0] == (
        "cutover.reverse.accounts", "no mapping named 'accounts_back' (the reverse mapping)"
    )
    # a tenant listed with no pair at all
    assert _problems({"mappings": [FORWARD], "cutover": {"tenants": [1]}})[0] == (
        "cutover", "tenants are listed but no mapping pair is: set reverse (forward mapping "
        "-> its reverse mapping)"
    )
    # a pair whose "reverse" goes the same way is not a reverse
    same_way = {**REVERSE, "source": "public.accounts", "target": "v3.accounts"}
    problems = _problems({**data, "mappings": [FORWARD, same_way]})
    assert problems[0][0] == "cutover.reverse.accounts"
    assert "is not the reverse of accounts" in problems[0][1]
    # another tenant mapping left without a reverse
    other = {**FORWARD, "name": "ledger", "source": "public.ledger", "target": "v2.ledger"}
    problems = _problems({**migration([A]), "mappings": [FORWARD, REVERSE, other]})
    assert problems[0][0] == "cutover.reverse"
    assert problems[0][1].startswith("mapping ledger has a tenant_column but no reverse mapping")


def test_unknown_keys_and_unsafe_combinations_in_cutover_are_refused() -> None:
    data = migration([A])
    data["cutover"]["tenant"] = [2]
    assert _problems(data)[0] == ("cutover.tenant", "unknown key (did you mean 'tenants'?)")
    data = migration([A])
    data["mappings"][1]["capture"] = "both"
    problem = _problems(data)[0]
    assert problem[0] == "mappings[1].capture"
    assert "needs capture: statement" in problem[1]
    data = migration([A])
    data["mappings"][0]["target_dsn"] = "postgresql://postgres@127.0.0.1:5432/other"
    data["mappings"][0]["mode"] = "outbox"
    problems = _problems(data)
    assert any(p == "mappings[0].target_dsn" for p, _ in problems), problems
    assert _problems({**migration([A, A])})[0] == ("cutover.tenants", "lists a tenant twice")


def test_without_a_cutover_a_loop_is_still_refused(db: Any) -> None:
    db.sql(SCHEMA)
    data = migration([])
    del data["cutover"]
    with pytest.raises(ConfigError, match="mirror loops are refused"):
        run_setup(db, data)


def test_tenant_ids_and_decimal_literals() -> None:
    config = parse_config(migration([A, 7]))
    assert config.cutover.tenants == ["1", "7"]
    forward, reverse = compile_all(config)
    assert forward.filter is not None
    assert reverse.filter is not None
    assert "NOT" in forward.filter.sql
    assert "NOT" not in reverse.filter.sql
    quoted = compile_all(parse_config(migration(["it's"])))  # type: ignore[list-item]
    assert "'it''s'" in quoted[1].owned_sql()


def test_report_and_tenant_gauges_judge_each_tenant_in_its_phase(
    db: Any, sidecar: Callable[..., Any], tmp_path: Path
) -> None:
    """Tenant 1 has moved: its old row edited behind dualwrite's back is divergence of the
    reverse mapping, judged in its phase (NO-GO); tenant 3, judged only by a pass limited to
    it, is GO in the forward phase, and the go gauge counts it (it used to count only
    report.tenants)."""
    db.sql(SCHEMA)
    data = migration([A])
    run_setup(db, data)
    handle = sidecar(data)
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO v2.accounts (tenant_id, display_name, balance_cents) "
                     "SELECT 1, 'a' || g, 100 * g FROM generate_series(1, 3) g")
        conn.execute("INSERT INTO accounts (tenant_id, name, balance) "
                     "SELECT 2 + g % 2, 'b' || g, g FROM generate_series(1, 6) g")
    pos.drain(handle)
    db.sql("UPDATE public.accounts SET name = 'edited' "
           "WHERE id = (SELECT min(id) FROM public.accounts WHERE tenant_id = 1)")
    path = write_config(tmp_path / "dw.yaml", {"service_dsn": db.dsn, **data})
    done = run_dualwrite("reconcile", "--config", str(path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert run_dualwrite("reconcile", "--config", str(path), "--mapping", "accounts",
                         "--tenant", "3").returncode == 0
    # the reverse mapping's pass found tenant 1's row; the forward one never looked at it
    assert db.sql("SELECT mapping, changed FROM dualwrite.reconcile_runs WHERE tenant IS NULL "
                  "ORDER BY mapping") == [("accounts", 0), ("accounts_back", 1)]

    report = json.loads(run_dualwrite("report", "--config", str(path), "--format", "json",
                                      "--max-gap", "1h").stdout)
    tenants = {t["tenant"]: t for t in report["tenants"]}
    assert set(tenants) == {"1", "3"}
    assert (tenants["1"]["phase"], tenants["1"]["go"]) == ("moved", False)
    assert tenants["1"]["divergent"]["changed"] == 1
    assert all(n.startswith("accounts_back:") for n in tenants["1"]["failing"]
               if n.startswith("accounts"))
    assert not any(n.startswith("accounts:") for n in tenants["1"]["failing"])
    assert tenants["3"]["phase"] == "forward"
    assert not any(n.startswith("accounts_back:") for n in tenants["3"]["failing"])
    markdown = run_dualwrite("report", "--config", str(path), "--max-gap", "1h").stdout
    assert "| 1 (moved) | **NO-GO** | 0 | 0 | 1 |" in markdown
    assert "a moved tenant writes the new schema" in markdown
    html = run_dualwrite("report", "--config", str(path), "--format", "html",
                         "--max-gap", "1h").stdout
    assert "<td><b>1 (moved)</b></td>" in html
    assert "<td><b>3 (forward)</b></td>" in html

    # tenant 3 moves too: the reverse mapping's passes so far did not compare it, so they do
    # not count for it; a pass after the move does
    both = {"service_dsn": db.dsn, **migration([A, 3]),
            "report": {"criteria": {"clean_window_hours": 0}}}
    path = write_config(tmp_path / "moved.yaml", both)

    def failing_of_3() -> list[str]:
        done = run_dualwrite("report", "--config", str(path), "--format", "json",
                             "--max-gap", "1h")
        found = {t["tenant"]: t for t in json.loads(done.stdout)["tenants"]}
        assert found["3"]["phase"] == "moved"
        return list(found["3"]["failing"])

    assert "accounts_back:clean_window" in failing_of_3()
    assert run_dualwrite("reconcile", "--config", str(path), "--mapping", "accounts_back",
                         "--tenant", "3").returncode == 0
    assert "accounts_back:clean_window" not in failing_of_3()

    sidecar_ = handle.sidecar
    assert sidecar_ is not None
    sidecar_._gauges_refreshed = float("-inf")
    handle.call(sidecar_._refresh_gauges)
    assert REGISTRY.get_sample_value("dualwrite_tenants", {"verdict": "no_go"}) == 1
    assert REGISTRY.get_sample_value("dualwrite_tenants", {"verdict": "go"}) == 1


def test_check_proves_the_reverse_mapping_gives_back_what_the_forward_one_carries(db: Any) -> None:
    db.sql(SCHEMA)
    db.sql("INSERT INTO accounts (tenant_id, name, balance, updated) "
           "SELECT 1 + g % 2, 'n' || g, g * 1.25, g FROM generate_series(1, 20) g")
    data = migration([A, 99])
    run_setup(db, data)
    lines = asyncio.run(check_live(parse_config({"service_dsn": db.dsn, **data})))
    assert ("cutover accounts <-> accounts_back: the rows of tenants 1, 99 map forward and "
            "back unchanged") in lines
    assert ("warning: cutover tenant '99' has no row in public.accounts nor in v2.accounts "
            "(a typo, or a tenant not created yet?)") in lines
    assert not any("'1'" in line for line in lines)

    # a reverse mapping that cannot express the old rows: the version counter is not kept
    lossy = migration([A])
    lossy["mappings"][1]["columns"] = {**REVERSE["columns"], "updated": "0"}
    with pytest.raises(MappingValidationError) as info:
        asyncio.run(check_live(parse_config({"service_dsn": db.dsn, **lossy})))
    assert info.value.mapping == "accounts_back"
    assert "does not give back what accounts carries: the old row with key [" in str(info.value)
    # before any tenant moves, every tenant's rows are looked at
    lossy["cutover"]["tenants"] = []
    with pytest.raises(MappingValidationError, match="a move would lose data"):
        asyncio.run(check_live(parse_config({"service_dsn": db.dsn, **lossy})))


def test_an_applier_on_the_old_config_dead_letters_a_moved_tenants_keys_instead_of_dropping(
    db: Any, sidecar: Callable[..., Any]
) -> None:
    """The careless rolling restart: tenant 1's writes resume on a sidecar with the new
    config while an applier still runs the old one. Its reverse mapping carries no tenant, so
    applying the keys would drop them (the new row is "not its own", the old row's delete "not
    its own" either); it refuses them instead, and a process on the new config applies them."""
    db.sql(SCHEMA)
    old, new = migration([]), migration([A])
    run_setup(db, new)
    capture = sidecar({**new, "applier": {"enabled": False}})
    stale = sidecar(old)
    with psycopg.connect(capture.dsn(), autocommit=True) as conn:
        conn.execute("INSERT INTO v2.accounts (id, tenant_id, display_name, balance_cents) "
                     "VALUES (1, 1, 'a', 100), (2, 1, 'b', 200)")
    deadline = time.monotonic() + 30
    while db.scalar("SELECT count(*) FROM dualwrite.dead_letters") < 2:
        assert time.monotonic() < deadline, db.sql("SELECT * FROM dualwrite.outbox")
        time.sleep(0.05)
    error = db.scalar("SELECT DISTINCT error FROM dualwrite.dead_letters")
    assert "mapping accounts_back does not carry the tenant of this row" in error
    assert "(cutover.tenants here: none)" in error
    assert db.scalar("SELECT count(*) FROM public.accounts") == 0
    stale.stop(grace=0)
    current = sidecar({**new, "applier": {"poll_interval_seconds": 0.05,
                                          "retry_base_seconds": 0.1}})
    deadline = time.monotonic() + 30
    while db.scalar("SELECT count(*) FROM dualwrite.dead_letters"):
        assert time.monotonic() < deadline, db.sql("SELECT error FROM dualwrite.dead_letters")
        time.sleep(0.05)
    assert db.sql("SELECT id, name, balance FROM public.accounts ORDER BY id") == [
        (1, "a", 1), (2, "b", 2)]

    # a delete: the new row is gone, the old one is the only trace of whose it was
    current.stop(grace=0)
    stale = sidecar(old)
    with psycopg.connect(capture.dsn(), autocommit=True) as conn:
        conn.execute("DELETE FROM v2.accounts WHERE id = 2")
    deadline = time.monotonic() + 30
    while not db.scalar("SELECT count(*) FROM dualwrite.dead_letters"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert db.sql("SELECT id FROM public.accounts ORDER BY id") == [(1,), (2,)]
    stale.stop(grace=0)
    sidecar({**new, "applier": {"poll_interval_seconds": 0.05, "retry_base_seconds": 0.1}})
    deadline = time.monotonic() + 30
    while db.scalar("SELECT count(*) FROM dualwrite.dead_letters"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert db.sql("SELECT id FROM public.accounts ORDER BY id") == [(1,)]
