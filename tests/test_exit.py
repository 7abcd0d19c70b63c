"""Pools close at interpreter exit: fast, quiet, and leaving no session behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

from tests.conftest import Make
from tests.helpers import backend_pids, wait_until

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"

CHILD = """
import os, sys, threading, time
import django
django.setup()
from django.db import connection, connections

def work():
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
    connections["default"].close()

threads = [threading.Thread(target=work) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
with connection.cursor() as cursor:  # left checked out by the main thread
    cursor.execute("SELECT pg_backend_pid()")
{extra}
print("MARK", time.time(), flush=True)
"""


def run_child(app: str, extra: str = "") -> tuple[float, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTPROJECT),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PGDATABASE": connection.settings_dict["NAME"],
        "PGAPPNAME": app,  # libpq's application_name, to find its sessions
    }
    proc = subprocess.Popen(
        [sys.executable, "-W", "default", "-c", CHILD.format(extra=extra)],
        cwd=TESTPROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    line = proc.stdout.readline()
    assert line.startswith("MARK"), (line, proc.stderr.read())
    marked = float(line.split()[1])
    proc.wait(30)
    exited = time.time()
    stderr = proc.stderr.read()
    assert proc.returncode == 0, stderr
    return exited - marked, stderr


def sessions_of(admin: psycopg.Connection[Any], app: str) -> int:
    return int(
        admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
        ).fetchone()[0]
    )


@pytest.mark.parametrize("extra", ["", "connection.close()"], ids=["checked-out", "returned"])
def test_pools_close_at_exit_quickly_and_quietly(transactional_db: None, admin, extra: str) -> None:
    app = f"pooled-exit-{len(extra)}"
    took, stderr = run_child(app, extra)
    assert took < 1.0, took
    assert stderr == ""  # no warnings, no thread-join errors
    wait_until(  # the server notices disconnections promptly
        lambda: sessions_of(admin, app) == 0,
        timeout=2,
        interval=0.02,
        message=f"no session of {app}",
    )


def test_close_pool_closes_its_sessions_and_a_new_pool_follows(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 2, "max_size": 2}, options={"application_name": "pooled-close"}
    )
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    pool = wrapper.pool
    wrapper.close_pool()
    assert pool.closed
    assert wrapper.connection is None
    wait_until(
        lambda: sessions_of(admin, "pooled-close") == 0,
        timeout=2,
        interval=0.02,
        message="no session of pooled-close",
    )
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert wrapper.pool is not pool and not wrapper.pool.closed
    assert backend_pids(admin, wrapper.settings_dict["NAME"])


LATE_HOOK_CHILD = """
import sys, threading, time
import django
django.setup()
from django.db import connections
from django_pooled_pg import pool

entered = threading.Event()

def slow(p, conn):  # a first connection still being set up when the process exits
    entered.set()
    time.sleep(0.5)

def later(p, conn):
    print("a first-connection hook ran on a closed pool", file=sys.stderr, flush=True)

pool.FIRST_CONNECTION_HOOKS[:0] = [slow]
pool.FIRST_CONNECTION_HOOKS.append(later)

def work():
    try:
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        pass  # the pool closed at exit under it

threading.Thread(target=work, daemon=True).start()
assert entered.wait(10)
print("MARK", time.time(), flush=True)
"""


def test_a_first_connection_set_up_during_exit_runs_no_more_hooks(transactional_db: None) -> None:
    # The sizing check (a first-connection hook) starts a thread: run once the
    # pool closed at exit, Python 3.12+ refused it and the exit logged an error.
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTPROJECT),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PGDATABASE": connection.settings_dict["NAME"],
    }
    proc = subprocess.run(
        [sys.executable, "-W", "default", "-c", LATE_HOOK_CHILD],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.startswith("MARK"), (proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
