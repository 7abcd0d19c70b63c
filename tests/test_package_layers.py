"""The package's layering holds, and covers every module."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import django_pooled_pg

ROOT = Path(__file__).resolve().parent.parent


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    assert contract["containers"] == ["django_pooled_pg"]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint_imports is not None, "import-linter is a test dependency"
    result = subprocess.run([lint_imports], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_sits_in_a_layer() -> None:
    """A module left out of the layers could import anything, cycles included."""
    layers = _layers()
    modules = [
        m.name.removeprefix("django_pooled_pg.")
        for m in pkgutil.walk_packages(django_pooled_pg.__path__, "django_pooled_pg.")
        if not m.ispkg
    ]
    assert len(modules) > 15
    missing = [m for m in modules if not any(m == n or m.startswith(n + ".") for n in layers)]
    assert not missing, f"add these modules to the layers in pyproject.toml: {missing}"
