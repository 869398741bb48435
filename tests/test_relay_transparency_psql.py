"""psql runs every SQL case file directly and through the proxy: the output must be identical.

The direct runs go to one fresh database, the proxied runs to another, in the same order, and
each case gets a schema of its own (first on its search_path) created in both: every case
starts from the same state on both sides. Only what legitimately differs between two
sessions of one server is normalised: backend pids in notification lines and the database
name. Errors are printed verbose (SQLSTATE, detail, hint, context, schema/table/constraint,
source location), so a changed error field shows up as a difference.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path

import pytest
from support import run_psql
from support.transparency import CASES_DIR, case_files, psql_case, start_relay

CASES = case_files()


@pytest.fixture(scope="module")
def databases(pg, relay_native):
    """(direct, proxied): two fresh databases for the module's runs."""
    direct, proxied = pg.create_database(), pg.create_database()
    try:
        yield direct, proxied
    finally:
        direct.drop()
        proxied.drop()


@pytest.fixture(scope="module")
def relay(pg, databases, relay_native):
    handle = start_relay(pg, databases[0].name)
    try:
        yield handle
    finally:
        handle.stop(grace=0)


def assert_same_text(direct: str, proxied: str, what: str) -> None:
    if direct == proxied:
        return
    diff = difflib.unified_diff(
        direct.splitlines(), proxied.splitlines(), "direct", "proxied", lineterm="", n=2
    )
    shown = "\n".join(line[:200] for line in list(diff)[:80])
    raise AssertionError(f"{what} differs through the proxy:\n{shown}")


def test_there_are_case_files():
    names = {case.stem for case in CASES}
    assert {"ddl", "copy", "errors", "transactions", "large_results", "terminate"} <= names


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.stem)
def test_psql_output_is_identical_through_the_proxy(case: Path, pg, databases, relay, tmp_path):
    schema = f"case_{case.stem}"
    runs = []
    for side, database, dsn in (
        ("direct", databases[0], databases[0].dsn),
        ("proxied", databases[1], relay.dsn(databases[1].name)),
    ):
        database.sql(f"CREATE SCHEMA {schema}")
        # cases that read or write files (\lo_import) get a directory of their own per run
        workdir = tmp_path / side
        workdir.mkdir()
        shutil.copy(CASES_DIR / "lo_data.txt", workdir / "lo_data.txt")
        runs.append(
            psql_case(
                dsn,
                case,
                dbname=database.name,
                variables={"casedir": str(workdir)},
                search_path=schema,
            )
        )
    direct, proxied = runs
    # the case really ran: psql connected and printed results
    assert direct.stdout.strip(), direct.stderr
    assert "could not connect" not in direct.stderr
    assert_same_text(direct.stdout, proxied.stdout, f"{case.name}: stdout")
    assert_same_text(direct.stderr, proxied.stderr, f"{case.name}: stderr")
    assert proxied.returncode == direct.returncode


def test_a_multi_statement_command_line_is_identical(databases, relay):
    direct_db, proxied_db = databases
    sql = (
        "CREATE TABLE cli (x int); INSERT INTO cli VALUES (1), (2) RETURNING x; "
        "SELECT count(*) FROM cli; SELECT 1/0; SELECT 'not reached'"
    )
    flags = ("-X", "-v", "VERBOSITY=verbose")
    direct = run_psql(direct_db.dsn, sql, flags=flags)
    proxied = run_psql(relay.dsn(proxied_db.name), sql, flags=flags)
    assert "22012" in direct.stderr
    assert (proxied.stdout, proxied.stderr, proxied.returncode) == (
        direct.stdout,
        direct.stderr,
        direct.returncode,
    )
    # the error rolled the implicit transaction back, through the proxy as well
    assert proxied_db.scalar("SELECT to_regclass('public.cli') IS NULL") is True
