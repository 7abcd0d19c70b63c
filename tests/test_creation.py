"""Test databases are created, cloned and destroyed with pools around.

CREATE DATABASE ... TEMPLATE and DROP DATABASE fail while any session is
connected, so every pooled connection to that database goes first, whichever
alias opened it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import Make
from tests.helpers import backend_pids

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def exists(admin: psycopg.Connection[Any], name: str) -> bool:
    return (
        admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is not None
    )


@pytest.fixture
def scratch(admin: psycopg.Connection[Any]) -> Iterator[str]:
    names = ["pooled_scratch", "pooled_scratch_1", "test_pooled_scratch"]
    for name in names:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.execute("CREATE DATABASE pooled_scratch")
    yield "pooled_scratch"
    for name in names:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def idle_pool_on(make_wrapper: Make, name: str, alias: str):
    wrapper = make_wrapper(pool={"min_size": 2, "max_size": 2}, alias=alias, NAME=name)
    twins = [wrapper.copy() for _ in range(2)]
    for twin in twins:
        with twin.cursor() as cursor:
            cursor.execute("SELECT 1")
    for twin in twins:
        twin.close()
    return wrapper


def test_destroy_closes_pooled_connections_of_every_alias(
    make_wrapper: Make, admin, scratch: str
) -> None:
    first = idle_pool_on(make_wrapper, scratch, "first")
    idle_pool_on(make_wrapper, scratch, "second")  # another alias, same database
    assert len(backend_pids(admin, scratch)) == 4
    first.creation._destroy_test_db(scratch, verbosity=0)
    assert not exists(admin, scratch)


def test_clone_closes_pooled_connections_to_the_template(
    make_wrapper: Make, admin, scratch: str
) -> None:
    first = idle_pool_on(make_wrapper, scratch, "first")
    idle_pool_on(make_wrapper, scratch, "second")
    first.creation._clone_test_db("1", verbosity=0)
    assert exists(admin, "pooled_scratch_1")


def test_create_over_an_existing_test_database_closes_its_pools(
    make_wrapper: Make, admin, scratch: str
) -> None:
    admin.execute("CREATE DATABASE test_pooled_scratch")
    idle_pool_on(make_wrapper, "test_pooled_scratch", "holder")
    creator = make_wrapper(pool={"max_size": 2}, alias="creator", NAME=scratch)
    creator.settings_dict["TEST"] = {**creator.settings_dict["TEST"], "NAME": "test_pooled_scratch"}
    creator.creation._create_test_db(verbosity=0, autoclobber=True, keepdb=False)
    assert exists(admin, "test_pooled_scratch")
    assert backend_pids(admin, "test_pooled_scratch") == set()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [[], ["--keepdb"], ["--parallel", "2"]], ids=["plain", "keepdb", "parallel"]
)
def test_manage_py_test_runs_on_the_pool(extra: list[str], admin) -> None:
    """Django's runner: test databases created, used through the pool, destroyed."""
    name = "pooled_runner"  # not this session's own test database
    env = {**os.environ, "PYTHONPATH": str(TESTPROJECT.parent), "PGDATABASE": name}
    result = subprocess.run(
        [sys.executable, "manage.py", "test", "demoapp", "--noinput", "-v", "2", *extra],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "being accessed by other users" not in output
    assert "OK" in output
    if "--parallel" in extra:
        assert "Cloning test database" in output  # the workers really forked
    if "--keepdb" not in extra:
        assert not exists(admin, f"test_{name}")
    admin.execute(f"DROP DATABASE IF EXISTS test_{name} WITH (FORCE)")
