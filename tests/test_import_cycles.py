"""scripts/check_import_cycles.py: finds every cycle, TYPE_CHECKING too; allowed ones only warn."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_import_cycles.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_import_cycles", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cycles_are_the_components_of_more_than_one_module():
    script = _script()
    imports = {
        "a": {"b"},
        "b": {"c"},
        "c": {"a", "d"},
        "d": {"e"},
        "e": {"d"},
        "f": {"a"},
        "g": set(),
    }
    assert script.cycles(imports) == [["a", "b", "c"], ["d", "e"]]
    assert script.closing_chain(imports, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    assert script.cycles({"x": {"y"}, "y": set()}) == []


def test_a_deep_chain_does_not_exhaust_the_stack():
    script = _script()
    depth = sys.getrecursionlimit() * 2
    imports = {f"m{i}": {f"m{i + 1}"} for i in range(depth)}
    imports[f"m{depth}"] = {"m0"}
    (component,) = script.cycles(imports)
    assert len(component) == depth + 1


def _package(root: Path, name: str, modules: dict[str, str]) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    for module, source in modules.items():
        (folder / f"{module}.py").write_text(source)


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def test_a_type_checking_cycle_fails_and_an_allowed_one_warns(tmp_path):
    _package(
        tmp_path,
        "pkgone",
        {
            "left": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from pkgone import right\n"
            ),
            "right": "from pkgone import left\n",
            "alone": "import pkgone.left\n",
        },
    )
    found = _run(tmp_path, "pkgone")
    assert found.returncode == 1
    assert "import cycle among pkgone.left, pkgone.right" in found.stdout
    assert "pkgone.left -> pkgone.right -> pkgone.left" in found.stdout

    allowed = _run(tmp_path, "--allow", "pkgone.right,pkgone.left", "pkgone")
    assert allowed.returncode == 0, allowed.stdout
    assert "warning: allowed import cycle: pkgone.left -> pkgone.right" in allowed.stderr

    # an allow-list that is not exactly the cycle tolerates nothing
    partial = _run(tmp_path, "--allow", "pkgone.right,pkgone.alone", "pkgone")
    assert partial.returncode == 1
    assert "matches no cycle now" in partial.stderr


def test_usage_errors_exit_2(tmp_path):
    result = _run(tmp_path, "--allow", "pkgone.left", "pkgone")
    assert result.returncode == 2
    assert "at least 2 modules" in result.stderr
