"""Roles and row-level security (Supabase-style multi-tenancy).

- A service role that a policy would filter is refused by ``check``, ``setup``, start-up and
  ``reconcile``, naming the mapping and what to do; BYPASSRLS, or owning the tables without
  FORCE, is accepted.
- A policy that appears after start-up cannot make the applier or the reconciler conclude
  "deleted" or "clean" from rows they could not see: service sessions run with
  ``row_security = off``, so PostgreSQL raises instead of hiding rows.
- ``setup`` grants a non-superuser application role what the mirrored statement needs (the
  target's schema too), and ``check`` verifies it.
- End to end, in both modes: tenants of a non-superuser application role setting
  ``app.tenant`` through the proxy are isolated in source and target, and the mirror is
  complete (an independent EXCEPT check as superuser).

Roles are cluster-wide: each test makes its own with a unique name and drops them after.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from support import wait_until
from test_compare_support import config_data, prepare, run_dualwrite, write_config

from compare.reconciler import PassOptions, reconcile_mapping
from core.config import parse_config
from core.errors import ConfigError, MappingValidationError
from dualwrite.service import check_live, connect_service, setup, validated_mappings

_SCHEMA = """
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    tenant_id int NOT NULL,
    item text NOT NULL,
    qty int NOT NULL
);
CREATE SCHEMA v2;
CREATE TABLE v2.orders (
    id bigint PRIMARY KEY,
    tenant_id int NOT NULL,
    item text NOT NULL,
    qty int NOT NULL
);
"""
#: the usual Supabase-style tenant policy
_POLICY = """
ALTER TABLE {table} ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {table}
    USING (tenant_id = nullif(current_setting('app.tenant', true), '')::int)
    WITH CHECK (tenant_id = nullif(current_setting('app.tenant', true), '')::int);
