"""The docs say what the code does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from django_pooled_pg.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_options_module() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_options.py"), "--check"], capture_output=True
    )
    assert result.returncode == 0, "docs/configuration.md is stale: run docs/gen_options.py"


def test_readme_lists_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert f"`{option.name}`" in readme, option.name
