"""The reconciler finds seeded divergence of each class exactly, in one database and across two;
equivalent encodings, tolerances, redaction, tenants and every kind of key."""

from __future__ import annotations

import json

import pytest
from prometheus_client import REGISTRY
from test_compare_support import config_data, findings, keys_of, prepare, reconcile

from compare.commands import reconcile_command
from compare.reconciler import PassOptions, reconcile_mapping
from compare.samedb import SameDatabaseDiffer

_SOURCE = """
CREATE TABLE accounts (
    id int PRIMARY KEY, tenant text NOT NULL, role text NOT NULL, name text, note text,
    code text, tag text, amount numeric, ratio float8, doc jsonb, card text, seen timestamptz
);
INSERT INTO accounts
SELECT g, 't' || (g % 3), CASE WHEN g % 25 = 0 THEN 'admin' ELSE 'customer' END,
       'name ' || g, 'note ' || g, 'c' || (g % 7), 'tag', g * 1.5, g / 4.0,
       jsonb_build_object('a', g, 'b', 'x'),
       '4111-1111-1111-' || lpad(g::text, 4, '0'),
       '2024-01-01 10:00:00.123456+00'::timestamptz + g * interval '1 minute'
FROM generate_series(1, 120) AS g;
-- values whose target spelling differs but means the same
UPDATE accounts SET code = 'ab  ' WHERE id = 1;
UPDATE accounts SET amount = 1.5 WHERE id = 2;
UPDATE accounts SET ratio = '-0'::float8 WHERE id = 3;
UPDATE accounts SET tag = NULL WHERE id = 5;
-- values the target will disagree with
UPDATE accounts SET note = '' WHERE id = 9;
UPDATE accounts SET amount = 16.504 WHERE id = 11;
"""

_TARGET = """
CREATE SCHEMA v2;
CREATE TABLE v2.accounts (
    id int PRIMARY KEY, tenant text NOT NULL, name text, note text, code char(5), tag text,
    amount numeric, ratio float8, doc jsonb, card text, seen timestamptz
);
INSERT INTO v2.accounts
SELECT id, tenant, name, note, code, tag, amount, ratio, doc, card, seen
FROM accounts WHERE role = 'customer';
UPDATE v2.accounts SET code = 'ab' WHERE id = 1;
UPDATE v2.accounts SET amount = 1.500 WHERE id = 2;
UPDATE v2.accounts SET ratio = 0.0 WHERE id = 3;
UPDATE v2.accounts SET doc = '{"b": "x",   "a": 4}' WHERE id = 4;
-- missing
DELETE FROM v2.accounts WHERE id IN (6, 7);
-- extra: a key with no source row, and a row the filter excludes
INSERT INTO v2.accounts (id, tenant, name) VALUES (1001, 't2', 'ghost'), (25, 't1', 'admin 25');
-- changed
UPDATE v2.accounts SET name = upper(name) WHERE id = 8;
UPDATE v2.accounts SET note = NULL WHERE id = 9;
UPDATE v2.accounts SET amount = 16.50 WHERE id = 11;
UPDATE v2.accounts SET tag = 'tag ' WHERE id = 12;
UPDATE v2.accounts SET card = '5500-0000-0000-0013' WHERE id = 13;
UPDATE v2.accounts SET seen = date_trunc('milliseconds', seen) WHERE id = 14;
"""

CHANGED = {
    "[8]": ["name"],
    "[9]": ["note"],
    "[11]": ["amount"],
    "[12]": ["tag"],
    "[13]": ["card"],
    "[14]": ["seen"],
}


def _mapping(**extra: object) -> dict[str, object]:
    columns = [
        "id",
        "tenant",
        "name",
        "note",
        "code",
        "tag",
        "amount",
        "ratio",
        "doc",
        "card",
        "seen",
    ]
    return {
        "name": "accounts",
        "source": "public.accounts",
        "target": "v2.accounts",
        "key": ["id"],
        "filter": "role = 'customer'",
        "columns": {c: c for c in columns},
        "tenant_column": "tenant",
        "compare": {"reveal_columns": ["name", "tenant"]},
        **extra,
    }


def _metric(name: str, **labels: str) -> float:
    if "cls" in labels:
        labels["class"] = labels.pop("cls")
    return REGISTRY.get_sample_value(name, {"mapping": "accounts", **labels}) or 0.0


@pytest.fixture(params=["same_database", "cross_database"])
def seeded(request, db, pg):
    """The seeded pair: target beside the source, or in a second database."""
    db.sql(_SOURCE)
    if request.param == "same_database":
        db.sql(_TARGET)
        yield db.dsn, {}
        return
    other = pg.create_database()
    try:
        # the same deterministic source rows make the target's starting point there
        other.sql(_SOURCE + _TARGET + "DROP TABLE accounts;")
        yield db.dsn, {"target_dsn": pg.dsn(other.name, password="")}
    finally:
        other.drop()


