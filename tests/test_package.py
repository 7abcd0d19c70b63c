"""The release: an sdist and a wheel that pass ``twine check``, and the wheel
installed into a clean virtual environment running a Django project.

Slow: ``python -m build`` makes its own build environment, and the clean
environment installs Django and psycopg from the package index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import django
import pytest
from django.db import connection

import django_pooled_pg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent

SETTINGS = """
import os
SECRET_KEY = "package-test"
USE_TZ = True
INSTALLED_APPS = ["django_pooled_pg"]
DATABASES = {
    "default": {
        "ENGINE": "django_pooled_pg",
        "NAME": os.environ["APP_DB_NAME"],
        "USER": os.environ["APP_DB_USER"],
        "PASSWORD": os.environ["APP_DB_PASSWORD"],
        "HOST": os.environ["APP_DB_HOST"],
        "PORT": os.environ["APP_DB_PORT"],
        "OPTIONS": {"pool": {"max_size": 2}},
    }
}
"""

RUN = """
import importlib.metadata, io, json, threading
import django
django.setup()
from django.core.management import call_command
from django.db import connection, connections
import django_pooled_pg

def request():
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    connections["default"].close()

threads = [threading.Thread(target=request) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
request()
out = io.StringIO()
call_command("check", stdout=out)
table = io.StringIO()
call_command("poolstats", "--local", stdout=table)
print(json.dumps({
    "file": django_pooled_pg.__file__,
    "version": django_pooled_pg.__version__,
    "metadata_version": importlib.metadata.version("django-pooled-pg"),
    "checkouts": django_pooled_pg.stats("default").counters.checkouts,
    "size": django_pooled_pg.stats("default").live.size,
    "poolstats": table.getvalue(),
}))
"""


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, **kwargs
    )
    assert result.returncode == 0, f"{argv}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_the_wheel_installs_into_a_clean_environment_and_runs_a_django_project(
    tmp_path: Path,
) -> None:
    version = django_pooled_pg.__version__
    dist = tmp_path / "dist"
    # The sdist first, then the wheel built from it: the sdist is complete.
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    wheel = dist / f"django_pooled_pg-{version}-py3-none-any.whl"
    sdist = dist / f"django_pooled_pg-{version}.tar.gz"
    assert sorted(dist.iterdir()) == sorted([wheel, sdist])
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {"django_pooled_pg/py.typed", "django_pooled_pg/schemes.py"} <= names
    assert not any(n.startswith(("tests/", "devtools/", "testproject/")) for n in names)
    checked = run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)
    assert checked.stdout.count("PASSED") == 2, checked.stdout

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    # The Django series this session tests: the newest Django may not support
    # the server (Django 6.x needs PostgreSQL 15, the pg14 tox env runs 14).
    run(
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        wheel,
        "psycopg[binary]",
        f"Django~={django.VERSION[0]}.{django.VERSION[1]}.0",
    )

    project = tmp_path / "project"
    project.mkdir()
    (project / "settings.py").write_text(textwrap.dedent(SETTINGS))
    s = connection.settings_dict
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DJANGO_SETTINGS_MODULE")}
    env.update(
        PYTHONPATH=str(project),
        DJANGO_SETTINGS_MODULE="settings",
        APP_DB_NAME=s["NAME"],
        APP_DB_USER=s["USER"],
        APP_DB_PASSWORD=s["PASSWORD"],
        APP_DB_HOST=s["HOST"],
        APP_DB_PORT=str(s["PORT"]),
    )
    result = run(python, "-c", RUN, cwd=tmp_path, env=env)
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(venv)), got["file"]  # the wheel, not this tree
    assert got["version"] == got["metadata_version"] == version
    assert got["checkouts"] == 5 and 1 <= got["size"] <= 2
    assert "default" in got["poolstats"]
    if s["PASSWORD"]:
        assert s["PASSWORD"] not in got["poolstats"]
