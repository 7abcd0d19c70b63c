"""Real test runners on the pooled engine, each in a subprocess.

The project under test is ``tests/runner_project``: TestCase,
TransactionTestCase, LiveServerTestCase and StaticLiveServerTestCase on
three aliases (two on the same database, one a TEST MIRROR). Its tests
report the databases they saw to a file, so these tests can check that each
runner used pooled test databases of its own, and that every test database
was dropped without "being accessed by other users".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "tests" / "runner_project"
pytestmark = pytest.mark.slow


def run(argv: list[str], name: str, out: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(ROOT / "testproject"), str(ROOT)]),
        "RP_DB": name,
        "RP_OUT": str(out),
        "DJANGO_SETTINGS_MODULE": "rp_settings",
    }
    result = subprocess.run(
        [sys.executable, *argv], cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300
    )
    reports = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return result, reports


def databases(admin, prefix: str) -> set[str]:
    rows = admin.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", [f"%{prefix}%"])
    return {r[0] for r in rows}


def drop(admin, names: set[str]) -> None:
    for name in names:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def check_clean_run(result: subprocess.CompletedProcess[str], reports: list[dict[str, Any]]) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "being accessed by other users" not in output
    by_test = {r["test"] for r in reports}
    assert {"testcase", "transactiontestcase", "PooledLiveServerTestCase",
            "PooledStaticLiveServerTestCase"} <= by_test, (by_test, output[-3000:])
    for r in reports:
        if r["test"].endswith(".after_stop"):
            assert r["leased_by_others"] == 0, r  # the live server gave its connection back
        if "db" in r:
            assert r["db"].startswith("test_"), r


@pytest.mark.parametrize("extra", [[], ["--parallel", "2"]], ids=["serial", "parallel"])
def test_django_runner_with_live_server_and_several_aliases(extra: list[str], admin, tmp_path: Path) -> None:
    name = f"rp_dj_{'par' if extra else 'ser'}"
    result, reports = run(
        ["-m", "django", "test", "rp_app", "--noinput", "-v", "2", *extra], name, tmp_path / "out.jsonl"
    )
    check_clean_run(result, reports)
    testcase = next(r for r in reports if r["test"] == "testcase")
    assert testcase["other_db"].startswith(f"test_{name}_other")
    if extra:
        assert "Cloning test database" in result.stderr
        assert len({r["pid"] for r in reports if "db" in r}) == 2  # both workers ran tests
        assert all(r["db"] != f"test_{name}" for r in reports if "db" in r)  # on their clones
    assert databases(admin, name) == set()  # every test database dropped


def test_pytest_django_plain(admin, tmp_path: Path) -> None:
    name = "rp_pt_plain"
    result, reports = run(["-m", "pytest", "-q", "rp_app/tests.py"], name, tmp_path / "out.jsonl")
    check_clean_run(result, reports)
    assert {r["db"] for r in reports if "db" in r} == {f"test_{name}"}
    assert databases(admin, name) == set()


def test_pytest_django_reuse_db_keeps_and_reuses_the_database(admin, tmp_path: Path) -> None:
    name = "rp_pt_reuse"
    def oid() -> int:
        row = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", [f"test_{name}"]).fetchone()
        assert row is not None, "the test database was not kept"
        return int(row[0])

    try:
        oids = []
        for attempt in range(2):
            result, reports = run(
                ["-m", "pytest", "-q", "--reuse-db", "rp_app/tests.py"], name, tmp_path / f"out{attempt}.jsonl"
            )
            check_clean_run(result, reports)
            oids.append(oid())  # kept for the next run
        assert oids[0] == oids[1]  # the second run reused it
        result, reports = run(
            ["-m", "pytest", "-q", "--reuse-db", "--create-db", "rp_app/tests.py"], name, tmp_path / "out-create.jsonl"
        )
        check_clean_run(result, reports)
        assert oid() != oids[1]  # --create-db made it anew
    finally:
        drop(admin, databases(admin, name))


def test_pytest_xdist_workers_each_use_their_own_database(admin, tmp_path: Path) -> None:
    name = "rp_pt_xdist"
    result, reports = run(["-m", "pytest", "-q", "-n", "2", "rp_app/tests.py"], name, tmp_path / "out.jsonl")
    check_clean_run(result, reports)
    seen = [r for r in reports if "db" in r]
    assert {r["worker"] for r in seen} <= {"gw0", "gw1"}
    for r in seen:
        assert r["db"] == f"test_{name}_{r['worker']}", r  # each worker on its own database
    assert databases(admin, name) == set()
