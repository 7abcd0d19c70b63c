#!/usr/bin/env python3
"""Run the project from a fresh clone: ``python3 dev.py demo`` or ``python3 dev.py test``.

Creates ``.venv`` beside this file on first use, installs the project with
its test dependencies and the development tools of ``devtools/`` (both
editable; again when either pyproject.toml changes), then runs:

* ``demo``: the test project on the pooled engine: migrate, serve a burst of
  real HTTP requests from several threads, print the pool's state;
* ``test [pytest args]``: the test suite (a throwaway PostgreSQL is started
  when none is configured; see README).
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


def ensure_venv() -> None:
    stamp = VENV / ".installed"
    digest = hashlib.sha256()
    for project in PROJECTS:
        digest.update((project / "pyproject.toml").read_bytes())
    want = digest.hexdigest()
    if stamp.exists() and stamp.read_text() == want and PYTHON.exists():
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV} with {sys.executable}", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print(
        "dev.py: installing django-pooled-pg, its test dependencies and devtools/",
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
            f"{ROOT}[test]",
        ],
        check=True,
    )
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command == "demo":
        args = [str(PYTHON), str(ROOT / "testproject" / "manage.py"), "demo", *rest]
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