async def test_each_class_is_found_exactly_and_equivalent_encodings_are_not(seeded):
    dsn, extra = seeded
    config, mappings = await prepare(config_data(dsn, [_mapping(**extra)]))
    compared_before = _metric("dualwrite_reconcile_rows_compared_total")
    result = await reconcile(config, mappings["accounts"])
    assert result.tally.counts == {"missing": 2, "extra": 2, "changed": 6}
    assert _metric("dualwrite_reconcile_rows_compared_total") - compared_before == 118
    assert _metric("dualwrite_last_pass_divergent_rows", cls="changed") == 6
    assert _metric("dualwrite_reconcile_pending_keys") == 0
    assert result.tally.pending == 0
    assert result.tally.compared == 120 - 4 + 2  # source rows kept by the filter, plus extras
    rows = await findings(dsn, result.run_id)
    assert keys_of(rows, "missing") == {"[6]", "[7]"}
    assert keys_of(rows, "extra") == {"[25]", "[1001]"}
    assert {r["key"]: r["columns"] for r in rows if r["class"] == "changed"} == CHANGED
    assert result.tally.by_column == {c[0]: 1 for c in CHANGED.values()}


@pytest.mark.parametrize("workers", [2, 5])
async def test_sessions_side_by_side_find_exactly_what_one_session_finds(db, workers, monkeypatch):
    """reconcile.workers: chunk bounds walked in order, chunks compared on several sessions;
    the findings, counts and checkpoints are those of a single-session pass."""
    db.sql(_SOURCE + _TARGET)
    one_config, one = await prepare(
        config_data(db.dsn, [_mapping()], reconcile={"chunk_rows": 10, "workers": 1})
    )
    single = await reconcile(one_config, one["accounts"])
    config, mappings = await prepare(
        config_data(db.dsn, [_mapping()], reconcile={"chunk_rows": 10, "workers": workers})
    )
    used: set[int] = set()
    between = SameDatabaseDiffer._between

    async def counting(self, reader, *args):
        used.add(id(reader))
        return await between(self, reader, *args)

    monkeypatch.setattr(SameDatabaseDiffer, "_between", counting)
    several = await reconcile(config, mappings["accounts"])
    assert len(used) == workers  # every session compared chunks
    assert several.tally.counts == single.tally.counts == {"missing": 2, "extra": 2, "changed": 6}
    assert several.tally.compared == single.tally.compared
    rows = await findings(db.dsn, several.run_id)
    assert {r["key"]: r["columns"] for r in rows if r["class"] == "changed"} == CHANGED
    assert keys_of(rows, "missing") == {"[6]", "[7]"}
    assert keys_of(rows, "extra") == {"[25]", "[1001]"}
    checkpoint = db.scalar(
        "SELECT checkpoint FROM dualwrite.reconcile_runs WHERE id = %s", several.run_id
    )
    assert checkpoint == db.scalar(
        "SELECT checkpoint FROM dualwrite.reconcile_runs WHERE id = %s", single.run_id
    )


async def test_tenant_breakdown_and_a_single_tenant_pass(seeded):
    dsn, extra = seeded
    config, mappings = await prepare(config_data(dsn, [_mapping(**extra)]))
    result = await reconcile(config, mappings["accounts"])
    assert result.tally.by_tenant == {
        "t0": {"missing": 1, "extra": 0, "changed": 2},
        "t1": {"missing": 1, "extra": 1, "changed": 1},
        "t2": {"missing": 0, "extra": 1, "changed": 3},
    }
    only = await reconcile(config, mappings["accounts"], tenant="t1")
    assert only.tally.counts == {"missing": 1, "extra": 1, "changed": 1}
    assert set(only.tally.by_tenant) == {"t1"}


async def test_findings_show_only_reveal_columns(seeded):
    dsn, extra = seeded
    config, mappings = await prepare(config_data(dsn, [_mapping(**extra)]))
    result = await reconcile(config, mappings["accounts"])
    rows = await findings(dsn, result.run_id)
    card = next(r for r in rows if r["key"] == "[13]")
    expected, actual = json.loads(card["expected"]), json.loads(card["actual"])
    assert expected["card"] == actual["card"] == "<redacted>"
    assert expected["note"] == "<redacted>"
    assert (expected["name"], expected["tenant"]) == ("name 13", "t1")
    renamed = next(r for r in rows if r["key"] == "[8]")
    assert json.loads(renamed["actual"])["name"] == "NAME 8"
    everything = json.dumps(rows)
    assert "4111-1111" not in everything
    assert "5500-0000" not in everything
    assert "note 9" not in everything


