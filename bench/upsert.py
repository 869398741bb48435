"""Bulk upserts (issue 15): PostgreSQL's cost of each way to write a mapped target."""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import dataclass

import psycopg

SRC_COLS = "id, sku, qty, price, updated_at"
INSERT = (
    "INSERT INTO items (sku, qty, price) SELECT 'new-' || g, g % 100, (g % 1000) * 0.25 "
    "FROM generate_series(1, {rows}) AS g"
)
UPDATE = (
    "UPDATE items SET qty = qty + 1, price = price + 0.01, updated_at = now() "
    "WHERE id BETWEEN {a} AND {a} + {last}"
)
#: the mapping: items -> v2.items with expression columns (as bench/mirror.py's ITEMS)
MAPPED = "id, upper(sku), qty, (price * 100)::bigint, updated_at"
TARGET_COLS = "id, sku, quantity, price_cents, updated_at"
SETS = "sku = EXCLUDED.sku, quantity = EXCLUDED.quantity, price_cents = EXCLUDED.price_cents, "
SETS += "updated_at = EXCLUDED.updated_at"
#: today's guard (core/mapping.py _on_conflict_update): record equality, NULLs equal
GUARD_TODAY = (
    " WHERE NOT (ROW(tgt.sku, tgt.quantity, tgt.price_cents, tgt.updated_at)::pg_catalog.record "
    "OPERATOR(pg_catalog.=) ROW(EXCLUDED.sku, EXCLUDED.quantity, EXCLUDED.price_cents, "
    "EXCLUDED.updated_at)::pg_catalog.record)"
)
#: the issue's spelling: whole rows, IS DISTINCT FROM
GUARD_DISTINCT = " WHERE (tgt.*) IS DISTINCT FROM (EXCLUDED.*)"

SCHEMA = (
    "CREATE SCHEMA v2",
    "CREATE TABLE items (id bigserial PRIMARY KEY, sku text NOT NULL, qty integer NOT NULL, "
    "price numeric(12,2) NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE v2.items (id bigint PRIMARY KEY, sku text NOT NULL, quantity integer NOT NULL, "
    "price_cents bigint NOT NULL, updated_at timestamptz NOT NULL)",
    # (a) the per-row PL/pgSQL trigger, as bench/mirror.py's
    "CREATE FUNCTION mirror_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO v2.items AS tgt (" + TARGET_COLS + ") VALUES (NEW.id, upper(NEW.sku), NEW.qty, "
    "(NEW.price * 100)::bigint, NEW.updated_at) ON CONFLICT (id) DO UPDATE SET " + SETS + "; "
    "RETURN NULL; END $$",
    "CREATE TRIGGER row_mirror AFTER INSERT OR UPDATE ON items FOR EACH ROW "
    "EXECUTE FUNCTION mirror_row()",
    # (e) statement-level triggers with a transition table: one set-based upsert each
    "CREATE FUNCTION mirror_stmt() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
    "INSERT INTO v2.items AS tgt (" + TARGET_COLS + ") SELECT " + MAPPED + " FROM new_rows "
    "ON CONFLICT (id) DO UPDATE SET " + SETS + GUARD_TODAY + "; RETURN NULL; END $$",
    "CREATE TRIGGER stmt_mirror_ins AFTER INSERT ON items REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION mirror_stmt()",
    "CREATE TRIGGER stmt_mirror_upd AFTER UPDATE ON items REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT EXECUTE FUNCTION mirror_stmt()",
    "ALTER TABLE items DISABLE TRIGGER USER",
)


def cte(write: str, mirror: str) -> str:
    """The rewrite's shape: the write RETURNING the source row, the mirror reading it."""
    return (
        f"WITH __dualwrite AS ({write} RETURNING {SRC_COLS}), __dualwrite_m0 AS ({mirror}) "
        "SELECT count(*) FROM __dualwrite"
    )


def upsert(guard: str) -> str:
    return (
        f"INSERT INTO v2.items AS tgt ({TARGET_COLS}) SELECT {MAPPED} FROM __dualwrite AS src "
        f"ON CONFLICT (id) DO UPDATE SET {SETS}{guard}"
    )


RESYNC = (
    f"INSERT INTO v2.items AS tgt ({TARGET_COLS}) SELECT {MAPPED} FROM items "
    f"ON CONFLICT (id) DO UPDATE SET {SETS}{GUARD_TODAY}"
)
UPDATE_FROM = (
    "UPDATE v2.items AS tgt SET sku = upper(src.sku), quantity = src.qty, "
    "price_cents = (src.price * 100)::bigint, updated_at = src.updated_at "
    "FROM __dualwrite AS src WHERE tgt.id = src.id"
)


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    triggers: str  # "" / "row_mirror" / "stmt": which triggers are enabled
    insert: str
    update: str