"""


def _mapping(mode: str = "outbox") -> dict[str, Any]:
    return {
        "name": "orders",
        "source": "public.orders",
        "target": "v2.orders",
        "key": ["id"],
        "columns": {"id": "id", "tenant_id": "tenant_id", "item": "upper(item)", "qty": "qty"},
        "mode": mode,
        "tenant_column": "tenant_id",
    }


@dataclass(frozen=True)
class Roles:
    app: str
    service: str


@pytest.fixture
def roles(db) -> Iterator[Roles]:
    """A LOGIN application role and a LOGIN service role of this test's own (no superuser,
    no BYPASSRLS), dropped afterwards."""
    suffix = uuid.uuid4().hex[:10]
    made = Roles(f"dw_app_{suffix}", f"dw_svc_{suffix}")
    db.sql(f"CREATE ROLE {made.app} LOGIN; CREATE ROLE {made.service} LOGIN")
    try:
        yield made
    finally:
        db.sql(f"DROP OWNED BY {made.app}, {made.service}")
        db.sql(f"DROP ROLE {made.app}, {made.service}")


def grant_service(db, role: str) -> None:
    """What a service role needs besides seeing every row: the tables and the control schema."""
    db.sql(
        f"GRANT CREATE ON DATABASE {db.name} TO {role};"
        f"GRANT USAGE ON SCHEMA public, v2 TO {role};"
        f"GRANT ALL ON ALL TABLES IN SCHEMA public, v2 TO {role};"
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public, v2 TO {role};"
        f"GRANT USAGE, CREATE ON SCHEMA dualwrite TO {role};"
        f"GRANT ALL ON ALL TABLES IN SCHEMA dualwrite TO {role};"
        f"GRANT ALL ON ALL SEQUENCES IN SCHEMA dualwrite TO {role};"
        f"GRANT ALL ON ALL FUNCTIONS IN SCHEMA dualwrite TO {role};"
    )


def grant_app(db, role: str) -> None:
    """What an application has on its own (old) schema, and nothing of the new one."""
    db.sql(
        f"GRANT USAGE ON SCHEMA public TO {role};"
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON orders TO {role};"
        f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};"
    )


async def _setup_as_superuser(db, mappings: list[dict[str, Any]], **extra: Any) -> None:
    await setup(parse_config(config_data(db.dsn, mappings, **extra)))


# --- 1. a service role that row security would filter ------------------------------------------


@pytest.mark.parametrize(
    ("case", "refused"),
    [
        ("source_policy", "source public.orders has row-level security enabled"),
        ("target_policy", "target v2.orders has row-level security enabled"),
        ("owner_forced", "source public.orders forces row-level security"),
        ("owner", None),
        ("bypassrls", None),
    ],
)
async def test_a_service_role_that_a_policy_would_filter_is_refused(
    db, roles, tmp_path, case, refused
):
    db.sql(_SCHEMA)
    await _setup_as_superuser(db, [_mapping()])
    grant_service(db, roles.service)
    db.sql(_POLICY.format(table="v2.orders" if case == "target_policy" else "orders"))
    if case.startswith("owner"):
        db.sql(f"ALTER TABLE orders OWNER TO {roles.service}")
        db.sql(f"ALTER TABLE v2.orders OWNER TO {roles.service}")
    if case == "owner_forced":
        db.sql("ALTER TABLE orders FORCE ROW LEVEL SECURITY")
    if case == "bypassrls":
        db.sql(f"ALTER ROLE {roles.service} BYPASSRLS")
    data = config_data(db.dsn_as(roles.service), [_mapping()])
    config = parse_config(data)

    if refused is None:
        lines = await check_live(config)
        assert "mapping orders: public.orders -> v2.orders (outbox) ok" in lines
        return
    with pytest.raises(MappingValidationError) as checked:
        await check_live(config)
    message = str(checked.value)
    assert message.startswith("mappings[orders]: ")
    assert refused in message
    assert f"service role {roles.service}" in message
    assert f"ALTER ROLE \"{roles.service}\" BYPASSRLS" in message
    assert "without FORCE ROW LEVEL SECURITY" in message
    with pytest.raises(MappingValidationError, match="row-level security"):
        await setup(config)
    # reconcile as that role: a configuration error (exit 2), never "clean"
    path = write_config(tmp_path / "svc.yaml", data)
    done = run_dualwrite("reconcile", "--config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert refused in done.stderr


def test_the_sidecar_does_not_start_with_a_service_role_a_policy_would_filter(
    db, roles, sidecar
):
    db.sql(_SCHEMA + _POLICY.format(table="orders"))
    asyncio.run(_setup_as_superuser(db, [_mapping()]))
    grant_service(db, roles.service)
    with pytest.raises(MappingValidationError, match="BYPASSRLS"):
        sidecar({"service_dsn": db.dsn_as(roles.service), "mappings": [_mapping()]})


def test_a_policy_added_after_start_up_fails_the_applier_loudly_and_deletes_nothing(
    db, roles, sidecar
):
    """The applier cannot see the row: with row_security off that is an error (the key is
    dead-lettered with SQLSTATE 42501), not a deletion of the target row."""
    db.sql(_SCHEMA)
    asyncio.run(_setup_as_superuser(db, [_mapping()]))
    grant_service(db, roles.service)
    db.sql("INSERT INTO orders (tenant_id, item, qty) VALUES (1, 'tea', 1), (2, 'cake', 2)")
    db.sql("INSERT INTO v2.orders SELECT id, tenant_id, upper(item), qty FROM orders")
    handle = sidecar(
        {
            "service_dsn": db.dsn_as(roles.service),
            "mappings": [_mapping()],
            "applier": {"poll_interval_seconds": 0.05, "retry_base_seconds": 60},
        }
    )
    db.sql(_POLICY.format(table="orders"))
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:  # the superuser application
        conn.execute("UPDATE orders SET qty = 10 WHERE id = 1")
    wait_until(
        lambda: db.scalar("SELECT count(*) FROM dualwrite.dead_letters") == 1,
        what="the hidden row's key to be dead-lettered",
    )
    assert db.sql("SELECT key::text, sqlstate FROM dualwrite.dead_letters") == [("[1]", "42501")]
    assert db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0
    # the target row is still there, unchanged: nothing concluded it was deleted
    assert db.sql("SELECT id, qty FROM v2.orders ORDER BY id") == [(1, 1), (2, 2)]


async def test_a_pass_that_cannot_see_every_row_fails_instead_of_calling_it_clean(db, roles):
    db.sql(_SCHEMA)
    data = config_data(db.dsn, [_mapping()])
    config, mappings = await prepare(data)  # validated as the superuser, before the policy
    grant_service(db, roles.service)
    db.sql("INSERT INTO orders (tenant_id, item, qty) VALUES (1, 'tea', 1), (2, 'cake', 2)")
    db.sql(_POLICY.format(table="orders") + _POLICY.format(table="v2.orders"))
    as_service = parse_config({**data, "service_dsn": db.dsn_as(roles.service)})
    result = await reconcile_mapping(as_service, mappings["orders"], PassOptions())
    assert result.status == "failed"
    assert "row-level security" in (result.error or "")
    # as the superuser the same pass sees the two missing rows
    result = await reconcile_mapping(config, mappings["orders"], PassOptions())
    assert (result.status, result.tally.counts["missing"]) == ("done", 2)


# --- 2. what the application role needs ------------------------------------------------------


async def test_setup_grants_a_non_superuser_app_role_what_a_sync_mirror_needs(db, roles, sidecar):
    db.sql(_SCHEMA)
    grant_app(db, roles.app)
    mappings = [_mapping("sync")]
    await _setup_as_superuser(db, mappings, app_role=roles.app)
    config = parse_config(config_data(db.dsn, mappings, app_role=roles.app))
    assert f"app_role {roles.app}: can run every mirrored statement" in await check_live(config)

    handle = await asyncio.to_thread(sidecar, {"mappings": mappings})
    with psycopg.connect(handle.dsn(user=roles.app), autocommit=True) as conn:
        conn.execute("INSERT INTO orders (tenant_id, item, qty) VALUES (1, 'tea', 3)")
        conn.execute("UPDATE orders SET qty = 4")
    assert db.sql("SELECT tenant_id, item, qty FROM v2.orders") == [(1, "TEA", 4)]
    with psycopg.connect(handle.dsn(user=roles.app), autocommit=True) as conn:
        conn.execute("DELETE FROM orders")
    assert db.sql("SELECT count(*) FROM v2.orders") == [(0,)]


@pytest.mark.parametrize(
    ("revoke", "error", "lacks"),
    [
        ("REVOKE USAGE ON SCHEMA v2 FROM {app}", MappingValidationError, "USAGE on schema v2"),
        ("REVOKE UPDATE ON v2.orders FROM {app}", MappingValidationError, "on v2.orders"),
        ("REVOKE SELECT ON orders FROM {app}", MappingValidationError, "SELECT on columns"),
        ("REVOKE INSERT ON dualwrite.outbox FROM {app}", ConfigError, "INSERT on dualwrite.outbox"),
    ],
)
async def test_check_says_what_the_app_role_lacks(db, roles, revoke, error, lacks):
    db.sql(_SCHEMA)
    grant_app(db, roles.app)
    mappings = [_mapping("sync")]
    await _setup_as_superuser(db, mappings, app_role=roles.app)
    db.sql(revoke.format(app=roles.app))
    config = parse_config(config_data(db.dsn, mappings, app_role=roles.app))
    with pytest.raises(error) as checked:
        await check_live(config)
    assert lacks in str(checked.value)
    assert f"app_role {roles.app} cannot run the mirrored statements" in str(checked.value)
    assert "dualwrite setup" in str(checked.value)
    await setup(config)  # grants it again
    assert f"app_role {roles.app}: can run every mirrored statement" in await check_live(config)


async def test_check_skips_the_app_role_check_when_the_role_does_not_exist_yet(db):
    db.sql(_SCHEMA)
    await _setup_as_superuser(db, [_mapping("sync")])
    config = parse_config(config_data(db.dsn, [_mapping("sync")], app_role="dw_nobody_here"))
    lines = await check_live(config)
    assert "app_role dw_nobody_here does not exist yet: its privileges were not checked" in lines


# --- 3. end to end: tenants through the proxy, both modes ------------------------------------

_EXPECTED = "SELECT id, tenant_id, upper(item), qty FROM orders"
_ACTUAL = "SELECT id, tenant_id, item, qty FROM v2.orders"


def _tenant(handle, role: str, tenant: int) -> psycopg.Connection[Any]:
    conn = psycopg.connect(handle.dsn(user=role), autocommit=True)
    conn.execute(f"SET app.tenant = '{tenant}'")
    return conn


@pytest.mark.parametrize("mode", ["sync", "outbox"])
def test_tenants_are_isolated_and_the_mirror_is_complete(db, roles, sidecar, mode):
    db.sql(_SCHEMA + _POLICY.format(table="orders") + _POLICY.format(table="v2.orders"))
    grant_app(db, roles.app)
    # the application's rights on the new table, to check isolation there; in sync mode the
    # schema's USAGE comes from setup (the application does not use v2 itself yet)
    db.sql(f"GRANT ALL ON v2.orders TO {roles.app}")
    if mode == "outbox":
        db.sql(f"GRANT USAGE ON SCHEMA v2 TO {roles.app}")
    mappings = [_mapping(mode)]
    asyncio.run(_setup_as_superuser(db, mappings, app_role=roles.app))
    # the service role as the README recommends: no superuser, BYPASSRLS
    grant_service(db, roles.service)
    db.sql(f"ALTER ROLE {roles.service} BYPASSRLS")
    handle = sidecar(
        {
            "service_dsn": db.dsn_as(roles.service),
            "app_role": roles.app,
            "mappings": mappings,
            "applier": {"poll_interval_seconds": 0.05},
        }
    )
    one, two = _tenant(handle, roles.app, 1), _tenant(handle, roles.app, 2)
    try:
        for conn, tenant in ((one, 1), (two, 2)):
            conn.execute(
                "INSERT INTO orders (tenant_id, item, qty) "
                "SELECT %s, 'item ' || g, g FROM generate_series(1, 10) g",
                (tenant,),
            )
            conn.execute("UPDATE orders SET qty = qty * 10 WHERE qty % 3 = 0")
            conn.execute("DELETE FROM orders WHERE qty = 1")
        # a tenant sees and changes only its own rows, in the source ...
        assert one.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [(1,)]
        assert one.execute("UPDATE orders SET qty = 0 WHERE tenant_id = 2").rowcount == 0
        assert one.execute("DELETE FROM orders WHERE tenant_id = 2").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            one.execute("INSERT INTO orders (tenant_id, item, qty) VALUES (2, 'forged', 1)")
        if mode == "outbox":
            pos_drain_outbox(db)
        # ... and in the target
        assert one.execute("SELECT DISTINCT tenant_id FROM v2.orders").fetchall() == [(1,)]
        assert two.execute("SELECT count(*) FROM v2.orders").fetchone() == (9,)
        assert one.execute("DELETE FROM v2.orders WHERE tenant_id = 2").rowcount == 0
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            one.execute("INSERT INTO v2.orders VALUES (999, 2, 'FORGED', 1)")
    finally:
        one.close()
        two.close()
    # complete: an independent check as superuser, EXCEPT ALL both ways
    assert db.sql(f"{_EXPECTED} EXCEPT ALL {_ACTUAL}") == []
    assert db.sql(f"{_ACTUAL} EXCEPT ALL {_EXPECTED}") == []
    assert db.sql("SELECT tenant_id, count(*) FROM v2.orders GROUP BY 1 ORDER BY 1") == [
        (1, 9),
        (2, 9),
    ]
    assert db.scalar("SELECT count(*) FROM dualwrite.dead_letters") == 0
    # and the service role's own reconcile agrees
    data = config_data(db.dsn_as(roles.service), mappings)
    config, bound = asyncio.run(prepare_as(data))
    result = asyncio.run(reconcile_mapping(config, bound["orders"], PassOptions()))
    assert (result.status, result.tally.compared, result.tally.clean) == ("done", 18, True)


def pos_drain_outbox(db) -> None:
    wait_until(
        lambda: db.scalar("SELECT count(*) FROM dualwrite.outbox") == 0,
        what="the applier to drain the outbox",
    )


async def prepare_as(data: dict[str, Any]):
    """Bind the mappings as the config's service role (no setup: that is the superuser's)."""
    config = parse_config(data)
    conn = await connect_service(config)
    try:
        mappings = await validated_mappings(conn, config)
    finally:
        await conn.close()
    return config, {m.name: m for m in mappings}
