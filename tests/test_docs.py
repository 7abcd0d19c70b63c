"""The docs say what the code does."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from django_pooled_pg.observability.records import PoolConfig
from django_pooled_pg.options import OPTIONS

ROOT = Path(__file__).resolve().parent.parent


def test_option_tables_match_the_options_module() -> None:
    """docs/configuration.md and the README's table are made from the options."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_options.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_readme_lists_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    for option in OPTIONS:
        assert f"| `{option.name}` |" in readme, option.name


def test_poolstats_config_shows_exactly_the_options_marked_shown() -> None:
    """PoolConfig is spelled out for the JSON schema; the options table decides its fields."""
    fields = [f.name for f in dataclasses.fields(PoolConfig)]
    assert fields == ["database", "user"] + [o.name for o in OPTIONS if o.shown]
