"""The shadow's parts that need no proxy: which reads are replayed and how they are rewritten
(pglast), binary parameters turned back into the text PostgreSQL itself prints, the Bind
codec, the A/A verdicts, and the config section."""

from __future__ import annotations

import multiprocessing

import pytest
from support import Database

from core import metrics
from core.config import parse_config
from core.errors import ConfigError
from dualwrite.service import shadow_tenant_columns
from proxy.shadow.compare import (
    MATCH,
    MISMATCH,
    NOISE,
    REDACTED,
    UNSAFE,
    Answer,
    judge,
    tenants_of,
)
from proxy.shadow.params import UnsupportedParameter, literals
from proxy.shadow.plan import Planner
from proxy.shadow.tap import ShadowTap
from proxy.wire import messages as m

VIEWS = {"public.users": "v2compat.users", "public.orders": "v2compat.orders"}


def planner(**kwargs: object) -> Planner:
    return Planner(VIEWS, ["public"], other_server=False, **kwargs)  # type: ignore[arg-type]


def test_each_old_relation_is_replaced_by_its_view_keeping_its_name_as_alias() -> None:
    plan = planner().plan(
        "SELECT users.id, o.total FROM users JOIN public.orders o ON o.user_id = users.id "
        "WHERE users.id = $1"
    )
    assert plan is not None
    assert plan.rewritten == (
        "SELECT users.id, o.total FROM v2compat.users AS users "
        "INNER JOIN v2compat.orders AS o ON o.user_id = users.id WHERE users.id = $1"
    )
    assert plan.original.startswith("SELECT users.id")


def test_subqueries_and_set_operations_are_rewritten_everywhere() -> None:
    plan = planner().plan(
        "SELECT id FROM (SELECT id FROM users) s UNION SELECT user_id FROM orders "
        "WHERE EXISTS (SELECT 1 FROM users u WHERE u.id = orders.user_id)"
    )
    assert plan is not None
    assert plan.rewritten is not None
    assert plan.rewritten.count("v2compat.users") == 2
    assert "v2compat.orders AS orders" in plan.rewritten


def test_a_with_query_of_the_same_name_is_not_the_relation() -> None:
    assert planner().plan("WITH users AS (SELECT 1 AS id) SELECT id FROM users") is None
    plan = planner().plan("WITH x AS (SELECT 1) SELECT * FROM users, x")
    assert plan is not None
    assert plan.rewritten == "WITH x AS (SELECT 1) SELECT * FROM v2compat.users AS users, x"


def test_unqualified_names_resolve_through_the_configured_search_path() -> None:
    other = Planner({"app.users": "v2compat.users"}, ["app", "public"], other_server=False)
    assert other.plan("SELECT * FROM users") is not None
    assert other.plan("SELECT * FROM public.users") is None
    assert planner().plan("SELECT * FROM app.users") is None


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE users SET name = 'x'",
        "INSERT INTO users (id) VALUES (1)",
        "SELECT 1; SELECT * FROM users",
        "SELECT * FROM products",
        "SELEC * FROM users",
    ],
)
def test_only_single_selects_of_a_viewed_relation_are_eligible(sql: str) -> None:
    assert planner().plan(sql) is None


def test_other_server_mode_replays_any_select_unchanged() -> None:
    plan = Planner({}, ["public"], other_server=True).plan("SELECT * FROM products WHERE id = 1")
    assert plan is not None
    assert plan.rewritten is None
    assert Planner({}, ["public"], other_server=True).plan("DELETE FROM products") is None


def test_shape_order_and_determinism() -> None:
    p = planner()
    one = p.plan("SELECT * FROM users WHERE name = 'alice' ORDER BY id LIMIT 5")
    two = p.plan("SELECT * FROM users WHERE name = 'bob' ORDER BY id LIMIT 9")
    assert one is not None
    assert two is not None
    assert one.fingerprint == two.fingerprint
    assert "alice" not in one.normalized
    assert one.ordered
    assert one.deterministic
    unordered = p.plan("SELECT * FROM users LIMIT 5")
    assert unordered is not None
    assert not unordered.ordered
    assert not unordered.deterministic


def test_bind_parameters_text_binary_and_null() -> None:
    body = (
        b"portal\x00stmt\x00"
        + b"\x00\x03\x00\x00\x00\x01\x00\x00"
        + b"\x00\x03"
        + b"\x00\x00\x00\x02"
        + b"42"
        + b"\x00\x00\x00\x04\x00\x00\x00\x07"
        + b"\xff\xff\xff\xff"
        + b"\x00\x00"
    )
    formats, values = m.bind_parameters(body)
    assert formats == (0, 1, 0)
    assert values == (b"42", b"\x00\x00\x00\x07", None)
    # one format code for all
    one = b"\x00\x00" + b"\x00\x01\x00\x01" + b"\x00\x01" + b"\x00\x00\x00\x01\x01" + b"\x00\x00"
    assert m.bind_parameters(one) == ((1,), (b"\x01",))


