"""Operator mistakes end in one line and exit 2, never a traceback (issue 11, item 15).

Every subcommand that ``dualwrite --help`` lists is run as a process against four mistakes:
a database that does not exist, a closed port, a wrong password (a cluster of this module's
own that asks for one) and a database where ``setup`` never ran.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import free_port

from dualwrite.embedded import EmbeddedPostgres

SECRET = "Right-Horse-Battery-0815"
#: commands that take no --config: they start their own database
NO_CONFIG_COMMANDS = {"demo"}
_TABLES = """
CREATE TABLE items (id int PRIMARY KEY, label text);
CREATE SCHEMA v2;
CREATE TABLE v2.items (id int PRIMARY KEY, label text);
"""
_MAPPING = {
    "name": "items",
    "source": "items",
    "target": "v2.items",
    "key": ["id"],
    "columns": {"id": "id", "label": "label"},
}


@dataclass(frozen=True)
class Mistake:
    name: str
    service_dsn: str
    upstream_port: int
    env: dict[str, str]


@pytest.fixture(scope="module")
def guarded() -> Iterator[EmbeddedPostgres]:
    """A cluster whose role ``app`` logs in with a SCRAM password only."""
    with EmbeddedPostgres(hba_lines=["host all app 127.0.0.1/32 scram-sha-256"]) as server:
        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE app LOGIN SUPERUSER PASSWORD '{SECRET}'")
        yield server


def subcommands() -> list[str]:
    """The subcommands as ``dualwrite --help`` lists them."""
    result = subprocess.run(
        [sys.executable, "-m", "dualwrite", "--help"], capture_output=True, text=True, check=True
    )
    listing = result.stdout.split("positional arguments:", 1)[1].split("options:", 1)[0]
    names = re.findall(r"^    ([a-z]+)\b", listing, flags=re.MULTILINE)
    assert {"run", "check", "setup", "reconcile"} <= set(names), result.stdout
    return names


def mistakes(pg: Any, db: Any, guarded: EmbeddedPostgres) -> list[Mistake]:
    closed = free_port()
    return [
        Mistake("missing database", pg.dsn("no_such_database_dw"), pg.port, {}),
        Mistake("closed port", f"postgresql://postgres@127.0.0.1:{closed}/postgres", closed, {}),
        Mistake(
            "bad password",
            f"postgresql://app@{guarded.host}:{guarded.port}/postgres",
            guarded.port,
            {"PGPASSWORD": "not-the-password"},
        ),
        Mistake("missing control schema", db.dsn, pg.port, {}),
    ]


def write_config(tmp_path: Path, mistake: Mistake) -> Path:
    data = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"host": "127.0.0.1", "port": mistake.upstream_port},
        "service_dsn": mistake.service_dsn,
        "logging": {"format": "console"},
        "mappings": [_MAPPING],
    }
    path = tmp_path / f"{mistake.name.replace(' ', '-')}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def argv(command: str, config: Path, script: Path) -> list[str]:
    extra = {"lint": [str(script), "--live"]}.get(command, [])
    return [sys.executable, "-m", "dualwrite", command, "--config", str(config), *extra]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    child_env = {k: v for k, v in os.environ.items() if k not in ("DUALWRITE_SERVICE_DSN",)}
    child_env.pop("PGPASSWORD", None)
    child_env.update(env)
    return subprocess.run(
        args, check=False, capture_output=True, text=True, env=child_env, timeout=120
    )


def expected_exit(command: str, mistake: Mistake) -> set[int]:
    """2 for every mistake; where setup never ran, setup installs it, check says it is due and
    teardown finds nothing to drop."""
    if mistake.name == "missing control schema":
        if command in ("setup", "check", "teardown"):
            return {0}
        if command == "lint":
            return {0, 1}  # lint reads the catalog; without traffic evidence it still reviews
    return {2}


def test_every_subcommand_ends_in_one_line_and_exit_2_for_an_operator_mistake(
    pg, db, guarded, tmp_path
):
    db.sql(_TABLES)
    script = tmp_path / "expand.sql"
    script.write_text("ALTER TABLE items ADD COLUMN note text;\n")
    commands = [c for c in subcommands() if c not in NO_CONFIG_COMMANDS]
    cases = [(c, m) for m in mistakes(pg, db, guarded) for c in commands]
    # setup repairs the last mistake: run it after everything else has seen the bare database
    cases.sort(key=lambda case: case[0] == "setup")
    jobs = [(c, m, argv(c, write_config(tmp_path, m), script)) for c, m in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        before_setup = [j for j in jobs if j[0] != "setup"]
        results = list(pool.map(lambda j: run(j[2], j[1].env), before_setup))
    results += [run(j[2], j[1].env) for j in jobs if j[0] == "setup"]
    ordered = [j for j in jobs if j[0] != "setup"] + [j for j in jobs if j[0] == "setup"]

    failures = []
    for (command, mistake, _), result in zip(ordered, results, strict=True):
        output = result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.startswith("dualwrite:")]
        good = (
            result.returncode in expected_exit(command, mistake)
            and "Traceback" not in output
            and (result.returncode != 2 or len(lines) == 1)
        )
        if not good:
            failures.append(f"{command} / {mistake.name}: exit {result.returncode}\n{output}")
    assert not failures, "\n\n".join(failures)
    assert SECRET not in "".join(r.stdout + r.stderr for r in results)


def test_a_bad_password_names_the_database_and_not_the_password(guarded, tmp_path):
    mistake = Mistake(
        "bad password",
        f"postgresql://app@{guarded.host}:{guarded.port}/postgres",
        guarded.port,
        {"PGPASSWORD": "not-the-password"},
    )
    config = write_config(tmp_path, mistake)
    result = run(argv("check", config, tmp_path / "none.sql"), mistake.env)
    assert result.returncode == 2
    assert result.stderr.startswith("dualwrite: error: cannot connect to postgresql://app@")
    assert "password authentication failed" in result.stderr
    assert "not-the-password" not in result.stderr


# --- item 13: a password anywhere in a DSN of the config file is refused --------------------


@pytest.mark.parametrize(
    "spelling",
    [
        "postgresql://app:{secret}@{host}:{port}/postgres",
        "postgresql://app@{host}:{port}/postgres?password={secret}",
        "postgresql://app@{host}:{port}/postgres?pass%77ord={secret}",
        "postgresql://app@{host}:{port}/postgres?sslmode=disable&PASSWORD={secret}",
    ],
)
@pytest.mark.parametrize("key", ["service_dsn", "target_dsn"])
def test_a_password_anywhere_in_a_dsn_is_refused_before_connecting(
    guarded, tmp_path, spelling, key
):
    dsn = spelling.format(secret=SECRET, host=guarded.host, port=guarded.port)
    mapping = dict(_MAPPING)
    data: dict[str, Any] = {
        "upstream": {"host": guarded.host, "port": guarded.port},
        "service_dsn": f"postgresql://app@{guarded.host}:{guarded.port}/postgres",
        "mappings": [mapping],
    }
    if key == "service_dsn":
        data["service_dsn"] = dsn
    else:
        mapping["target_dsn"] = dsn
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data))
    result = run(argv("check", config, tmp_path / "none.sql"), {})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "must not contain a password" in result.stderr
    assert key in result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
