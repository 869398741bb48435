"""Config errors: every problem of a file at once, unknown keys first, each with its path and a
did-you-mean; a key written twice is an error too (issue 11, item 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import load_config, parse_config
from core.errors import ConfigError, ConfigErrors
from dualwrite.cli import main

_MAPPING = """
mappings:
  - name: items
    source: items
    target: v2.items
    key: [id]
    colums: {id: id, label: label}
    moed: sync
  - name: Orders
    source: orders
    target: v2.orders
    key: [id]
    columns: {id: id}
applier:
  workers: 0
"""


def test_a_misspelt_required_key_is_the_unknown_key_with_a_suggestion_not_a_missing_one():
    with pytest.raises(ConfigError) as bad:
        parse_config(
            {
                "mappings": [
                    {
                        "name": "m",
                        "source": "a",
                        "target": "b",
                        "key": ["id"],
                        "colums": {"id": "id"},
                    }
                ]
            }
        )
    assert bad.value.path == "mappings[0].colums"
    assert str(bad.value) == "mappings[0].colums: unknown key (did you mean 'columns'?)"
    assert "required key is missing" not in str(bad.value)


def test_every_error_is_reported_unknown_keys_first_each_with_its_path(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(_MAPPING)
    with pytest.raises(ConfigErrors) as bad:
        load_config(path)
    assert bad.value.problems == [
        ("mappings[0].colums", "unknown key (did you mean 'columns'?)"),
        ("mappings[0].moed", "unknown key (did you mean 'mode'?)"),
        ("applier.workers", "Input should be greater than or equal to 1"),
        (
            "mappings[1].name",
            "must be lower-case letters, digits and _ (max 63), starting with a letter",
        ),
    ]
    assert str(bad.value).startswith(f"{path}: 4 errors:\n  mappings[0].colums: unknown key")


def test_an_unknown_key_far_from_any_known_one_has_no_suggestion():
    with pytest.raises(ConfigError) as bad:
        parse_config({"reconcile": {"zzz_qqq": 1}})
    assert str(bad.value) == "reconcile.zzz_qqq: unknown key"


def test_a_key_written_twice_is_an_error_with_both_lines(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("applier:\n  workers: 2\n  batch_size: 10\n  workers: 4\n")
    with pytest.raises(ConfigError) as bad:
        load_config(path)
    assert bad.value.path == "applier.workers"
    assert "duplicate key (line 4, first on line 2)" in str(bad.value)


def test_the_cli_prints_every_error_and_exits_2_before_touching_the_database(
    db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    data = yaml.safe_load(_MAPPING)
    data["service_dsn"] = db.dsn
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dualwrite: config error: {path}: 4 errors:\n")
    assert "  mappings[0].colums: unknown key (did you mean 'columns'?)\n" in err
    assert "  applier.workers: " in err
    assert db.scalar("SELECT to_regnamespace('dualwrite') IS NULL")


def test_a_wal_transport_other_than_stream_or_poll_is_refused_with_its_path():
    assert parse_config({"wal": {"transport": "poll"}}).wal.transport == "poll"
    assert parse_config({}).wal.transport == "stream"
    with pytest.raises(ConfigError) as bad:
        parse_config({"wal": {"transport": "streaming"}})
    assert str(bad.value).startswith("wal.transport: ")
    assert "'stream' or 'poll'" in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        parse_config({"wal": {"transprot": "poll"}})
    assert str(bad.value) == "wal.transprot: unknown key (did you mean 'transport'?)"
