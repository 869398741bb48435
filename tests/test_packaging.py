"""The wheel the Dockerfile builds: what it contains, and that it runs outside the source tree.

No Docker engine runs here, so the image itself is not built; this test does the Dockerfile's
build stage (`pip wheel` from a copy of the sources it COPYs) and checks the result the way the
runtime stage would use it: imported from the installed files alone, with the C scanner built,
the demo's SQL inside, the console script declared, and `dualwrite check` working.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: what the Dockerfile's build stage copies
COPIED = (
    "pyproject.toml", "setup.py", "README.md", "dualwrite", "proxy", "compare", "lint", "mirror",
    "core",
)
HAVE_COMPILER = any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in COPIED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheels")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("dualwrite-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def run_installed(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Python with the installed files first on the path, from a directory outside the repo."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run(
        [sys.executable, *args],
        cwd=site.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_wheel_holds_the_packages_their_data_and_the_c_extensions(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("dualwrite", "proxy", "compare", "lint", "mirror", "core"):
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    assert {"dualwrite/demo/pos_v1.sql", "dualwrite/demo/pos_v2.sql"} <= set(names)
    assert "lint/squawk.toml" in names
    has_scanner = any(n.startswith("proxy/wire/_speedups") and n.endswith(".so") for n in names)
    assert has_scanner == HAVE_COMPILER
    has_loop = any(n.startswith("proxy/wire/_relayloop") and n.endswith(".so") for n in names)
    assert has_loop == HAVE_COMPILER
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "dualwrite = dualwrite.cli:main" in text


def test_the_installed_files_import_and_run_on_their_own(installed: Path):
    probe = run_installed(
        installed,
        "-c",
        "import dualwrite, proxy, compare, lint, mirror, core\n"
        "from proxy.wire import frames\n"
        "from dualwrite.demo import run\n"
        "print(dualwrite.__file__, proxy.__file__, compare.__file__, mirror.__file__,"
        " core.__file__, frames.ACCELERATED)\n"
        "print(len(run._sql('pos_v1.sql')))",
    )
    assert probe.returncode == 0, probe.stderr
    first = probe.stdout.splitlines()[0].split()
    assert all(path.startswith(str(installed)) for path in first[:5]), first
    # without a C compiler the wheel carries the pure-Python scanner only, and still works
    assert first[5] == str(HAVE_COMPILER), "C frame scanner built: expected exactly with a compiler"
    assert int(probe.stdout.splitlines()[1]) > 1000  # the demo's schema, read as package data


def test_dualwrite_check_offline_from_the_installed_files(installed: Path):
    done = run_installed(
        installed,
        "-m",
        "dualwrite",
        "check",
        "--offline",
        "--config",
        str(ROOT / "config/split-users.yaml"),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    bad = installed.parent / "bad.yaml"
    bad.write_text("listen: {port: 6432, hots: x}\n")
    refused = run_installed(
        installed, "-m", "dualwrite", "check", "--offline", "--config", str(bad)
    )
    assert refused.returncode == 2
    assert "listen.hots" in refused.stderr + refused.stdout
