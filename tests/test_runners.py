"""Real test runners on the pooled engine, and settings overrides on pooled sessions.

The runners (Django's, pytest-django, pytest-xdist) run the fixture project
``tests/runner_project`` in a subprocess, each on databases of its own
(``RP_DB``). Its tests report what they saw (test database by Django's name
and the server's, backend pids, pool stats after a live server stopped) to
a file, which these tests check along with the runner's output and the
databases left on the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection
from django.db.backends.postgresql.base import DatabaseWrapper as StockWrapper
from django.test import override_settings

from tests.helpers import db_settings, run_in_thread

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ROOT / "tests" / "runner_project"
LIVE_CLASSES = ("PooledLiveServerTestCase", "PooledStaticLiveServerTestCase")

Admin = psycopg.Connection[Any]
Report = dict[str, Any]


class Run:
    """One runner's subprocess: its result, its output, what its tests reported."""

    def __init__(self, argv: list[str], name: str, out: Path) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(PROJECT), str(ROOT)]),
            "RP_DB": name,
            "RP_OUT": str(out),
            "DJANGO_SETTINGS_MODULE": "rp_settings",
        }
        env.pop("PYTEST_XDIST_WORKER", None)  # when this file itself runs under xdist
        env.pop("PYTEST_CURRENT_TEST", None)
        self.result = subprocess.run(
            [sys.executable, *argv],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        self.output = self.result.stdout + self.result.stderr
        lines = out.read_text().splitlines() if out.exists() else []
        self.reports: list[Report] = [json.loads(line) for line in lines]
        out.unlink(missing_ok=True)

    def by_test(self, test: str) -> list[Report]:
        return [r for r in self.reports if r["test"] == test]

    def check_clean(self) -> None:
        """Exit 0, every test database dropped without a session left on it."""
        assert self.result.returncode == 0, self.output[-6000:]
        assert "being accessed by other users" not in self.output
        assert "Traceback" not in self.output, self.output[-6000:]

    def check_databases(self) -> None:
        """Each report's database: Django's name for it is the server's."""
        seen = [r for r in self.reports if "db" in r]
        assert seen, self.output[-3000:]
        for r in seen:
            assert r["db"] == r["settings_name"], r
            assert r["db"].startswith("test_"), r

    def check_pool_reuse(self, test: str) -> None:
        """close() gave the connection back: no reopen opened a new connection,
        and after a pause each got the same server session back."""
        (r,) = self.by_test(test)
        seen = r["reopen"]
        assert seen["new_connections"] == 0, r
        assert seen["paused"] == [seen["own"]] * 3, r

    def check_live_servers(self, tests: tuple[str, ...] = LIVE_CLASSES) -> None:
        """Each live server's view read the committed rows on a session of its own,
        and after the server stopped nothing was checked out and the view's
        session sat idle in the pool, reset (DISCARD ALL) when it was returned."""
        for test in tests:
            (seen,) = self.by_test(test)
            assert seen["texts"] == ["live"], seen
            assert seen["server_pid"] != seen["test_pid"], seen
            (after,) = self.by_test(test + ".after_stop")
            assert after["in_use"] == 0, after
            assert after["server_pid"] == seen["server_pid"], after
            assert after["server_session"] == ["idle", "DISCARD ALL"], after


def leftover_databases(admin: Admin, name: str) -> set[str]:
    rows = admin.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", [f"test\\_{name}%"]
    )
    return {r[0] for r in rows}


def database_oid(admin: Admin, dbname: str) -> int | None:
    row = admin.execute("SELECT oid FROM pg_database WHERE datname = %s", [dbname]).fetchone()
    return int(row[0]) if row else None


@pytest.fixture
def runner_db(admin: Admin) -> Iterator[str]:
    """A database name for one runner test; any test database left is dropped."""

    def drop() -> None:
        for dbname in leftover_databases(admin, name):
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')

    name = "rp_" + os.urandom(3).hex()
    drop()
    yield name
    drop()


# -- Django's runner --------------------------------------------------------


