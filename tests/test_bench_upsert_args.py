"""Argument parsing of ``python -m bench upsert`` (no database needed)."""

from __future__ import annotations

import pytest

from bench import upsert


def test_defaults_and_variants() -> None:
    args = upsert.parse([])
    assert (args.rounds, args.rows, args.db) == (3, 500, "bulk_upsert_bench")
    names = [v.name for v in upsert.variants(args.rows)]
    assert names == ["none", "a", "b", "c", "c2", "d", "e"]


def test_rejects_preload_below_rows() -> None:
    with pytest.raises(SystemExit):
        upsert.parse(["--rows", "500", "--preload", "100"])
