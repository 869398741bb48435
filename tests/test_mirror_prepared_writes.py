"""Simple-protocol writes to mapped tables run as server-side prepared statements, one per shape,
and the client cannot tell: the same statements sent to a plain relay (no mappings) and to a
mirroring sidecar get the same replies, byte for byte on the wire (table OIDs aside, which
differ between the two databases), and as psql, asyncpg and psycopg present them, including
errors mid-transaction, bad literals, multi-statement queries and DISCARD ALL.

Every statement shape runs several times with different literals: the first time it is new
(it runs as a simple Query, and is prepared at the next rest), later times it is prepared.
The tests check on the server (pg_prepared_statements) and in the metrics that the prepared
path really ran.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
from typing import Any

import asyncpg
import psycopg
import pytest
import test_mirror_transparency as transparency
from support import pos
from support.transparency import Message
from test_mirror_transparency import Side, query

from proxy import literals
from proxy.literals import INT4, INT8, NUMERIC, UNKNOWN, analyze, parameterize

PREPARED = "dualwrite_prepared_writes_total"
#: the transparency suite's two databases and sidecars (plain relay, mirroring sidecar)
twin = pytest.fixture(transparency.twin.__wrapped__, name="twin")  # type: ignore[attr-defined]

OURS = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE '\\_\\_dualwrite\\_w%'"


def outcome(name: str) -> float:
    return pos.scrape(PREPARED, outcome=name)


# --- literals -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "type_oid", "value"),
    [
        ("1", INT4, "1"),
        ("-5", INT4, "-5"),
        ("- 5", INT4, "-5"),
        ("2147483647", INT4, "2147483647"),
        ("2147483648", INT8, "2147483648"),
        ("-2147483648", INT4, "-2147483648"),
        ("-2147483649", INT8, "-2147483649"),
        ("9223372036854775807", INT8, "9223372036854775807"),
        ("9223372036854775808", NUMERIC, "9223372036854775808"),
        ("1.5", NUMERIC, "1.5"),
        ("-.5", NUMERIC, "-.5"),
        ("1e3", NUMERIC, "1e3"),
        ("'it''s'", UNKNOWN, "it's"),
        ("'zoë'", UNKNOWN, "zoë"),
    ],
)
def test_literals_are_typed_as_the_parser_types_them(literal, type_oid, value):
    found = parameterize(f"UPDATE t SET a = {literal} WHERE id = 7")
    assert found is not None
    assert found.shape == "UPDATE t SET a = $1 WHERE id = $2"
    assert [(lit.type_oid, lit.value) for lit in found.literals] == [(type_oid, value), (INT4, "7")]


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE t SET a = true, b = NULL, c = B'101', d = E'x', e = 'back\\slash' WHERE x",
        "UPDATE t SET f = interval '1 day', g = x::varchar(10) WHERE y",
        "INSERT INTO t SELECT a FROM u GROUP BY 1 ORDER BY 1",
        "UPDATE t SET a = $1",
        "UPDATE t SET a = $$x$$",
        "UPDATE t SET a = 1; UPDATE t SET a = 2",
        "UPDATE t SET a = 0x1F",
    ],
)
def test_literals_that_stay_in_the_text(sql):
    assert parameterize(sql) is None


def test_positions_map_back_to_the_original_text():
    text = "UPDATE t SET a = 'long literal', b = x WHERE id = 12345"
    found = parameterize(text)
    assert found is not None
    assert found.shape == "UPDATE t SET a = $1, b = x WHERE id = $2"
    at_x = found.shape.index("x") + 1
    assert found.original_position(at_x) == text.index("x") + 1
    assert found.original_position(found.shape.index("$1") + 1) == text.index("'long") + 1
    assert found.original_position(found.shape.index("$1") + 2) is None
    assert found.literal_position(2) == text.index("12345") + 1


@pytest.mark.parametrize(
    "template",
    [
        "UPDATE t SET a = a + {n}, b = {s}, c = true WHERE id = {n} AND d = interval {s}",
        "INSERT INTO t (a, b) VALUES ({n}, {s}), ({n}, 'fixed') RETURNING a, {n}",
        "DELETE FROM t WHERE a IN ({n}, {n}) AND b LIKE {s} -- note {n}\n AND c = {n}",
        "INSERT INTO t SELECT {s}::varchar(10), x[{n}] FROM u WHERE y = {n} GROUP BY 1 ORDER BY 1",
    ],
)
def test_the_fast_path_agrees_with_the_analysis(template):
    """Statements of a known shape are split without a parse: same result as the analysis."""
    numbers = ["1", "-5", "2147483648", "- 7", "1.5", "-2147483648", "99999999999999999999"]
    strings = ["'x'", "'it''s'", "'zoë'", "''", "'back\\slash'", "E'x'"]
    for i in range(len(numbers) * 2):
        text = template.format(n=numbers[i % len(numbers)], s=strings[i % len(strings)])
        assert parameterize(text) == analyze(text), text
        assert parameterize(text) == analyze(text), text  # the second time from the plan
        assert literals.known_shape(text)


# --- the wire -------------------------------------------------------------------------------------

INS_USER = "INSERT INTO users (tenant_id, email, first_name, last_name, role) VALUES "


def rounds(i: int) -> list[tuple[str, str]]:
    """Statements for round ``i``: the same shapes each round, different literals."""
    return [
        ("insert", INS_USER + f"({1 + i % 2}, 'r{i}@x', 'Ré{i}', 'L', 'customer')"),
        ("insert returning *", INS_USER + f"(1, 'rr{i}@x', 'R', 'R', 'employee') RETURNING *"),
        (
            "update returning expressions",
            f"UPDATE users SET phone = '+1-555-{1000 + i}' WHERE id = {1 + i % 3} "
            "RETURNING id, upper(phone) AS p, 1 + 1",
        ),
        ("update numeric", f"UPDATE products SET price = price + {i}.25 WHERE id = {1 + i % 3}"),
        ("update big", f"UPDATE inventory SET on_hand = on_hand + {i} WHERE product_id = {i % 3}"),
        ("update int8 literal", f"UPDATE users SET phone = 'x' WHERE id = {2**40 + i}"),
        ("delete nothing", f"DELETE FROM audit_log WHERE id = {-1 - i}"),
        ("bad literal", f"UPDATE transactions SET quantity = 'abc{i}' WHERE id = 1"),
        ("check violation", f"UPDATE transactions SET quantity = {-i} WHERE id = 1"),
        ("unknown column", f"UPDATE users SET phone = nocol WHERE id = {i}"),
        (
            "unique violation",
            INS_USER.replace("(tenant_id", "(id, tenant_id") + f"(1, 1, 'u{i}', 'b', 'c', 'e')",
        ),
        (
            "transaction: error in the middle",
            f"BEGIN; UPDATE users SET phone = 'tx{i}' WHERE id = 1",
        ),
        ("in the failed transaction", f"UPDATE users SET phone = 'tx{i}' WHERE id = 2"),
        ("rolled back", "ROLLBACK"),
        ("explicit transaction", "BEGIN"),
        ("write in it", f"UPDATE users SET last_name = 'T{i}' WHERE id = {1 + i % 4}"),
        (
            "error in it",
            f"INSERT INTO transactions (tenant_id, quantity, unit_price) VALUES (1, 'q{i}', 1)",
        ),
        ("after the error", f"UPDATE users SET last_name = 'U{i}' WHERE id = 1"),
        ("end", "COMMIT"),
        (
            "multi-statement",
            INS_USER + f"(2, 'm{i}@x', 'M', 'S', 'manager'); UPDATE users SET phone = 'm' "
            f"WHERE email = 'm{i}@x' RETURNING id",
        ),
        ("committed transaction", "BEGIN"),
        ("write 1", f"UPDATE inventory SET reserved = reserved + 1 WHERE product_id = {1 + i % 2}"),
        ("write 2", INS_USER + f"(2, 'c{i}@x', 'C', 'T', 'customer') RETURNING id, email"),
        ("commit", "COMMIT"),
        ("parse fails: unknown || unknown", f"UPDATE users SET phone = 'a{i}' || 'b' WHERE id = 3"),
    ]


def raw_normalised(side: Side, messages: list[Message]) -> list[tuple[str, Any]]:
    """Messages as raw bytes, but RowDescription's table OIDs as table names."""
    out: list[tuple[str, Any]] = []
    for message in messages:
        if message.typ == b"T":
            (count,) = struct.unpack_from("!h", message.body)
            at, columns = 2, []
            for _ in range(count):
                end = message.body.index(b"\0", at)
                (table,) = struct.unpack_from("!I", message.body, end + 1)
                rest = message.body[end + 5 : end + 19]
                columns.append((message.body[at:end], side.table(table), rest))
                at = end + 19
            out.append(("T", columns))
        else:
            out.append((message.typ.decode(), message.body))
    return out


