"""A rewritten statement is invisible to the application: the same statements, sent to a plain
relay (a database without mappings) and to a mirroring sidecar (the same schema with the
config/*.yaml mappings), get the same replies: message for message on the wire, and as
psycopg and asyncpg present them (tags, rows, column names and types, source tables, row
counts, errors with SQLSTATE, message and position).

The two databases start identical (same schema, same rows, constant column defaults instead of
now()), so ids and values agree; only table OIDs differ and are compared by table name. After
the statements, the source tables of both databases are equal, the plain database's v2 tables
are empty and the mirrored database's targets equal the mapping applied to its source.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest
from support import pos
from support.postgres import Database
from support.sidecar import InProcessSidecar
from support.transparency import Message, RawClient, frame

#: the column defaults that would differ between two runs (now()), pinned in both databases
PINNED_DEFAULTS = """
ALTER TABLE tenants ALTER created_at SET DEFAULT '2024-01-02 03:04:05+00';
UPDATE tenants SET created_at = DEFAULT;
ALTER TABLE users ALTER created_at SET DEFAULT '2024-01-02 03:04:05+00',
                  ALTER updated_at SET DEFAULT '2024-01-02 03:04:05+00';
ALTER TABLE inventory ALTER updated_at SET DEFAULT '2024-01-02 03:04:05+00';
ALTER TABLE transactions ALTER created_at SET DEFAULT '2024-01-02 03:04:05+00';
ALTER TABLE audit_log ALTER at SET DEFAULT '2024-01-02 03:04:05+00',
                      ALTER tenant_id SET DEFAULT 1,
                      ALTER action SET DEFAULT 'noop',
                      ALTER entity SET DEFAULT 'none';
"""

#: the same starting rows in both databases (written directly, before the proxy is involved)
SEED = """
INSERT INTO users (tenant_id, email, first_name, last_name, role, phone) VALUES
    (1, 'ana@example.com', 'Ana', 'Silva', 'customer', '+1-555-0001'),
    (1, 'bo@example.com', 'Bo', 'Chen', 'employee', NULL),
    (2, 'cy@example.com', 'Cy', 'Diaz', 'manager', '+1-555-0003'),
    (2, 'di@example.com', 'Di', 'Evans', 'customer', NULL);
INSERT INTO products (tenant_id, sku, name, price, cost, category) VALUES
    (1, 'SKU-1', 'Coffee', 3.50, 1.20, 'drink'),
    (1, 'SKU-2', 'Bagel', 2.25, NULL, 'food'),
    (2, 'SKU-3', 'Mug', 12.00, 4.00, 'home');
INSERT INTO inventory (product_id, store_code, tenant_id, on_hand, reserved) VALUES
    (1, 'north', 1, 10, 2), (1, 'south', 1, 5, 0), (2, 'north', 1, 7, 9), (3, 'east', 2, 1, 0);
INSERT INTO transactions (tenant_id, user_id, product_id, quantity, unit_price, discount) VALUES
    (1, 1, 1, 2, 3.50, 0), (1, 1, 2, 1, 2.25, 0.25), (2, 4, 3, 1, 12.00, 1);
INSERT INTO audit_log (tenant_id, actor_id, action, entity, entity_id, details) VALUES
    (1, 2, 'sale', 'transaction', 1, '{"quantity": 2}');
