"""The package's shape: no source file over 600 lines, and every module of racedit placed in a layer of the
import-linter contract (a module left out of it would be unchecked; `make test` runs lint-imports first)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (racedit runs on 3.10 too; CI uses 3.11)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "racedit"


def test_no_source_file_is_over_600_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert sizes and not {p: n for p, n in sizes.items() if n > 600}


def test_every_top_level_module_is_in_a_layer():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers" and "containers" not in c)["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    found = {f"racedit.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    found |= {f"racedit.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert found - named == set(), "add these modules to a layer of [tool.importlinter] in pyproject.toml"
