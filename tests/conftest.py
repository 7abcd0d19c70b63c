"""Fixtures: real PostgreSQL servers and pooled wrappers made to measure.

The session's server comes from ``testproject.settings``: a configured one
(DATABASE_URL or PG*), or a throwaway cluster started when settings load.
Tests that stop, restart or break a server get a private throwaway cluster.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection

from django_pooled_pg.base import DatabaseWrapper
from dpp_devtools import pgbouncer, replication, throwaway
from tests.helpers import db_settings

_aliases = itertools.count()

Make = Callable[..., DatabaseWrapper]


@pytest.fixture
def make_wrapper(transactional_db: None) -> Iterator[Make]:
    """Build pooled wrappers on the test database, each with its own alias.

    ``make_wrapper(pool={...}, options={...}, alias=..., **settings)``; all
    their pools are closed afterwards.
    """
    made: list[DatabaseWrapper] = []

    def make(
        pool: Any = True,
        alias: str | None = None,
        options: dict[str, Any] | None = None,
        settings: dict[str, Any] | None = None,
        **overrides: Any,
    ) -> DatabaseWrapper:
        s = settings if settings is not None else db_settings(**overrides)
        s["OPTIONS"] = {**s["OPTIONS"], **(options or {}), "pool": pool}
        wrapper = DatabaseWrapper(s, alias or f"t{next(_aliases)}")
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        wrapper.close()
        wrapper.close_pool()


@pytest.fixture
def admin(transactional_db: None) -> Iterator[psycopg.Connection[Any]]:
    """A superuser connection outside every pool, to look and to break."""
    s = connection.settings_dict
    conn = psycopg.connect(
        host=s["HOST"],
        port=s["PORT"],
        user=s["USER"],
        password=s["PASSWORD"],
        dbname="postgres",
        autocommit=True,
    )
    yield conn
    conn.close()


#: A role the session tests switch to (SET ROLE, SESSION AUTHORIZATION).
ROLE = "pooled_reset_role"


@pytest.fixture
def role(admin: psycopg.Connection[Any]) -> Iterator[str]:
    admin.execute(f"DROP ROLE IF EXISTS {ROLE}")
    admin.execute(f"CREATE ROLE {ROLE}")
    yield ROLE
    # The role may still own a backend's session authorization briefly.
    admin.execute(f"DROP ROLE IF EXISTS {ROLE}")


@pytest.fixture
def private_server(django_db_blocker: Any) -> Iterator[throwaway.ThrowawayServer]:
    """A throwaway cluster of this test's own, to stop and restart at will.

    Its database ``private`` is not the test database, so access is allowed
    without pytest-django's fixtures.
    """
    server = throwaway.start_private("private")
    with django_db_blocker.unblock():
        yield server
    server.destroy()


@pytest.fixture
def replicated(django_db_blocker: Any) -> Iterator[Callable[..., replication.ReplicatedPair]]:
    """Start a primary and its streaming standby: ``replicated(synchronous=False)``.

    Both are this test's own (database ``private``), destroyed afterwards.
    """
    started: list[replication.ReplicatedPair] = []

    def start(synchronous: bool = False) -> replication.ReplicatedPair:
        pair = replication.start_pair("private", synchronous=synchronous)
        started.append(pair)
        return pair

    with django_db_blocker.unblock():
        yield start
    for pair in started:
        pair.destroy()


@pytest.fixture(scope="session")
def pgbouncers() -> Iterator[Callable[[str], pgbouncer.ThrowawayPgBouncer]]:
    """PgBouncer in front of the session's server, one per pool mode, started on first use.

    PgBouncer's default configuration, as a new user meets it; tests that
    need other settings or a restart start their own.
    """
    started: dict[str, pgbouncer.ThrowawayPgBouncer] = {}

    def get(mode: str) -> pgbouncer.ThrowawayPgBouncer:
        if mode not in started:
            bouncer = pgbouncer.ThrowawayPgBouncer(server_conninfo(), mode=mode)
            bouncer.start()
            started[mode] = bouncer
        return started[mode]

    yield get
    for bouncer in started.values():
        bouncer.destroy()


def server_conninfo() -> dict[str, str]:
    """libpq settings of the session's server (the test database's host and login)."""
    s = connection.settings_dict
    return {
        "host": s["HOST"] or "127.0.0.1",
        "port": str(s["PORT"] or 5432),
        "user": s["USER"],
        "password": s["PASSWORD"],
        "dbname": s["NAME"],
    }


def pytest_report_header(config: pytest.Config) -> str:
    """The session's PostgreSQL. (Whether it is PGSERVER_VERSION's major is
    checked when the settings load, -q or not: see throwaway._check_major.)"""
    info = server_conninfo()
    with psycopg.connect(**{**info, "dbname": "postgres"}) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    server = throwaway.current_server()
    where = f"throwaway, {server.bindir}" if server else f"{info['host']}:{info['port']}"
    return f"postgresql: {version} ({where})"