BINARY_CASES = [
    ("42::smallint", "smallint"),
    ("-7::integer", "integer"),
    ("9007199254740993::bigint", "bigint"),
    ("1.5::real", "real"),
    ("-2.25::double precision", "double precision"),
    ("true", "boolean"),
    ("'it''s ünïcode'::text", "text"),
    ("'abc'::varchar", "character varying"),
    ("'\\x00ff10'::bytea", "bytea"),
    ("'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid", "uuid"),
    ("'2024-02-29'::date", "date"),
    ("'1999-12-31 23:59:59.123456'::timestamp", "timestamp without time zone"),
    ("'2024-05-06 07:08:09.5+00'::timestamptz", "timestamp with time zone"),
    ("12345678901234567890.000123::numeric", "numeric"),
    ("-0.05::numeric", "numeric"),
    ("0::numeric", "numeric"),
    ("'{\"a\": [1, 2]}'::jsonb", "jsonb"),
]


def test_binary_parameters_mean_what_postgresql_reads_from_them(db: Database) -> None:
    """Each value's binary form (as the server sends it) turned into a literal that the
    server reads back as the same value."""
    with db.connect() as conn:
        for expression, kind in BINARY_CASES:
            cursor = conn.cursor(binary=True)
            cursor.execute(f"SELECT ({expression})")
            pgresult = cursor.pgresult
            assert pgresult is not None
            raw = pgresult.get_value(0, 0)
            assert raw is not None
            (literal,) = literals([1], [bytes(raw)], [kind], "utf-8")
            same = conn.execute(
                f"SELECT {literal}::{kind} IS NOT DISTINCT FROM ({expression})::{kind}"
            ).fetchone()
            assert same == (True,), (expression, literal)


def test_text_parameters_pass_as_sent_and_unknown_binary_types_are_refused() -> None:
    assert literals([0, 0], [b"O'Brien", None], [], "utf-8") == ["'O''Brien'", "NULL"]
    with pytest.raises(UnsupportedParameter):
        literals([1], [b"\x00\x01"], ["point"], "utf-8")


def _answer(*rows: tuple[object, ...], state: str | None = None) -> Answer:
    return Answer(columns=(("id", "int8"), ("v", "text")), rows=rows, sqlstate=state)


def test_verdicts() -> None:
    p = planner()
    plan = p.plan("SELECT id, v FROM users")
    ordered = p.plan("SELECT id, v FROM users ORDER BY id")
    assert plan is not None
    assert ordered is not None
    a, b = _answer((1, "x"), (2, "y")), _answer((2, "y"), (1, "x"))
    none = frozenset[str]()
    assert judge(plan, a, b, a, none).outcome == MATCH  # a multiset without ORDER BY
    assert judge(ordered, a, b, a, none).outcome == MISMATCH
    lost = judge(plan, a, _answer((1, "x")), a, frozenset({"id"}))
    assert lost.outcome == MISMATCH
    assert lost.diff is not None
    assert lost.diff["only_old"] == [{"id": 2, "v": REDACTED}]
    assert judge(plan, a, _answer((1, "z")), _answer((1, "q")), none).outcome == NOISE
    refused = _answer(state="25006")
    assert judge(plan, refused, refused, refused, none).outcome == UNSAFE
    typed = Answer(columns=(("id", "int4"), ("v", "text")), rows=a.rows)
    changed = judge(plan, a, typed, a, none)
    assert changed.outcome == MISMATCH
    assert changed.diff == {
        "old_columns": ["id int8", "v text"],
        "new_columns": ["id int4", "v text"],
    }


def test_config_section_is_validated() -> None:
    config = parse_config(
        {"shadow": {"sample_rate": 0.1, "views": {"public.users": "v2compat.users"}}}
    )
    assert config.shadow.enabled
    assert config.shadow.max_replays_per_second == 5.0
    assert not parse_config({}).shadow.enabled
    for bad, where in [
        ({"sample_rate": 0.5}, "shadow"),
        ({"sample_rate": 2}, "shadow.sample_rate"),
        ({"views": {"users": "v2.users"}}, "shadow.views"),
        ({"dsn": "postgresql://u:secret@h/db"}, "shadow.dsn"),
        ({"queue_size": 3}, "shadow.queue_size"),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_config({"shadow": bad})
        assert caught.value.path == where, bad


def test_volatile_functions_make_a_statement_undecidable() -> None:
    p = planner()
    picked = p.plan("SELECT id FROM users WHERE active ORDER BY random() LIMIT 1")
    stamped = p.plan("SELECT clock_timestamp(), id FROM users")
    plain = p.plan("SELECT now(), id FROM users ORDER BY id")
    assert picked is not None
    assert stamped is not None
    assert plain is not None
    assert not picked.deterministic
    assert not stamped.deterministic
    assert plain.deterministic  # now() is the transaction's: the same in all three runs


TENANT = frozenset({"tenant"})


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT count(*) FROM users WHERE tenant = 3 AND id > 2", ("3", None)),
        ("SELECT count(*) FROM users u WHERE u.tenant = $2::int AND id = $1", (None, 2)),
        ("SELECT count(*) FROM users WHERE 'acme' = tenant", ("acme", None)),
        # not a top-level conjunct: the statement may read several tenants
        ("SELECT count(*) FROM users WHERE tenant = 1 OR id = 2", (None, None)),
        ("SELECT count(*) FROM users WHERE tenant > 1", (None, None)),
        ("SELECT count(*) FROM users WHERE id = 1", (None, None)),
    ],
)
def test_the_tenant_a_where_names_is_found_in_the_tree(
    sql: str, named: tuple[str | None, int | None]
) -> None:
    plan = planner(tenant_columns=TENANT).plan(sql)
    assert plan is not None
    assert (plan.tenant, plan.tenant_parameter) == named
    assert planner().plan(sql).tenant is None  # type: ignore[union-attr] # no tenant columns


