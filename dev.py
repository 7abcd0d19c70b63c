#!/usr/bin/env python3
"""Run the project from a fresh clone: ``python3 dev.py demo``, ``test`` or ``docs``.

Creates ``.venv`` beside this file on first use, installs the project with
its test dependencies and the development tools of ``devtools/`` (both
editable; again when either pyproject.toml changes), then runs:

* ``demo``: the test project on the pooled engine: migrate, serve a burst of
  real HTTP requests from several threads, print the pool's state;
* ``test [pytest args]``: the test suite (a throwaway PostgreSQL is started
  when none is configured; see README);
* ``docs [mkdocs build args]``: the documentation site, built from docs/
  into site/ with ``mkdocs build --strict`` (a broken link fails it);
* ``docs serve [mkdocs serve args]``: the site on http://127.0.0.1:8000,
  rebuilt when a page changes.

``docs`` also installs the project's ``docs`` extra (MkDocs, Material) the
first time; the venv keeps it from then on.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("DEV_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / "python"


#: What the venv is installed from: a change to either reinstalls it.
PROJECTS = (ROOT / "devtools", ROOT)

#: The extras of pyproject.toml each command needs.
EXTRAS = {"demo": ("test",), "test": ("test",), "docs": ("test", "docs")}

#: Where ``dev.py docs`` builds the site (git-ignored).
SITE = ROOT / "site"


def read_stamp(stamp: Path) -> tuple[str, set[str]]:
    """The pyproject digest the venv was installed for, and the extras installed.

    The stamp is the digest, then a line of comma-separated extras; a stamp
    of one line (written before extras were recorded) means ``test``.
    """
    if not stamp.exists():
        return "", set()
    digest, _, extras = stamp.read_text().partition("\n")
    return digest, set(filter(None, extras.strip().split(","))) if extras else {"test"}


def ensure_venv(extras: tuple[str, ...] = ("test",)) -> None:
    stamp = VENV / ".installed"
    digest = hashlib.sha256()
    for project in PROJECTS:
        digest.update((project / "pyproject.toml").read_bytes())
    want = digest.hexdigest()
    installed_for, installed = read_stamp(stamp)
    # Extras installed once stay installed: `dev.py test` after `dev.py docs`
    # does not reinstall, and a reinstall keeps them.
    needed = installed | set(extras)
    if installed_for == want and needed <= installed and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV} with {sys.executable}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    names = ",".join(sorted(needed))
    print(
        f"dev.py: installing django-pooled-pg with its extras [{names}] and devtools/",
        file=sys.stderr,
    )
    subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-e",
            str(ROOT / "devtools"),
            "-e",
            f"{ROOT}[{names}]",
        ],
        check=True,
    )
    stamp.write_text(f"{want}\n{names}\n")


def docs_command(rest: list[str]) -> list[str]:
    """``mkdocs build --strict`` into site/, or ``mkdocs serve`` after ``serve``."""
    mkdocs = [str(PYTHON), "-m", "mkdocs"]
    config = ["--config-file", str(ROOT / "mkdocs.yml")]
    if rest[:1] == ["serve"]:
        return [*mkdocs, "serve", *config, *rest[1:]]
    return [*mkdocs, "build", "--strict", *config, "--site-dir", str(SITE), *rest]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_venv(EXTRAS[command])
    if command == "demo":
        args = [str(PYTHON), str(ROOT / "testproject" / "manage.py"), "demo", *rest]
    elif command == "docs":
        args = docs_command(rest)
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