def variants(rows: int) -> list[Variant]:
    ins, upd = INSERT.replace("{rows}", str(rows)), UPDATE.replace("{last}", str(rows - 1))
    today_ins, today_upd = cte(ins, upsert(GUARD_TODAY)), cte(upd, upsert(GUARD_TODAY))
    return [
        Variant("none", "no mirror (floor)", "", ins, upd),
        Variant("a", "row trigger (PL/pgSQL AFTER ROW upsert)", "row", ins, upd),
        Variant("b", "CTE upsert, no guard", "", cte(ins, upsert("")), cte(upd, upsert(""))),
        Variant("c", "CTE upsert, today's record-= guard", "", today_ins, today_upd),
        Variant(
            "c2",
            "CTE upsert, (tgt.*) IS DISTINCT FROM (excluded.*)",
            "",
            cte(ins, upsert(GUARD_DISTINCT)),
            cte(upd, upsert(GUARD_DISTINCT)),
        ),
        Variant(
            "d",
            "today's INSERT; UPDATE half as UPDATE tgt FROM src",
            "",
            today_ins,
            cte(upd, UPDATE_FROM),
        ),
        Variant("e", "statement trigger, NEW TABLE, one upsert", "stmt", ins, upd),
    ]


def backend_cpu_ms(pid: int) -> float:
    """user+system CPU of a local backend, from /proc (ms)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def set_triggers(conn: psycopg.Connection[tuple[object, ...]], which: str) -> None:
    conn.execute("ALTER TABLE items DISABLE TRIGGER USER")
    if which == "row":
        conn.execute("ALTER TABLE items ENABLE TRIGGER row_mirror")
    elif which == "stmt":
        conn.execute("ALTER TABLE items ENABLE TRIGGER stmt_mirror_ins")
        conn.execute("ALTER TABLE items ENABLE TRIGGER stmt_mirror_upd")
    conn.commit()


def run(
    conn: psycopg.Connection[tuple[object, ...]],
    v: Variant,
    seconds: float,
    preload: int,
    rows: int,
) -> tuple[float, float, int]:
    """(wall ms, backend CPU ms) per transaction, and the transaction count."""
    set_triggers(conn, v.triggers)
    pid = conn.info.backend_pid
    n, cpu0, t0 = 0, backend_cpu_ms(pid), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = random.randint(1, preload - rows + 1)
        conn.execute(v.insert)
        conn.execute(v.update.replace("{a}", str(a)))
        conn.commit()
        n += 1
    wall = (time.perf_counter() - t0) * 1000.0
    return wall / n, (backend_cpu_ms(pid) - cpu0) / n, n


def verify(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Source rows whose mapping differs from the target (mirrored ids only)."""
    row = conn.execute(
        f"SELECT count(*) FROM (SELECT {MAPPED} FROM items WHERE id IN (SELECT id FROM v2.items) "
        f"EXCEPT SELECT {TARGET_COLS} FROM v2.items) d"
    ).fetchone()
    conn.rollback()
    return int(str(row[0])) if row else -1


def setup(admin_dsn: str, db: str, dsn: str, preload: int) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{db}"')
        admin.execute(f'CREATE DATABASE "{db}"')
    with psycopg.connect(dsn, autocommit=True) as conn:
        for stmt in SCHEMA:
            conn.execute(stmt)
        conn.execute(
            "INSERT INTO items (sku, qty, price) SELECT 'seed-' || g, g % 100, (g % 1000) * 0.25 "
            f"FROM generate_series(1, {preload}) g"
        )
        conn.execute(f"INSERT INTO v2.items SELECT {MAPPED} FROM items")
        conn.execute("VACUUM ANALYZE items, v2.items")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench upsert", description=__doc__)
    p.add_argument("--host-dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--db", default="bulk_upsert_bench")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds per variant per round")
    p.add_argument("--rows", type=int, default=500, help="rows per INSERT and per UPDATE")
    p.add_argument("--preload", type=int, default=200_000)
    p.add_argument("--keep", action="store_true", help="do not drop the database at the end")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0 or args.rows < 1 or args.preload < args.rows:
        p.error("--rounds, --duration, --rows must be positive and --preload >= --rows")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    dsn = args.host_dsn.rsplit("/", 1)[0] + "/" + args.db
    setup(args.host_dsn, args.db, dsn, args.preload)
    vs = variants(args.rows)
    results: dict[str, list[tuple[float, float, int]]] = {v.name: [] for v in vs}
    load0 = os.getloadavg()[0]
    try:
        with psycopg.connect(dsn) as conn:
            for r in range(args.rounds):
                order = vs if r % 2 == 0 else list(reversed(vs))  # interleaved, both orders
                for v in order:
                    results[v.name].append(run(conn, v, args.duration, args.preload, args.rows))
                    if v.name == "none":  # bring the target back in line, untimed
                        conn.execute(RESYNC)
                        conn.commit()
                    elif bad := verify(conn):
                        raise SystemExit(f"variant {v.name}: {bad} target rows differ")
    finally:
        if not args.keep:
            with psycopg.connect(args.host_dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{args.db}"')

    def med(i: int, n: str) -> float:
        return statistics.median(x[i] for x in results[n])

    base_cpu, base_wall = med(1, "a"), med(0, "a")
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, load {load0:.2f} -> "
        f"{os.getloadavg()[0]:.2f}, {args.rounds} rounds x {args.duration:g} s, "
        f"{2 * args.rows} rows/txn, single client"
    )
    print("| variant | what | txns/round | wall ms/txn | vs (a) | PG CPU ms/txn | vs (a) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for v in vs:
        w, c = med(0, v.name), med(1, v.name)
        n = int(statistics.median(x[2] for x in results[v.name]))
        print(
            f"| {v.name} | {v.what} | {n} | {w:.2f} | {w / base_wall:.2f}x | {c:.2f} | "
            f"{c / base_cpu:.2f}x |"
        )
    return 0