def test_a_replay_is_attributed_to_the_tenants_of_its_differing_rows() -> None:
    columns = (("id", "int8"), ("tenant", "int4"), ("amount", "numeric"))
    old = Answer(columns, ((1, 10, 5), (2, 20, 6), (3, 30, 7)))
    lost_one = Answer(columns, ((1, 10, 5), (3, 30, 7)))
    changed = Answer(columns, ((1, 10, 5), (2, 20, 6), (3, 30, 8)))
    assert tenants_of(MISMATCH, old, lost_one, TENANT, None, 100) == ("20",)
    assert set(tenants_of(MISMATCH, old, changed, TENANT, None, 100)) == {"30"}
    # other outcomes: every tenant answered for; a bound on how many
    assert tenants_of(MATCH, old, old, TENANT, None, 100) == ("10", "20", "30")
    assert tenants_of(MATCH, old, old, TENANT, None, 2) == ("10", "20")
    # no tenant column in the result: the tenant the WHERE names, else none
    counted = Answer((("count", "int8"),), ((3,),))
    assert tenants_of(MISMATCH, counted, Answer((("count", "int8"),), ((2,),)), TENANT, "7", 9) == (
        "7",
    )
    assert tenants_of(MATCH, counted, counted, TENANT, None, 100) == ()
    # a failed new side: all the tenants the original answered for
    failed = Answer(sqlstate="42703")
    assert tenants_of(MISMATCH, old, failed, TENANT, None, 100) == ("10", "20", "30")


def test_tenant_columns_are_the_mappings_and_their_plain_source_columns() -> None:
    config = parse_config(
        {
            "mappings": [
                {
                    "name": "a",
                    "source": "public.users",
                    "target": "v2.a",
                    "key": ["id"],
                    "columns": {"id": "id", "org": "Org_Id"},
                    "tenant_column": "org",
                },
                {
                    "name": "b",
                    "source": "public.items",
                    "target": "v2.b",
                    "key": ["id"],
                    "columns": {"id": "id", "shop": '"Shop ""No"""'},
                    "tenant_column": "shop",
                },
                {
                    "name": "c",
                    "source": "public.sales",
                    "target": "v2.c",
                    "key": ["id"],
                    "columns": {"id": "id", "region": "lower(region_code)"},
                    "tenant_column": "region",
                },
            ]
        }
    )
    # unquoted names fold to lower case; a quoted one keeps its case; an expression has none
    assert shadow_tenant_columns(config) == {"org", "org_id", "shop", 'Shop "No"', "region"}


def test_the_tap_puts_without_waiting_and_reads_a_bind_only_with_room() -> None:
    """Sampled reads go on the bounded queue to the worker; when it is full a sampled Bind is
    dropped (and counted) before any of its frames is read, and nothing ever waits."""
    config = parse_config(
        {"shadow": {"sample_rate": 1.0, "queue": 1, "views": {"public.users": "v2.users"}}}
    ).shadow
    captures = multiprocessing.get_context("spawn").Queue(1)
    try:
        tap = ShadowTap(config, captures)
        conn = tap.connection()
        parse = m.build_parse(b"s1", b"SELECT * FROM users WHERE id = $1", [])
        conn.parse(m.parse_parse(parse[5:]))
        dropped = metrics.HOT.shadow_statements["dropped"]
        conn.query(b"SELECT count(*) FROM users")  # eligible: queued
        assert tap.depth() == 1
        # full now: a sampled read of frames that are not even valid is dropped unread
        conn.binds(b"B\x00\x00\x00\x04garbage", bytes([m.BIND]), [0])
        conn.query(b"SELECT id FROM users")
        assert metrics.HOT.shadow_statements["dropped"] == dropped + 2
        assert captures.get(timeout=5).sql == b"SELECT count(*) FROM users"
    finally:
        captures.close()
        captures.join_thread()