@pytest.mark.slow
def test_django_runner_runs_every_test_class_on_pooled_test_databases(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """manage.py test: TestCase, TransactionTestCase and both live server classes
    on pooled connections; the live servers give their connections back, so
    the test databases are dropped at the end."""
    run = Run(
        ["-m", "django", "test", "rp_app", "--noinput", "-v", "2"],
        runner_db,
        tmp_path / "out.jsonl",
    )
    run.check_clean()
    assert "Ran 6 tests" in run.output and "\nOK" in run.output, run.output[-3000:]
    run.check_databases()
    assert {r["db"] for r in run.reports if "db" in r} == {f"test_{runner_db}"}
    (testcase,) = run.by_test("testcase")
    assert testcase["other_db"] == f"test_{runner_db}_other"
    run.check_pool_reuse("transactiontestcase")
    run.check_live_servers()
    assert leftover_databases(admin, runner_db) == set()


@pytest.mark.slow
def test_django_runner_parallel_workers_use_their_clones(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """--parallel 2: clones made while pools are open, used by forked workers, dropped."""
    run = Run(
        ["-m", "django", "test", "rp_app", "--noinput", "-v", "2", "--parallel", "2"],
        runner_db,
        tmp_path / "out.jsonl",
    )
    run.check_clean()
    assert "Cloning test database" in run.output
    run.check_databases()
    dbs = {r["db"] for r in run.reports if "db" in r}
    assert dbs <= {f"test_{runner_db}_1", f"test_{runner_db}_2"}, dbs
    assert len({r["pid"] for r in run.reports if "db" in r}) == 2  # both workers ran tests
    run.check_pool_reuse("transactiontestcase")
    run.check_live_servers()
    assert leftover_databases(admin, runner_db) == set()


# -- pytest-django -----------------------------------------------------------

PYTEST = ["-m", "pytest", "-q", "-p", "no:randomly"]
PYTEST_TESTS = (
    "testcase",
    "transactiontestcase",
    *LIVE_CLASSES,
    "pytest_db",
    "pytest_transactional_db",
    "pytest_live_server",
)


def check_pytest_run(run: Run, dbname: str) -> set[int]:
    """Every test ran on *dbname* through the pool; the database oids seen."""
    run.check_clean()
    assert "9 passed" in run.output, run.output[-3000:]
    run.check_databases()
    assert {r["test"] for r in run.reports} >= set(PYTEST_TESTS)
    assert {r["db"] for r in run.reports if "db" in r} == {dbname}
    run.check_pool_reuse("transactiontestcase")
    run.check_pool_reuse("pytest_transactional_db")
    run.check_live_servers()
    (live,) = run.by_test("pytest_live_server")
    assert live["texts"] == ["from pytest"] and live["server_pid"] != live["test_pid"], live
    return {r["oid"] for r in run.reports if "oid" in r}


@pytest.mark.slow
def test_pytest_django_creates_uses_and_drops_a_pooled_test_database(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """Plain pytest-django: Django's test classes and pytest-django's db,
    transactional_db and live_server fixtures on one pooled test database."""
    run = Run([*PYTEST, "rp_app"], runner_db, tmp_path / "out.jsonl")
    check_pytest_run(run, f"test_{runner_db}")
    assert leftover_databases(admin, runner_db) == set()


@pytest.mark.slow
def test_pytest_django_reuse_db_keeps_the_database_for_the_next_run(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """--reuse-db: the first run leaves its test database, the second runs on
    that same database (same oid), and --create-db with it makes a new one."""
    dbname = f"test_{runner_db}"
    oids = []
    for attempt in range(2):
        run = Run([*PYTEST, "--reuse-db", "rp_app"], runner_db, tmp_path / "out.jsonl")
        assert check_pytest_run(run, dbname) == {database_oid(admin, dbname)}, attempt
        oids.append(database_oid(admin, dbname))
        assert oids[-1] is not None, "the test database was not kept"
        assert not admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", [dbname]
        ).fetchall()  # and nothing is left connected to it
    assert oids[0] == oids[1]  # reused, not re-created

    run = Run([*PYTEST, "--reuse-db", "--create-db", "rp_app"], runner_db, tmp_path / "out.jsonl")
    (recreated,) = check_pytest_run(run, dbname)
    assert recreated != oids[1]
    assert database_oid(admin, dbname) == recreated  # re-created, and kept again


@pytest.mark.slow
def test_pytest_django_create_db_replaces_a_leftover_test_database(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """--create-db over a test database left by an earlier run: dropped and
    created anew before the tests, dropped at the end."""
    dbname = f"test_{runner_db}"
    admin.execute(f'CREATE DATABASE "{dbname}"')
    stale = database_oid(admin, dbname)
    run = Run([*PYTEST, "--create-db", "rp_app"], runner_db, tmp_path / "out.jsonl")
    (used,) = check_pytest_run(run, dbname)
    assert used != stale
    assert leftover_databases(admin, runner_db) == set()


@pytest.mark.slow
def test_pytest_xdist_workers_each_use_their_own_pooled_database(
    admin: Admin, runner_db: str, tmp_path: Path
) -> None:
    """-n 2: worker gwN runs on test_<name>_gwN, through its own pools, and
    both databases are dropped at the end."""
    run = Run([*PYTEST, "-n", "2", "rp_app"], runner_db, tmp_path / "out.jsonl")
    run.check_clean()
    assert "9 passed" in run.output, run.output[-3000:]
    run.check_databases()
    seen = [r for r in run.reports if "db" in r]
    for r in seen:
        assert r["db"] == f"test_{runner_db}_{r['worker']}", r
    assert {r["worker"] for r in seen} == {"gw0", "gw1"}  # both workers ran tests
    assert len({r["pid"] for r in seen}) == 2
    # Both workers' databases existed at once: each saw its own oid.
    assert len({(r["worker"], r["oid"]) for r in seen}) == 2
    run.check_pool_reuse("transactiontestcase")
    run.check_live_servers(tuple(t for t in LIVE_CLASSES if run.by_test(t)))
    assert leftover_databases(admin, runner_db) == set()


# -- TIME_ZONE overrides on pooled connections ---------------------------------


def show_timezone() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW TimeZone")
        return str(cursor.fetchone()[0])


def stock_timezone() -> str:
    """SHOW TimeZone on Django's own postgresql backend under the current settings."""
    settings = db_settings()
    settings["OPTIONS"] = {k: v for k, v in settings["OPTIONS"].items() if k != "pool"}
    stock = StockWrapper(settings, alias="stock")
    try:
        with stock.cursor() as cursor:
            cursor.execute("SHOW TimeZone")
            return str(cursor.fetchone()[0])
    finally:
        stock.close()


def timezone_everywhere() -> list[str]:
    """The zone in the connection in hand, after a return and checkout, and in
    a connection another thread checks out."""
    seen = [show_timezone()]
    connection.close()  # back to the pool
    seen.append(show_timezone())
    seen.append(run_in_new_thread(show_timezone))
    return seen


def run_in_new_thread(fn: Any) -> Any:
    from django.db import connections

    def target() -> Any:
        try:
            return fn()
        finally:
            connections.close_all()

    return run_in_thread(target)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/Sao_Paulo"])
def test_time_zone_override_follows_pooled_connections(transactional_db: None, zone: str) -> None:
    """override_settings(TIME_ZONE=..., USE_TZ=False) sets the session's zone
    (Django's rule: without USE_TZ the connection uses TIME_ZONE) on the
    connection in hand and on every later checkout; afterwards, the original
    zone again, also for a connection that was used inside the override."""
    original = show_timezone()
    assert original == "UTC"
    with override_settings(TIME_ZONE=zone, USE_TZ=False):
        assert show_timezone() == zone  # the connection in hand was switched
        assert timezone_everywhere() == [zone, zone, zone]
        assert stock_timezone() == zone  # as on Django's own backend
    assert show_timezone() == original  # switched back in hand
    assert timezone_everywhere() == [original, original, original]


def test_nested_time_zone_overrides_restore_each_zone(transactional_db: None) -> None:
    """An override inside another, each with a return to the pool in between:
    every level sees its own zone, and leaving it brings back the outer one."""
    with override_settings(TIME_ZONE="Asia/Tokyo", USE_TZ=False):
        connection.close()
        assert show_timezone() == "Asia/Tokyo"
        with override_settings(TIME_ZONE="America/New_York"):
            assert show_timezone() == "America/New_York"
            connection.close()
            assert show_timezone() == "America/New_York"
        assert show_timezone() == "Asia/Tokyo"
        connection.close()
        assert show_timezone() == "Asia/Tokyo"
    connection.close()
    assert show_timezone() == "UTC"


def test_time_zone_override_with_use_tz_keeps_the_session_zone_as_django_does(
    transactional_db: None,
) -> None:
    """With USE_TZ=True Django talks to PostgreSQL in the database's TIME_ZONE
    (UTC unless DATABASES sets one), whatever settings.TIME_ZONE says: the
    pooled engine must not switch zones where Django's backend does not."""
    with override_settings(TIME_ZONE="Asia/Tokyo", USE_TZ=True):
        expected = stock_timezone()
        assert expected == "UTC"
        assert timezone_everywhere() == [expected] * 3
    assert timezone_everywhere() == ["UTC"] * 3


def test_database_time_zone_with_use_tz_follows_pooled_connections(transactional_db: None) -> None:
    """With USE_TZ=True, DATABASES[...]["TIME_ZONE"] sets the session's zone
    (as Django's own time zone tests change it): on every later checkout too,
    and back to UTC once restored."""
    saved = connection.settings_dict["TIME_ZONE"]
    try:
        connection.settings_dict["TIME_ZONE"] = "Asia/Tokyo"
        with override_settings(USE_TZ=True):  # its signal recomputes the wrapper's zone
            # Every thread's wrapper shares the settings dict: the thread's too.
            assert timezone_everywhere() == ["Asia/Tokyo"] * 3
            connection.settings_dict["TIME_ZONE"] = saved
    finally:
        connection.settings_dict["TIME_ZONE"] = saved
    assert timezone_everywhere() == ["UTC"] * 3