"""

SOURCE_TABLES = ("tenants", "users", "products", "inventory", "transactions", "audit_log")
TARGET_TABLES = (
    "v2.customers",
    "v2.employees",
    "v2.products",
    "v2.transactions",
    "v2.stock_levels",
    "v2.audit_events",
)


@dataclass
class Side:
    """One of the two databases and the proxy in front of it."""

    label: str
    db: Database
    proxy: InProcessSidecar
    _names: dict[int, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        return self.proxy.dsn(self.db.name)

    def table(self, oid: int) -> str:
        """A table OID as its name (OIDs differ between the databases, names do not)."""
        if oid == 0:
            return "-"
        if oid not in self._names:
            self._names[oid] = str(self.db.scalar("SELECT %s::oid::regclass::text", oid))
        return self._names[oid]

    def raw(self) -> RawClient:
        client = RawClient(self.proxy.host, self.proxy.port)
        client.startup(self.db.server.user, self.db.name)
        return client


@dataclass
class Twin:
    plain: Side
    mapped: Side
    #: dualwrite_statements_rewritten_total per mapping when the twin was made
    rewritten_before: dict[str, float] = field(default_factory=dict)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.plain, self.mapped

    def observe(self, observe: Callable[[Side], Any]) -> None:
        """Run ``observe`` on both sides (plain first) and require the same observations."""
        plain = observe(self.plain)
        mapped = observe(self.mapped)
        assert mapped == plain

    def check_databases(self, *, mirrored: tuple[str, ...]) -> None:
        """Source tables equal; plain targets empty; mapped targets exact after draining; and
        statements of each ``mirrored`` mapping were really rewritten."""
        for table in SOURCE_TABLES:
            query = f"SELECT * FROM {table} ORDER BY 1, 2"
            assert self.mapped.db.sql(query) == self.plain.db.sql(query), table
        for table in TARGET_TABLES:
            assert self.plain.db.scalar(f"SELECT count(*) FROM {table}") == 0
        pos.drain(self.mapped.proxy)
        assert pos.divergence(self.mapped.db) == {}
        rewritten = pos.counter_delta(self.rewritten_before, "dualwrite_statements_rewritten_total")
        assert set(mirrored) <= set(rewritten), rewritten


def _prepare(db: Database) -> None:
    pos.load_schema(db)
    db.sql(PINNED_DEFAULTS + SEED)
    # Same plans on both sides: fresh statistics, and no autovacuum analysing one side only.
    for table in SOURCE_TABLES:
        db.sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false); ANALYZE {table}")


@pytest.fixture
def twin(pg, db, sidecar) -> Iterator[Twin]:
    plain_db = pg.create_database()
    try:
        migration = pos.migration()
        migration.pop("app_role")  # the statements run as the test's own user
        _prepare(plain_db)
        _prepare(db)
        pos.run_setup(db, migration)
        pos.backfill(db)
        mapped = sidecar({**migration, "applier": {"poll_interval_seconds": 0.05}})
        plain = sidecar()
        yield Twin(
            Side("plain", plain_db, plain),
            Side("mapped", db, mapped),
            pos.counter_by_mapping("dualwrite_statements_rewritten_total"),
        )
    finally:
        plain_db.drop()


# --- the wire, message by message ---------------------------------------------------------------


def parse(name: bytes, sql: str, types: tuple[int, ...] = ()) -> bytes:
    body = name + b"\0" + sql.encode() + b"\0" + struct.pack("!h", len(types))
    return frame(b"P", body + b"".join(struct.pack("!I", t) for t in types))


def bind(
    portal: bytes,
    statement: bytes,
    params: tuple[bytes | None, ...] = (),
    result_formats: tuple[int, ...] = (),
    param_formats: tuple[int, ...] = (),
) -> bytes:
    body = portal + b"\0" + statement + b"\0"
    body += struct.pack("!h", len(param_formats)) + b"".join(
        struct.pack("!h", f) for f in param_formats
    )
    body += struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += struct.pack("!h", len(result_formats))
    return frame(b"B", body + b"".join(struct.pack("!h", f) for f in result_formats))


def describe(kind: bytes, name: bytes) -> bytes:
    return frame(b"D", kind + name + b"\0")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return frame(b"E", portal + b"\0" + struct.pack("!i", max_rows))


def close(kind: bytes, name: bytes) -> bytes:
    return frame(b"C", kind + name + b"\0")


def query(sql: str) -> bytes:
    return frame(b"Q", sql.encode() + b"\0")


SYNC = frame(b"S")
FLUSH = frame(b"H")

INS_USER = "INSERT INTO users (tenant_id, email, first_name, last_name, role) VALUES "
INT8, TEXT = 20, 25

#: (label, bytes sent, ReadyForQuery messages to wait for). One connection per side runs them
#: in order, so each case starts from the same state on both sides.
WIRE_CASES: list[tuple[str, bytes, int]] = [
    # --- INSERT
    ("insert values", query(INS_USER + "(1, 'eva@x', 'Eva', 'Fox', 'customer')"), 1),
    (
        "insert multi-row returning *",
        query(
            INS_USER + "(1, 'g1@x', 'G', 'One', 'employee'), (2, 'g2@x', 'G', 'Two', 'manager')"
            " RETURNING *"
        ),
        1,
    ),
    (
        "insert select, returning expressions",
        query(
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "SELECT t.id, 'sel' || g || '@x', 'Sel', 'Ect', "
            "CASE WHEN g % 2 = 0 THEN 'customer' ELSE 'manager' END "
            "FROM tenants t CROSS JOIN generate_series(1, 2) AS g ORDER BY t.id, g "
            "RETURNING id, upper(email) AS shout, 1 + 1, role = 'manager' AS boss, NULL::int"
        ),
        1,
    ),
    (
        "insert default values",
        query("INSERT INTO audit_log DEFAULT VALUES RETURNING id, action"),
        1,
    ),
    ("insert default values fails", query("INSERT INTO users DEFAULT VALUES"), 1),
    (
        "on conflict do nothing",
        query(
            "INSERT INTO users (id, tenant_id, email, first_name, last_name, role) "
            "VALUES (1, 1, 'dup@x', 'D', 'Up', 'customer') ON CONFLICT DO NOTHING RETURNING id"
        ),
        1,
    ),
    (
        "on conflict do update",
        query(
            "INSERT INTO users AS u (id, tenant_id, email, first_name, last_name, role, phone) "
            "VALUES (1, 1, 'dup@x', 'D', 'Up', 'customer', '+1-555-7777'), "
            "(2, 1, 'x@x', 'X', 'X', 'employee', '+1-555-8888') "
            "ON CONFLICT (id) DO UPDATE SET phone = excluded.phone, last_name = u.last_name || '!' "
            "RETURNING u.id, u.phone, u.last_name"
        ),
        1,
    ),
    (
        "insert into products (sync mode)",
        query(
            "INSERT INTO products (tenant_id, sku, name, price, cost) VALUES "
            "(1, 'SKU-9', 'Tea', 4.10, 1.00) RETURNING id, price"
        ),
        1,
    ),
    # --- UPDATE
    (
        "update with from",
        query(
            "UPDATE users SET phone = t.name FROM tenants t "
            "WHERE t.id = users.tenant_id AND users.role = 'customer' AND users.id < 4 "
            "RETURNING users.id, t.name, users.*"
        ),
        1,
    ),
    (
        "update with subqueries",
        query(
            "UPDATE transactions SET discount = (SELECT min(p.price) / 10 FROM products p "
            "WHERE p.id = transactions.product_id) "
            "WHERE user_id IN (SELECT id FROM users WHERE role = 'customer')"
        ),
        1,
    ),
    (
        "update moves a user between targets",
        query("UPDATE users SET role = 'manager' WHERE email = 'ana@example.com'"),
        1,
    ),
    (
        "update inventory, composite key",
        query(
            "UPDATE inventory SET reserved = reserved + 1 WHERE store_code = 'north' RETURNING "
            "product_id, store_code, on_hand - reserved AS free"
        ),
        1,
    ),
    # --- DELETE
    (
        "delete using",
        query(
            "DELETE FROM transactions tx USING users u "
            "WHERE u.id = tx.user_id AND u.email = 'di@example.com' RETURNING tx.id, u.email"
        ),
        1,
    ),
    ("delete nothing", query("DELETE FROM audit_log WHERE id < 0"), 1),
    # --- WITH, names
    (
        "with clause before insert",
        query(
            "WITH fresh(email) AS (VALUES ('w1@x'), ('w2@x')) "
            "INSERT INTO users (tenant_id, email, first_name, last_name, role) "
            "SELECT 2, email, 'W', 'X', 'employee' FROM fresh ORDER BY email RETURNING id, email"
        ),
        1,
    ),
    (
        "with clause writing an unmapped table",
        query(
            "WITH touched AS (UPDATE tenants SET name = name WHERE id = 1 RETURNING id) "
            "UPDATE users SET last_name = upper(last_name) "
            "WHERE tenant_id IN (SELECT id FROM touched)"
        ),
        1,
    ),
    (
        "qualified and quoted names",
        query(
            "UPDATE public.users SET phone = NULL WHERE id = 2; "
            'UPDATE "public"."users" SET first_name = first_name || \'\' WHERE id = 3 RETURNING id;'
            " DELETE FROM ONLY public.inventory WHERE store_code = 'east'"
        ),
        1,
    ),
    (
        "several statements in one query",
        query(
            "INSERT INTO products (tenant_id, sku, name, price) VALUES (2, 'SKU-7', 'Jam', 5) "
            "RETURNING id; SELECT count(*) AS n FROM users; "
            "UPDATE inventory SET on_hand = on_hand + 1 WHERE product_id = 1; "
            "DELETE FROM audit_log WHERE action = 'noop' RETURNING id; SELECT 'done' AS status"
        ),
        1,
    ),
    (
        "explicit transaction, rolled back",
        query("BEGIN; " + INS_USER + "(1, 'rb@x', 'R', 'B', 'customer') RETURNING id; ROLLBACK"),
        1,
    ),
    ("empty query", query(""), 1),
    ("comment-only query", query("-- nothing here"), 1),
    # --- errors, positions into the application's own text
    ("unknown column in SET", query("UPDATE users SET phone = nocol WHERE id = 1"), 1),
    (
        "unknown column in RETURNING",
        query(INS_USER + "(1, 'r@x', 'R', 'R', 'customer') RETURNING nocol"),
        1,
    ),
    (
        "bad input syntax",
        query("INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, 'abc', 2)"),
        1,
    ),
    (
        "error after a rewritten statement, non-ASCII before it",
        query(INS_USER + "(1, 'zoë@x', 'Zoë', 'Ünal', 'customer'); SELECT 'ü', nocol FROM users"),
        1,
    ),
    (
        "unique violation",
        query(
            INS_USER.replace("(tenant_id", "(id, tenant_id") + "(1, 1, 'a', 'b', 'c', 'customer')"
        ),
        1,
    ),
    (
        "check violation",
        query("INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, 0, 2)"),
        1,
    ),
    ("foreign key violation", query(INS_USER + "(99, 'fk@x', 'F', 'K', 'customer')"), 1),
    ("syntax error touching a mapped table", query("UPDATE users SET WHERE id = 1"), 1),
    (
        "division by zero at run time",
        query("UPDATE users SET phone = (1 / (id - id))::text WHERE id = 1"),
        1,
    ),
    # --- extended protocol
    (
        "unnamed statement with parameters, describe portal",
        parse(
            b"",
            INS_USER + "($1, $2, $3, $4, $5) RETURNING id, email",
            (INT8, TEXT, TEXT, TEXT, TEXT),
        )
        + bind(b"", b"", (b"2", b"ext@x", b"Ext", b"Ended", b"customer"))
        + describe(b"P", b"")
        + execute()
        + SYNC,
        1,
    ),
    (
        "named statement: describe statement, execute twice, close",
        parse(b"upd", "UPDATE users SET phone = $1 WHERE id = $2", (TEXT, INT8))
        + describe(b"S", b"upd")
        + SYNC
        + bind(b"", b"upd", (b"+1-555-1000", b"1"))
        + execute()
        + bind(b"p2", b"upd", (b"+1-555-2000", b"2"))
        + describe(b"P", b"p2")
        + execute(b"p2")
        + SYNC
        + close(b"S", b"upd")
        + SYNC,
        3,
    ),
    (
        "binary results: one format for all, per column, and a binary count",
        parse(
            b"ret",
            "UPDATE products SET price = price + 1 WHERE id = $1 RETURNING id, price, name",
            (INT8,),
        )
        + bind(b"", b"ret", (b"1",), (1,))
        + execute()
        + bind(b"", b"ret", (b"\x00\x00\x00\x00\x00\x00\x00\x02",), (1, 0, 1), (1,))
        + describe(b"P", b"")
        + execute()
        + parse(
            b"", "DELETE FROM inventory WHERE product_id = $1 AND store_code = 'south'", (INT8,)
        )
        + bind(b"", b"", (b"1",), (1,))
        + execute()
        + SYNC,
        1,
    ),
    (
        "row limits on a returning statement and on a count",
        parse(b"", "UPDATE users SET phone = 'limit' WHERE id <= 4 RETURNING id")
        + bind(b"", b"")
        + execute(b"", 2)
        + execute(b"", 2)
        + execute(b"", 2)
        + parse(b"", "UPDATE users SET phone = 'limit2' WHERE id <= 4")
        + bind(b"", b"")
        + execute(b"", 1)
        + SYNC,
        1,
    ),
    (
        "describe a statement without RETURNING",
        parse(b"nd", "DELETE FROM audit_log WHERE id = $1", (INT8,))
        + describe(b"S", b"nd")
        + bind(b"", b"nd", (b"1",))
        + describe(b"P", b"")
        + execute()
        + SYNC,
        1,
    ),
    (
        "parse error with a position",
        parse(b"", "UPDATE users SET phone = nocol WHERE id = $1")
        + bind(b"", b"")
        + execute()
        + SYNC,
        1,
    ),
    (
        "error mid-pipeline: the rest is skipped until Sync",
        parse(b"", INS_USER + "(1, 'pipe1@x', 'P', 'One', 'customer') RETURNING id")
        + bind(b"", b"")
        + execute()
        + parse(b"", "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, -1, 1)")
        + bind(b"", b"")
        + execute()
        + parse(b"", INS_USER + "(1, 'pipe2@x', 'P', 'Two', 'customer') RETURNING id")
        + bind(b"", b"")
        + execute()
        + SYNC
        + parse(b"", INS_USER + "(1, 'pipe3@x', 'P', 'Three', 'customer') RETURNING id")
        + bind(b"", b"")
        + execute()
        + SYNC,
        2,
    ),
    (
        "pipeline over a transaction with flushes",
        query("BEGIN")
        + parse(b"s", "UPDATE inventory SET on_hand = on_hand - 1 WHERE product_id = $1", (INT8,))
        + bind(b"", b"s", (b"1",))
        + execute()
        + FLUSH
        + bind(b"", b"s", (b"2",))
        + execute()
        + SYNC
        + query("COMMIT"),
        3,
    ),
]


def normalised(side: Side, messages: list[Message]) -> list[tuple[str, Any]]:
    """Messages as comparable values: table OIDs in RowDescription replaced by table names."""
    out: list[tuple[str, Any]] = []
    for message in messages:
        if message.typ == b"T":
            (count,) = struct.unpack_from("!h", message.body)
            pos_, columns = 2, []
            for _ in range(count):
                end = message.body.index(b"\0", pos_)
                name = message.body[pos_:end]
                table, attnum, typ, size, mod, fmt = struct.unpack_from(
                    "!IhIhih", message.body, end + 1
                )
                columns.append((name, side.table(table), attnum, typ, size, mod, fmt))
                pos_ = end + 1 + 18
            out.append(("T", columns))
        elif message.typ in (b"E", b"N"):
            out.append((message.typ.decode(), message.fields()))
        else:
            out.append((message.typ.decode(), message.body))
    return out


def test_wire_replies_are_identical_message_for_message(twin):
    clients = {side.label: side.raw() for side in twin.sides}
    try:
        for label, data, cycles in WIRE_CASES:

            def run(side: Side, data: bytes = data, cycles: int = cycles) -> list[Any]:
                client = clients[side.label]
                client.send(data)
                messages: list[Message] = []
                for _ in range(cycles):
                    messages += client.until_ready()
                return normalised(side, messages)

            plain = run(twin.plain)
            mapped = run(twin.mapped)
            assert mapped == plain, label
    finally:
        for client in clients.values():
            client.close()
    twin.check_databases(mirrored=tuple(pos.EXPECTED))


# --- psycopg --------------------------------------------------------------------------------------


def psycopg_result(side: Side, cur: psycopg.Cursor[Any]) -> dict[str, Any]:
    """Everything psycopg tells the application about one result."""
    result: dict[str, Any] = {"status": cur.statusmessage, "rowcount": cur.rowcount}
    if cur.description is not None:
        pgresult = cur.pgresult
        assert pgresult is not None
        result["description"] = [
            (d.name, d.type_code, d.display_size, d.internal_size, d.precision, d.scale, d.null_ok)
            for d in cur.description
        ]
        result["sources"] = [
            (side.table(pgresult.ftable(i)), pgresult.ftablecol(i), pgresult.fformat(i))
            for i in range(pgresult.nfields)
        ]
        result["rows"] = cur.fetchall()
    return result


def psycopg_error(exc: psycopg.Error) -> dict[str, Any]:
    diag = exc.diag
    return {
        "class": type(exc).__name__,
        "sqlstate": exc.sqlstate,
        **{
            name: getattr(diag, name)
            for name in (
                "severity",
                "message_primary",
                "message_detail",
                "message_hint",
                "statement_position",
                "internal_position",
                "internal_query",
                "context",
                "schema_name",
                "table_name",
                "column_name",
                "datatype_name",
                "constraint_name",
                "source_function",
            )
        },
    }


PSYCOPG_STATEMENTS: list[tuple[str, tuple[Any, ...] | None]] = [
    (INS_USER + "(%s, %s, %s, %s, %s) RETURNING *", (1, "pp@x", "Pia", "Park", "customer")),
    (INS_USER + "(1, 'q1@x', 'Q', 'One', 'customer'), (2, 'q2@x', 'Q', 'Two', 'employee')", None),
    (
        "UPDATE users SET role = %s WHERE email = %s RETURNING id, role, role = 'manager'",
        ("manager", "q1@x"),
    ),
    ("UPDATE products SET cost = cost + %s WHERE tenant_id = %s", (1, 1)),
    (
        "DELETE FROM inventory i USING products p "
        "WHERE p.id = i.product_id AND p.sku = %s RETURNING i.*",
        ("SKU-3",),
    ),
    (
        "INSERT INTO audit_log (actor_id, details) VALUES (%s, %s::jsonb) RETURNING details, at",
        (1, '{"k": "v"}'),
    ),
    (
        "WITH x AS (SELECT 3 AS q) INSERT INTO transactions (tenant_id, quantity, unit_price) "
        "SELECT 1, q, %s FROM x RETURNING id, quantity * unit_price AS total",
        (2.5,),
    ),
    ("UPDATE users SET phone = nocol WHERE id = %s", (1,)),
    ("INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (%s, %s, %s)", (1, 0, 1)),
    (
        INS_USER + "(1, 'multi@x', 'M', 'S', 'customer'); "
        "UPDATE users SET phone = 'x' WHERE id = 1 RETURNING id",
        None,
    ),
    (INS_USER + "(1, 'multi2@x', 'M', 'S', 'customer'); SELECT nocol", None),
    ("DELETE FROM users WHERE email IN (%s, %s)", ("q2@x", "nobody@x")),
]


@pytest.mark.parametrize(
    ("binary", "prepare"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_psycopg_sees_the_same_descriptions_rows_counts_and_errors(twin, binary, prepare):
    def observe(side: Side) -> list[Any]:
        seen: list[Any] = []
        with psycopg.connect(side.dsn, autocommit=True) as conn:
            for sql, params in PSYCOPG_STATEMENTS:
                multi = params is None and ";" in sql
                kwargs: dict[str, Any] = {} if multi else {"binary": binary, "prepare": prepare}
                cur = conn.cursor()
                try:
                    cur.execute(sql, params, **kwargs)
                except psycopg.Error as exc:
                    seen.append(psycopg_error(exc))
                    continue
                results = [psycopg_result(side, cur)]
                while cur.nextset():
                    results.append(psycopg_result(side, cur))
                seen.append(results)
        return seen

    twin.observe(observe)
    twin.check_databases(mirrored=("customers", "employees", "products", "transactions"))


def test_psycopg_pipeline_with_an_error_in_the_middle(twin):
    def observe(side: Side) -> list[Any]:
        seen: list[Any] = []
        with psycopg.connect(side.dsn, autocommit=True) as conn:
            cursors = []
            try:
                with conn.pipeline():
                    for i in range(3):
                        cursors.append(
                            conn.execute(
                                INS_USER + "(1, %s, 'Pi', 'Pe', 'customer') RETURNING id",
                                (f"pl{i}@x",),
                            )
                        )
                    cursors.append(
                        conn.execute(
                            "UPDATE users SET role = 'employee' WHERE email = %s", ("pl0@x",)
                        )
                    )
                    cursors.append(
                        conn.execute("UPDATE users SET phone = nocol WHERE id = %s", (1,))
                    )
                    cursors.append(conn.execute(INS_USER + "(1, 'never@x', 'N', 'V', 'customer')"))
            except psycopg.Error as exc:
                seen.append(psycopg_error(exc))
            for cur in cursors[:4]:
                seen.append(psycopg_result(side, cur))
            with conn.pipeline():
                cur = conn.execute(
                    "UPDATE users SET phone = 'after' WHERE email LIKE %s RETURNING id", ("pl%",)
                )
            seen.append(psycopg_result(side, cur))
        return seen

    twin.observe(observe)
    # the pipeline was one implicit transaction: its failure rolled every statement back
    assert twin.mapped.db.scalar("SELECT count(*) FROM users WHERE email LIKE 'pl%'") == 0
    assert (
        twin.mapped.db.scalar(
            "SELECT count(*) FROM dualwrite.outbox o WHERE NOT EXISTS "
            "(SELECT FROM users u WHERE jsonb_build_array(u.id) = o.key) "
            "AND o.mapping IN ('customers', 'employees')"
        )
        == 0
    )
    twin.check_databases(mirrored=())


# --- asyncpg --------------------------------------------------------------------------------------


def asyncpg_error(exc: asyncpg.PostgresError) -> dict[str, Any]:
    fields = exc.as_dict()
    fields.pop("server_source_line", None)
    return {"class": type(exc).__name__, **fields}


ASYNCPG_STATEMENTS: list[tuple[str, tuple[Any, ...]]] = [
    (INS_USER + "($1, $2, $3, $4, $5) RETURNING *", (1, "ap@x", "Ap", "Gee", "customer")),
    ("UPDATE users SET role = $1 WHERE email = $2 RETURNING id, role", ("employee", "ap@x")),
    ("UPDATE products SET price = price * $1 WHERE tenant_id = $2", (2, 1)),
    (
        "INSERT INTO inventory (product_id, store_code, tenant_id) VALUES ($1, $2, $3) "
        "ON CONFLICT (product_id, store_code) DO UPDATE SET on_hand = inventory.on_hand + 100 "
        "RETURNING on_hand, reserved",
        (1, "north", 1),
    ),
    ("DELETE FROM transactions WHERE tenant_id = $1 RETURNING id, quantity * unit_price", (2,)),
    ("DELETE FROM audit_log WHERE id = $1", (1,)),
    ("UPDATE users SET phone = nocol WHERE id = $1", (1,)),
    ("INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES ($1, $2, $3)", (1, -5, 1)),
]


def test_asyncpg_sees_the_same_attributes_records_status_and_errors(twin):
    async def observe_async(side: Side) -> list[Any]:
        seen: list[Any] = []
        conn = await asyncpg.connect(side.dsn)
        try:
            for sql, args in ASYNCPG_STATEMENTS:
                try:
                    statement = await conn.prepare(sql)
                except asyncpg.PostgresError as exc:
                    seen.append(("prepare", asyncpg_error(exc)))
                    continue
                attributes = [(a.name, a.type.oid, a.type.name) for a in statement.get_attributes()]
                params = [p.oid for p in statement.get_parameters()]
                try:
                    rows = await statement.fetch(*args)
                except asyncpg.PostgresError as exc:
                    seen.append(("fetch", attributes, params, asyncpg_error(exc)))
                    continue
                seen.append(
                    (
                        attributes,
                        params,
                        [tuple(r.items()) for r in rows],
                        statement.get_statusmsg(),
                    )
                )
                # the same statement again through conn.execute (its own status string)
                seen.append(await conn.execute(sql, *args) if "RETURNING" not in sql else None)
            # a pipeline: executemany sends every Bind/Execute before one Sync
            await conn.executemany(
                INS_USER + "($1, $2, 'Many', 'Times', $3)",
                [(1, f"m{i}@x", ("customer", "employee", "manager")[i % 3]) for i in range(9)],
            )
            seen.append(
                await conn.fetch("SELECT id, email FROM users WHERE email LIKE 'm_@x' ORDER BY id")
            )
            try:
                await conn.executemany(
                    "INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES ($1, $2, 1)",
                    [(1, 1), (1, 2), (1, 0), (1, 3)],
                )
            except asyncpg.PostgresError as exc:
                seen.append(asyncpg_error(exc))
            seen.append(await conn.fetchval("SELECT count(*) FROM transactions"))
            async with conn.transaction():
                cursor = await conn.cursor("SELECT id FROM users ORDER BY id")
                seen.append(await cursor.fetch(3))
        finally:
            await conn.close()
        return [tuple(item) if isinstance(item, list) else item for item in seen]

    twin.observe(lambda side: asyncio.run(observe_async(side)))
    twin.check_databases(mirrored=("customers", "employees", "products", "stock_levels"))


def test_rewritten_statements_are_cached_by_shape_whatever_their_comments(twin):
    """sqlcommenter-style comments carry per-request ids; they must not make a new shape."""
    sidecar = twin.mapped.proxy.sidecar
    assert sidecar is not None
    rewriter = sidecar.proxy.mirror.rewriter  # type: ignore[union-attr]
    with psycopg.connect(twin.mapped.dsn, autocommit=True) as conn:
        conn.execute(INS_USER + "(1, 'c0@x', 'C', 'C', 'customer') /* traceparent='00-aa' */")
        misses = rewriter.misses
        for i in range(1, 4):
            conn.execute(
                INS_USER + f"(1, 'c{i}@x', 'C', 'C', 'customer') /* traceparent='00-{i:02x}' */"
            )
    assert rewriter.misses == misses
    pos.drain(twin.mapped.proxy)
    assert pos.divergence(twin.mapped.db, ["customers"]) == {}


def test_prepared_statements_alternate_on_one_portal_rewritten_and_plain(twin):
    """asyncpg binds every statement to the unnamed portal: a plain statement bound after a
    rewritten one must lose the rewritten portal's repair (the proxy's fast path for reads
    naming no rewritten statement forgets it), and the rewritten one must get it back."""

    async def observe_async(side: Side) -> list[Any]:
        conn = await asyncpg.connect(side.dsn)
        seen: list[Any] = []
        try:
            insert = await conn.prepare(
                INS_USER + "($1, $2, 'Al', 'T', 'customer') RETURNING id, email"
            )
            update = await conn.prepare("UPDATE users SET phone = $1 WHERE email = $2")
            count = await conn.prepare("SELECT count(*), max(email) FROM users")
            plain_update = await conn.prepare("UPDATE tenants SET name = name WHERE id = $1")
            for i in range(6):
                seen.append([tuple(r) for r in await insert.fetch(1, f"alt{i}@x")])
                seen.append(tuple(await count.fetchrow()))
                await update.fetch(f"+{i}", f"alt{i}@x")
                seen.append(update.get_statusmsg())
                await plain_update.fetch(1)
                seen.append(plain_update.get_statusmsg())
                seen.append(tuple(await count.fetchrow()))
        finally:
            await conn.close()
        return seen

    twin.observe(lambda side: asyncio.run(observe_async(side)))
    twin.check_databases(mirrored=("customers",))


@pytest.mark.parametrize(
    "bad",
    [
        frame(b"B", b"no-terminator"),  # portal name without its NUL
        frame(b"B", b"\0stmt-without-nul"),  # statement name without its NUL
        frame(b"E", b"portal-without-nul"),
        frame(b"D", b""),  # Describe with no kind byte
    ],
    ids=["bind-portal", "bind-statement", "execute", "describe"],
)
def test_a_malformed_extended_message_after_a_rewrite_is_refused_and_writes_nothing(twin, bad):
    """Once a session has rewritten statements, Bind/Execute/Describe are read for names: a
    malformed one is a 08P01 protocol violation and a closed connection, and the statement
    prepared before it never runs."""
    side = twin.mapped
    before = side.db.scalar("SELECT count(*) FROM users")
    with side.raw() as client:
        sql = (INS_USER + "(1, 'bad@x', 'B', 'D', 'customer')").encode()
        client.send(frame(b"P", b"ins\0" + sql + b"\0\0\0") + frame(b"S"))
        assert [m.typ for m in client.until_ready()] == [b"1", b"Z"]
        client.send(
            bad + frame(b"B", b"\0ins\0\0\0\0\0\0\0") + frame(b"E", b"\0\0\0\0\0") + frame(b"S")
        )
        messages = client.until_closed()
    errors = [m.fields() for m in messages if m.typ == b"E"]
    assert errors, messages
    assert errors[0]["C"] == "08P01"
    assert side.db.scalar("SELECT count(*) FROM users") == before