@pytest.mark.parametrize(
    ("rule", "forgiven"),
    [
        ({"column": "note", "null_equals_empty": True}, "[9]"),
        ({"column": "amount", "numeric_scale": 2}, "[11]"),
        ({"column": "tag", "ignore_trailing_spaces": True}, "[12]"),
        ({"column": "name", "case_insensitive": True}, "[8]"),
        ({"column": "seen", "timestamp_precision": "millisecond"}, "[14]"),
    ],
    ids=lambda v: next(k for k in v if k != "column") if isinstance(v, dict) else v,
)
async def test_each_tolerance_forgives_its_difference_only(seeded, rule, forgiven):
    dsn, extra = seeded
    mapping = _mapping(**extra, compare={"tolerances": [rule], "reveal_columns": []})
    config, mappings = await prepare(config_data(dsn, [mapping]))
    result = await reconcile(config, mappings["accounts"])
    rows = await findings(dsn, result.run_id)
    changed = {r["key"] for r in rows if r["class"] == "changed"}
    assert changed == set(CHANGED) - {forgiven}
    assert result.tally.counts["missing"] == 2
    assert result.tally.counts["extra"] == 2


# --- keys ---------------------------------------------------------------------------------------

_KEY_TYPES = {
    "integer": ("a int", "a", "g"),
    "text": ("a text", "a", "'k' || lpad(g::text, 3, '0')"),
    "uuid": ("a uuid", "a", "md5(g::text)::uuid"),
    "composite": ("a int, b text", "a, b", "g % 7, 'x' || g"),
}


@pytest.mark.parametrize("kind", list(_KEY_TYPES))
async def test_keys_of_every_kind_across_chunk_boundaries(db, kind):
    columns, key, values = _KEY_TYPES[kind]
    key_list = [k.strip() for k in key.split(",")]
    db.sql(
        f"CREATE TABLE s ({columns}, val text, PRIMARY KEY ({key}));"
        f"CREATE TABLE t ({columns}, val text, PRIMARY KEY ({key}));"
        f"INSERT INTO s SELECT {values}, 'v' || g FROM generate_series(1, 95) AS g;"
        f"INSERT INTO t SELECT * FROM s;"
    )
    ordered = [r[0] for r in db.sql(f"SELECT jsonb_build_array({key})::text FROM s ORDER BY {key}")]
    missing = {ordered[0], ordered[10], ordered[57]}
    changed = {ordered[9], ordered[20], ordered[-1]}
    for k in missing:
        db.sql(f"DELETE FROM t WHERE jsonb_build_array({key}) = %s::jsonb", k)
    for k in changed:
        db.sql(f"UPDATE t SET val = 'changed' WHERE jsonb_build_array({key}) = %s::jsonb", k)
    db.sql(f"INSERT INTO t SELECT {values}, 'extra' FROM generate_series(200, 203) AS g")
    extra = {
        r[0] for r in db.sql(f"SELECT jsonb_build_array({key})::text FROM t WHERE val = 'extra'")
    }
    mapping = {
        "name": "keyed",
        "source": "s",
        "target": "t",
        "key": key_list,
        "columns": {c: c for c in [*key_list, "val"]},
    }
    config, mappings = await prepare(config_data(db.dsn, [mapping]))
    result = await reconcile(config, mappings["keyed"])
    rows = await findings(db.dsn, result.run_id)
    assert keys_of(rows, "missing") == missing
    assert keys_of(rows, "extra") == extra
    assert keys_of(rows, "changed") == changed
    assert result.tally.compared == 95 + 4  # every source key, plus the extras
    # repair (sync_keys: upsert, and delete where no source row is expected) makes t equal s
    assert await reconcile_command(config, repair=True, say=lambda _: None) == 0
    assert db.sql(f"SELECT {key}, val FROM t EXCEPT SELECT {key}, val FROM s") == []
    assert db.sql(f"SELECT {key}, val FROM s EXCEPT SELECT {key}, val FROM t") == []


async def test_a_chunk_that_fails_on_one_of_several_sessions_fails_the_pass_cleanly(db):
    """An error in one chunk (here a mapping expression dividing by zero for one row) ends a
    pass with several sessions as 'failed', with the error recorded, and leaves no session
    behind."""
    db.sql(
        "CREATE TABLE s (id int PRIMARY KEY, qty int); CREATE TABLE t (id int PRIMARY KEY, r int);"
        "INSERT INTO s SELECT g, g FROM generate_series(1, 200) AS g;"
        "INSERT INTO t SELECT g, 1000 / (g - 150) FROM generate_series(1, 200) AS g WHERE g <> 150"
    )
    mapping = {
        "name": "failing",
        "source": "s",
        "target": "t",
        "key": ["id"],
        "columns": {"id": "id", "r": "1000 / (qty - 150)"},
    }
    config, mappings = await prepare(
        config_data(db.dsn, [mapping], reconcile={"chunk_rows": 10, "workers": 3})
    )
    result = await reconcile_mapping(config, mappings["failing"], PassOptions())
    assert result.status == "failed"
    assert "division by zero" in (result.error or "")
    assert db.sql("SELECT status FROM dualwrite.reconcile_runs WHERE id = %s", result.run_id) == [
        ("failed",)
    ]
    assert (
        db.scalar(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'dualwrite-reconcile' AND datname = current_database()"
        )
        == 0
    )
