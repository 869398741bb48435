"""pgbench through the proxy: the same final state as directly, in every query mode, no errors.

A single client with a fixed random seed makes the same transactions whichever way it
connects, so the final tables must be equal; several clients for a few seconds must leave the
TPC-B invariants intact (every balance change is in the history, once).
"""

from __future__ import annotations

import re

import pytest
from support import run_pgbench
from support.transparency import CASES_DIR

TRANSFER_SCRIPT = CASES_DIR / "transfer.pgbench"

STATE = """
SELECT (SELECT count(*) FROM pgbench_accounts),
       (SELECT md5(string_agg(aid || ':' || bid || ':' || abalance, ',' ORDER BY aid))
          FROM pgbench_accounts),
       (SELECT md5(string_agg(tid || ':' || tbalance, ',' ORDER BY tid)) FROM pgbench_tellers),
       (SELECT md5(string_agg(bid || ':' || bbalance, ',' ORDER BY bid)) FROM pgbench_branches),
       (SELECT count(*) FROM pgbench_history),
       (SELECT md5(string_agg(tid || ':' || bid || ':' || aid || ':' || delta, ','
                              ORDER BY tid, bid, aid, delta)) FROM pgbench_history)
"""

INVARIANTS = """
SELECT (SELECT sum(abalance) FROM pgbench_accounts),
       (SELECT sum(tbalance) FROM pgbench_tellers),
       (SELECT sum(bbalance) FROM pgbench_branches),
       (SELECT coalesce(sum(delta), 0) FROM pgbench_history),
       (SELECT count(*) FROM pgbench_history)
"""


@pytest.fixture
def twin(pg):
    database = pg.create_database()
    try:
        yield database
    finally:
        database.drop()


def pgbench_ok(dsn: str, *args: str) -> int:
    """Run pgbench, check it reports no failure, return the transactions it processed."""
    result = run_pgbench(dsn, "-n", *args, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "number of failed transactions: 0 " in result.stdout, result.stdout
    assert "error" not in result.stderr.lower(), result.stderr
    assert "aborted" not in result.stdout.lower(), result.stdout
    processed = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    assert processed is not None, result.stdout
    return int(processed.group(1))


def initialise(dsn: str) -> None:
    result = run_pgbench(dsn, "-i", "-s", "1", "-q", timeout=120)
    assert result.returncode == 0, result.stderr


MODES = ("simple", "extended", "prepared")


def test_pgbench_through_the_proxy_leaves_the_same_tables_as_directly(pg, db, twin, sidecar):
    """Initialise, then the same seeded transactions in each query mode and a custom script:
    after every step the proxied database equals the direct one."""
    handle = sidecar()
    initialise(db.dsn)
    initialise(handle.dsn(twin.name))  # 100k rows of COPY FROM STDIN, DDL, VACUUM
    assert db.sql(STATE)[0][0] == 100000
    assert twin.sql(STATE) == db.sql(STATE)
    done = 0
    for mode in MODES:
        seeded = ("-M", mode, "-c", "1", "-t", "300", "--random-seed=20240229")
        assert pgbench_ok(db.dsn, *seeded) == 300
        assert pgbench_ok(handle.dsn(twin.name), *seeded) == 300
        done += 300
        direct_state = db.sql(STATE)
        assert direct_state[0][4] == done  # history rows
        assert twin.sql(STATE) == direct_state, mode
    script = ("-M", "extended", "-c", "1", "-t", "200", "--random-seed=7")
    script += ("-f", str(TRANSFER_SCRIPT))
    assert pgbench_ok(db.dsn, *script) == 200
    assert pgbench_ok(handle.dsn(twin.name), *script) == 200
    assert twin.sql(STATE) == db.sql(STATE)


@pytest.mark.parametrize("mode", MODES)
def test_pgbench_clients_at_once_through_the_proxy_lose_nothing(mode, db, sidecar):
    """Several clients for a few seconds: every balance change is in the history, once."""
    handle = sidecar()
    initialise(db.dsn)
    processed = pgbench_ok(
        handle.dsn(), "-M", mode, "-c", "4", "-j", "2", "-T", "2", "--max-tries=10"
    )
    assert processed > 0
    accounts, tellers, branches, deltas, history = db.sql(INVARIANTS)[0]
    assert accounts == tellers == branches == deltas
    assert history == processed


def test_pgbench_custom_script_clients_at_once_through_the_proxy(db, sidecar):
    """A script with \\set, \\gset and an explicit transaction: money moves, none appears."""
    handle = sidecar()
    initialise(db.dsn)
    processed = pgbench_ok(
        handle.dsn(),
        "-M",
        "prepared",
        "-c",
        "4",
        "-j",
        "2",
        "-T",
        "2",
        "--max-tries=10",  # a deadlock between two transfers is retried, not failed
        "-f",
        str(TRANSFER_SCRIPT),
    )
    assert processed > 0
    accounts, _, _, deltas, history = db.sql(INVARIANTS)[0]
    assert accounts == 0  # transfers move money, never create it
    assert history == processed
    assert deltas > 0
