"""The README keeps up with the code: every config key, every metric, the CI test command."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel

from core import metrics
from core.config import Config, MappingConfig

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{prefix}{name}.")
        elif name != "mappings":
            keys.append(f"{prefix}{name}")
    return keys


def test_every_config_key_is_in_the_readme_reference() -> None:
    missing = [
        key
        for key in _leaf_keys(Config) + [f"mappings[].{k}" for k in _leaf_keys(MappingConfig)]
        if key.rpartition(".")[2] not in README
    ]
    assert not missing, f"README's configuration reference lacks: {missing}"


def test_every_metric_is_in_the_readme() -> None:
    source = (REPO / "core" / "metrics.py").read_text(encoding="utf-8")
    names = set(re.findall(r'"dualwrite_([a-z_]+)"', source))
    assert names, "no metric names found in metrics.py"
    assert metrics.HOT is not None
    bare = {n.removesuffix("_total") for n in names} - {"build"}
    missing = sorted(n for n in bare if n not in README)
    assert not missing, f"README's metrics list lacks: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in README
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^exec make test\s*$", ci, re.MULTILINE)
