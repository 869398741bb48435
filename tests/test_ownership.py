"""Which target rows a mapping owns (``target_filter``): merges, splits and reverse mappings.

- The split, merge and reverse examples in config/ reconcile clean after mirroring, and their
  dry-run repairs plan nothing and touch nothing.
- Repair never deletes a row its mapping does not own, even a divergent one.
- Two mappings into one target, or a reverse mapping into a table that holds other rows,
  without ``target_filter`` is a configuration error naming the key.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import psycopg
import pytest
from support import pos
from test_compare_support import config_data, prepare

from compare.reconciler import PassOptions, PassResult, reconcile_mapping
from core.config import Config, parse_config
from core.errors import ConfigError, MappingValidationError
from core.mapping import CompiledMapping, compile_all
from dualwrite.service import check_live

FAST_APPLIER = {"poll_interval_seconds": 0.05}


def _snapshot(db, table: str) -> list[tuple[Any, ...]]:
    return db.sql(f"SELECT * FROM {table} ORDER BY 1, 2")


def _bound(db, migration: dict[str, Any]) -> tuple[Config, dict[str, CompiledMapping]]:
    return asyncio.run(prepare(config_data(db.dsn, migration["mappings"])))


def _pass(config: Config, mapping: CompiledMapping, **options: Any) -> PassResult:
    result = asyncio.run(reconcile_mapping(config, mapping, PassOptions(**options)))
    assert result.status == "done", result.error
    return result


def _clean_and_dry_run_touches_nothing(db, migration: dict[str, Any], table: str):
    config, mappings = _bound(db, migration)
    before = _snapshot(db, table)
    for mapping in mappings.values():
        result = _pass(config, mapping)
        assert result.tally.clean, (mapping.name, result.tally.as_dict())
        assert result.tally.compared > 0
        dry = _pass(config, mapping, repair=True, dry_run=True)
        assert dry.repair is not None
        assert (dry.repair.planned, dry.remaining) == (0, 0), mapping.name
    assert _snapshot(db, table) == before
    return config, mappings


# --- the examples reconcile clean -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["outbox", "sync"])
def test_the_split_example_reconciles_clean_and_a_dry_run_touches_nothing(db, sidecar, mode):
    migration = pos.migration("split-users", modes={"customers": mode, "employees": mode})
    pos.prepare(db, migration)
    handle = sidecar({**migration, "applier": FAST_APPLIER})
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "SELECT 1 + g % 3, 'u' || g || '@x', 'F' || g, 'L', "
            "(ARRAY['customer', 'employee', 'manager'])[1 + g % 3] FROM generate_series(1, 30) g"
        )
        conn.execute("UPDATE users SET role = 'employee' WHERE id % 7 = 0")
    pos.drain(handle)
    _clean_and_dry_run_touches_nothing(db, migration, "v2.customers")
    assert db.scalar("SELECT count(*) FROM v2.employees") > 0


def test_the_merge_example_reconciles_clean_and_repair_leaves_the_other_half_alone(db, sidecar):
    migration = pos.migration("merge-sales")
    pos.prepare(db, migration)
    handle = sidecar({**migration, "applier": FAST_APPLIER})
    with psycopg.connect(handle.dsn(user=pos.APP_ROLE), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pos_orders (tenant_id, store_code, total) "
            "SELECT 1 + g % 3, 'S' || g % 4, g * 1.5 FROM generate_series(1, 20) g"
        )
        conn.execute(  # the same ids as the till orders: the channel keeps them apart
            "INSERT INTO web_orders (tenant_id, customer_email, total) "
            "SELECT 1 + g % 3, 'c' || g || '@x', g * 2.5 FROM generate_series(1, 12) g"
        )
        conn.execute("UPDATE pos_orders SET total = total + 1 WHERE id % 5 = 0")
        conn.execute("DELETE FROM web_orders WHERE id = 3")
    pos.drain(handle)
    counts = dict(db.sql("SELECT channel, count(*) FROM v2.sales GROUP BY 1"))
    assert counts == {"pos": 20, "web": 11}
    config, mappings = _clean_and_dry_run_touches_nothing(db, migration, "v2.sales")
    # each half compares its own rows only
    assert _pass(config, mappings["pos_sales"]).tally.compared == 20
    assert _pass(config, mappings["web_sales"]).tally.compared == 11

    # a web row no web order produces is web_sales' divergence, never pos_sales'
    db.sql("INSERT INTO v2.sales VALUES ('web', 999, 1, 1, now(), NULL, 'ghost@x')")
    assert _pass(config, mappings["pos_sales"], repair=True).tally.clean
    assert db.scalar("SELECT count(*) FROM v2.sales") == 32
    found = _pass(config, mappings["web_sales"], repair=True)
    assert found.tally.counts["extra"] == 1
    assert found.repair is not None
    assert found.repair.deleted == 1
    assert dict(db.sql("SELECT channel, count(*) FROM v2.sales GROUP BY 1")) == counts


def test_the_reverse_example_reconciles_clean_beside_rows_it_does_not_own(db, sidecar, pg):
    migration = pos.migration("reverse-customers")
    pos.prepare(db, migration)
    # users also holds employees: the reverse mapping does not own them
    db.sql(
        "INSERT INTO users (id, tenant_id, email, first_name, last_name, role, created_at) "
        "SELECT 1000 + g, 1, 'e' || g || '@x', 'E', 'Mployee', "
        "(ARRAY['employee', 'manager'])[1 + g % 2], now() FROM generate_series(1, 8) g"
    )
    handle = sidecar({**migration, "applier": FAST_APPLIER})
    with psycopg.connect(handle.dsn(), autocommit=True) as conn:  # the new code's own role
        conn.execute(
            "INSERT INTO v2.customers (id, tenant_id, email, full_name, created_at) "
            "SELECT g, 1 + g % 3, 'c' || g || '@x', 'First' || g || ' Last Name', now() "
            "FROM generate_series(1, 15) g"
        )
        conn.execute("UPDATE v2.customers SET phone = '+1' WHERE id % 4 = 0")
        conn.execute("DELETE FROM v2.customers WHERE id = 2")
    pos.drain(handle)
    assert dict(db.sql("SELECT role, count(*) FROM users GROUP BY 1")) == {
        "customer": 14,
        "employee": 4,
        "manager": 4,
    }
    _clean_and_dry_run_touches_nothing(db, migration, "users")
    # check is satisfied with the target_filter ...
    upstream = {"host": pg.host, "port": pg.port}
    data = {**config_data(db.dsn, migration["mappings"]), "upstream": upstream}
    assert "mapping users_from_customers: v2.customers -> public.users (outbox) ok" in (
        asyncio.run(check_live(parse_config(data)))
    )
    # ... and says what is wrong without it
    unowned = copy.deepcopy(data)
    del unowned["mappings"][0]["target_filter"]
    with pytest.raises(MappingValidationError) as checked:
        asyncio.run(check_live(parse_config(unowned)))
    message = str(checked.value)
    assert message.startswith("mappings[users_from_customers]: target_filter is required")
    assert "public.users holds rows this mapping's source does not produce (key [1001]" in message


# --- configuration errors ---------------------------------------------------------------------


def test_two_mappings_into_one_target_need_a_target_filter_offline() -> None:
    migration = pos.migration("merge-sales")
    del migration["mappings"][1]["target_filter"]
    with pytest.raises(ConfigError) as refused:
        parse_config(migration)
    assert refused.value.path == "mappings[1].target_filter"
    assert "web_sales writes v2.sales with pos_sales" in refused.value.reason


async def test_two_mappings_into_one_target_need_a_target_filter_as_resolved(db) -> None:
    pos.load_schema(db)
    migration = pos.migration("merge-sales")
    migration["mappings"][1]["target"] = "sales"  # v2.sales, through the search_path
    del migration["mappings"][1]["target_filter"]
    data = config_data(db.dsn, migration["mappings"], search_path=["public", "v2"])
    with pytest.raises(MappingValidationError) as refused:
        await prepare(data)
    assert str(refused.value).startswith(
        "mappings[web_sales]: target_filter is required: v2.sales is also written by pos_sales"
    )


def test_a_target_filter_that_is_not_an_expression_is_refused_offline() -> None:
    migration = pos.migration("merge-sales")
    migration["mappings"][0]["target_filter"] = "channel = 'pos' OR"
    with pytest.raises(MappingValidationError, match=r"mappings\[pos_sales\]: target_filter: "):
        compile_all(parse_config(migration))


async def test_a_target_filter_naming_no_target_column_is_refused(db) -> None:
    pos.load_schema(db)
    migration = pos.migration("merge-sales")
    migration["mappings"][0]["target_filter"] = "chanel = 'pos'"
    with pytest.raises(MappingValidationError, match=r"target_filter: column .*chanel"):
        await prepare(config_data(db.dsn, migration["mappings"]))