def test_simple_writes_are_prepared_and_replies_are_identical_byte_for_byte(twin):
    executed, prepared = outcome("executed"), outcome("prepared")
    failed = outcome("parse_failed")
    clients = {side.label: side.raw() for side in twin.sides}
    try:
        for i in range(4):
            for label, sql in rounds(i):

                def run(side: Side, sql: str = sql) -> list[Any]:
                    client = clients[side.label]
                    client.send(query(sql))
                    return raw_normalised(side, client.until_ready())

                plain = run(twin.plain)
                mapped = run(twin.mapped)
                assert mapped == plain, (i, label)
        mapped_client = clients["mapped"]
        mapped_client.send(query(OURS))
        (row,) = [m for m in mapped_client.until_ready() if m.typ == b"D"]
        assert int(row.body[6:]) > 5  # the shapes are prepared on the server connection
    finally:
        for client in clients.values():
            client.close()
    assert outcome("prepared") - prepared > 5
    assert outcome("executed") - executed > 20
    assert outcome("parse_failed") - failed >= 1
    twin.check_databases(mirrored=("customers", "employees", "products", "stock_levels"))


def test_psql_sees_the_same_output(twin, tmp_path):
    script = tmp_path / "script.sql"
    script.write_text(
        "\n".join(f"{sql};" for i in range(3) for _, sql in rounds(i) if "BEGIN;" not in sql) + "\n"
    )

    def observe(side: Side) -> str:
        done = subprocess.run(
            ["psql", "-X", "-v", "VERBOSITY=verbose", "-d", side.dsn, "-f", str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return (done.stdout + done.stderr).replace(side.db.name, "DB")

    executed = outcome("executed")
    twin.observe(observe)
    assert outcome("executed") - executed > 10


def test_asyncpg_sees_the_same_statuses_rows_and_errors(twin):
    async def session(dsn: str) -> list[Any]:
        conn = await asyncpg.connect(dsn)
        seen: list[Any] = []
        try:
            for i in range(3):
                for _, sql in rounds(i):
                    try:
                        # execute() without arguments is a simple Query
                        seen.append(await conn.execute(sql))
                    except asyncpg.PostgresError as exc:
                        seen.append((exc.sqlstate, str(exc), exc.as_dict().get("position")))
            seen.append(await conn.fetch("SELECT id, phone, last_name FROM users ORDER BY id"))
        finally:
            await conn.close()
        return seen

    def observe(side: Side) -> list[Any]:
        return asyncio.run(session(side.dsn))

    executed = outcome("executed")
    twin.observe(observe)
    assert outcome("executed") - executed > 10


def test_psycopg_client_side_binding_sees_the_same_results(twin):
    def observe(side: Side) -> list[Any]:
        seen: list[Any] = []
        with psycopg.connect(side.dsn, autocommit=True) as conn:
            cur = psycopg.ClientCursor(conn)
            for i in range(3):
                for _, sql in rounds(i):
                    try:
                        cur.execute(sql)
                    except psycopg.Error as exc:
                        diag = exc.diag
                        seen.append((exc.sqlstate, diag.message_primary, diag.statement_position))
                        continue
                    seen.append((cur.statusmessage, cur.rowcount))
                    if cur.description is not None:
                        seen.append([d.name for d in cur.description])
                        seen.append(cur.fetchall())
                # literals bound on the client: psycopg's own quoting
                cur.execute(
                    "UPDATE users SET phone = %s WHERE id = %s RETURNING id, phone",
                    (f"cs'{i}", 1 + i % 2),
                )
                seen.append(cur.fetchall())
        return seen

    executed = outcome("executed")
    twin.observe(observe)
    assert outcome("executed") - executed > 10


def test_the_cache_is_bounded_and_discard_all_starts_over(pg, db, sidecar):
    pos.load_schema(db)
    migration = pos.migration()
    migration.pop("app_role")
    pos.run_setup(db, migration)
    proxy = sidecar({**migration, "limits": {"prepared_writes_per_connection": 2}})
    evicted = outcome("evicted")
    with psycopg.connect(proxy.dsn(db.name), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        for i in range(3):
            for column in ("phone", "first_name", "last_name", "email"):
                cur.execute(f"UPDATE users SET {column} = 'v{i}' WHERE id = {i}")
        cur.execute(OURS)
        assert cur.fetchone() == (2,)
        assert outcome("evicted") - evicted >= 2
        cur.execute("DISCARD ALL")
        cur.execute(OURS)
        assert cur.fetchone() == (0,)
        for i in range(3):
            cur.execute(f"UPDATE users SET phone = 'w{i}' WHERE id = {i}")
            assert cur.statusmessage == "UPDATE 0"
        cur.execute(OURS)
        assert cur.fetchone() == (1,)


def test_writes_are_prepared_only_when_the_relay_wires_its_tracker(pg, db, sidecar):
    """The feature needs the connection's tracker (to know when the connection is at rest):
    through the real proxy, the server ends up holding the prepared shape."""
    pos.load_schema(db)
    migration = pos.migration()
    migration.pop("app_role")
    pos.run_setup(db, migration)
    proxy = sidecar(migration)
    with psycopg.connect(proxy.dsn(db.name), autocommit=True) as conn:
        cur = psycopg.ClientCursor(conn)
        for i in range(3):
            cur.execute(f"UPDATE users SET phone = 'p{i}' WHERE id = {i}")
        cur.execute("SELECT statement FROM pg_prepared_statements")
        statements = [row[0] for row in cur.fetchall()]
    assert any("__dualwrite" in s and "$1" in s for s in statements), statements


# --- the hot path: statements of a known shape, split without a parse ---------------------------

#: shapes learnt from their first text, then probed with texts that must either split exactly as
#: the analysis splits them or not split at all (None: the full path runs)
HOSTILE_SHAPES = [
    (
        "UPDATE t SET a = {s}, b = {n} WHERE c = {s}",
        [
            "'x'", "'it''s'", "''", "'$$'", "'a$$b'", "'--'", "'/*'", "'x'' WHERE c = ''y'",
            "'zoë'", "'back\\slash'", "E'x'", "'x'\n'y'", "U&'x'", "B'1'",
        ],
        ["1", "-5", "- 7", "2147483648", "-2147483648", "1.5", "1e3", ".5", "99999999999999999999",
         "12abc", "1.2.3", "0x1F", "5 -- 1"],
    ),
    (
        'UPDATE "t1" SET "it\'s" = a + {n} WHERE U&"c" = {s} /* it\'s {n} */',
        ["'x'", "'y''z'", "'*/'"],
        ["1", "-1", "3"],
    ),
    (
        "INSERT INTO t (a, b) VALUES ({n}, {s}) -- trailing {n} 'comment\n",
        ["'a'", "'b''c'", "'-- x'"],
        ["1", "-2", "3.5"],
    ),
]


def _probe(texts: list[str]) -> int:
    """Each text, as the frontend meets it: split by the hot path (then exactly as the
    analysis splits it), or analysed and its shape learnt; returns how many were split."""
    split = 0
    for text in texts:
        known = literals.split_known(text.encode())
        if known is None:
            params = parameterize(text)
            if params is not None:
                literals.remember_known(text.encode(), "utf-8", params)
            continue
        split += 1
        expected = analyze(text)
        assert expected is not None, text
        assert known.parameterized("utf-8") == expected, text
        assert known.types == expected.types, text
        assert known.values == tuple(lit.value.encode() for lit in expected.literals), text
    return split


@pytest.mark.parametrize(("template", "strings", "numbers"), HOSTILE_SHAPES)
def test_the_hot_path_never_splits_a_text_the_analysis_reads_otherwise(template, strings, numbers):
    texts = [template.format(s=s, n=n) for s in strings for n in numbers]
    assert _probe(texts + texts) >= len(texts) // 2  # the ordinary ones do take it


def test_the_hot_path_refuses_what_it_cannot_prove():
    # a literal right after a name or prefix (E'', U&'', N''): never learnt
    for first in ("UPDATE t SET a = E'x' || 'y' WHERE b = 1", "UPDATE t SET a = N'x' WHERE b = 1"):
        params = parameterize(first)
        if params is not None:
            literals.remember_known(first.encode(), "utf-8", params)
        assert literals.split_known(first.encode()) is None or (
            literals.split_known(first.encode()).parameterized("utf-8")  # type: ignore[union-attr]
            == analyze(first)
        )
    # a string continued across a newline is one literal to the lexer
    text = "UPDATE t SET a = 'x'\n'y' WHERE b = 1"
    params = parameterize(text)
    assert params is not None
    assert not literals.remember_known(text.encode(), "utf-8", params)
    assert literals.split_known(text.encode()) is None
    # encodings where an ASCII byte can be half of a character are not taken
    plain = "UPDATE t SET a = 'x' WHERE b = 1"
    params = parameterize(plain)
    assert params is not None
    assert not literals.remember_known(plain.encode(), "shift_jis", params)


def test_the_hot_path_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(literals, "_KNOWN", {})
    monkeypatch.setattr(literals, "_KNOWN_CACHE_SIZE", 50)
    for i in range(120):
        text = f"UPDATE t{'x' * (i % 7)}_{chr(97 + i % 26)}{i // 26} SET a = 'v' WHERE b = 1"
        params = parameterize(text)
        assert params is not None
        assert literals.remember_known(text.encode(), "utf-8", params)
        assert len(literals._KNOWN) <= 50
    # the newest are kept, the oldest went
    assert literals.split_known(text.replace("'v'", "'w'").encode()) is not None


HOSTILE_ROUNDS = [
    ("quotes", "UPDATE users SET phone = '{q}' WHERE id = {n}"),
    ("comment", "UPDATE users SET phone = 'c{n}' /* it's {n} */ WHERE id = {n}"),
    ("line comment", "UPDATE users SET last_name = 'l{n}' -- 'x {n}\n WHERE id = {n}"),
    ("unicode name", 'UPDATE users SET U&"phone" = \'u{n}\' WHERE id = {n}'),
    ("minus", "UPDATE inventory SET on_hand = on_hand + -{n} WHERE product_id = {n}"),
]
QUOTES = ["it''s", "$$", "a$$b", "--", "/*", "x'' WHERE id = ''1", "zoë", "", "$1"]


def test_hostile_texts_on_the_wire_are_identical(twin):
    """Texts that differ only inside a literal (quotes, $$, comment markers), comments, U&""
    names; then the session turns standard_conforming_strings off, and the source table is
    renamed away and back under a prepared shape: byte for byte what a plain relay sends."""
    executed = outcome("executed")
    clients = {side.label: side.raw() for side in twin.sides}

    def both(sql: str, label: str) -> None:
        seen = []
        for side in twin.sides:
            client = clients[side.label]
            client.send(query(sql))
            seen.append(raw_normalised(side, client.until_ready()))
        assert seen[1] == seen[0], (label, sql, seen)

    try:
        for i in range(len(QUOTES)):
            for label, template in HOSTILE_ROUNDS:
                both(template.format(q=QUOTES[i], n=1 + i % 3), label)
        assert outcome("executed") - executed > 20
        # the shape is prepared; its table goes away (the plan's revalidation fails) and back
        both("ALTER TABLE users RENAME TO users_away", "rename")
        both("UPDATE users SET phone = 'gone' WHERE id = 1", "renamed away")
        both("BEGIN", "begin")
        both("UPDATE users SET phone = 'gone' WHERE id = 2", "renamed away, in a transaction")
        both("ROLLBACK", "rollback")
        both("ALTER TABLE users_away RENAME TO users", "rename back")
        both("UPDATE users SET phone = 'back' WHERE id = 1", "renamed back")
        # the setting changes mid-session: the shapes prepared under it are not used while
        # it is off (a literal's backslash would mean something else). (Not compared: a
        # backslash literal under the setting off, which the plain relay's server answers
        # with a nonstandard-use WARNING that the respelled E'' text does not get.)
        both("SET standard_conforming_strings = off", "setting")
        for i, value in enumerate(["it''s", "plain", "$$", "zoë"] * 2):
            both(f"UPDATE users SET phone = '{value}' WHERE id = {1 + i % 3}", "scs off")
        both("SET standard_conforming_strings = on", "setting back")
        both("UPDATE users SET phone = 'a\\b' WHERE id = 1", "scs on, backslash")
    finally:
        for client in clients.values():
            client.close()
    twin.check_databases(mirrored=("customers", "employees"))
