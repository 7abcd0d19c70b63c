"""The connection strategies the benchmarks compare, defined once.

``bench/suite.py`` measures each in a process of its own; ``bench/e2e.py``
serves the test project with some of them under gunicorn, naming one in
``TESTPROJECT_DB_STRATEGY``, which ``testproject/settings.py`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PG = "django.db.backends.postgresql"
OURS = "django_pooled_pg"
DBCP = "dj_db_conn_pool.backends.postgresql"


@dataclass(frozen=True)
class Strategy:
    engine: str
    #: CONN_MAX_AGE: 0 closes the connection after each request, None keeps it.
    conn_max_age: float | None
    #: Pool options on top of the sizes and timeout; None: no pool.
    pool: dict[str, Any] | None = field(default=None, hash=False)


STRATEGIES: dict[str, Strategy] = {
    "connect per request": Strategy(PG, 0),
    "persistent": Strategy(PG, None),
    "django pool": Strategy(PG, 0, {}),
    "ours (defaults)": Strategy(OURS, 0, {}),  # reset_session="auto"
    "ours reset_session=True": Strategy(OURS, 0, {"reset_session": True}),
    "ours reset_session=False": Strategy(OURS, 0, {"reset_session": False}),
    "ours stats=False": Strategy(OURS, 0, {"stats": False}),
    "django-db-connection-pool": Strategy(DBCP, 0, {}),
}
#: The strategies that pool connections.
POOLS = [name for name, s in STRATEGIES.items() if s.pool is not None]


@dataclass(frozen=True)
class Behind:
    """A strategy of STRATEGIES, directly or through a PgBouncer in some pool mode."""

    strategy: str
    pgbouncer: str | None  # PgBouncer's pool_mode; None: straight to the server
    pool: dict[str, Any] = field(default_factory=dict, hash=False)  # more pool options


#: What bench/suite.py's "pgbouncer" scenario compares (ratios to "ours direct").
POOLER_STRATEGIES: dict[str, Behind] = {
    "ours direct": Behind("ours (defaults)", None),
    "ours direct reset_session=False": Behind("ours reset_session=False", None),
    "ours via pgbouncer session": Behind("ours (defaults)", "session"),
    "ours via pgbouncer session reset_session=False": Behind("ours reset_session=False", "session"),
    "ours via pgbouncer transaction (pgbouncer option)": Behind(
        "ours (defaults)", "transaction", {"pgbouncer": "transaction"}
    ),
    "django no pool via pgbouncer transaction": Behind("connect per request", "transaction"),
    "persistent via pgbouncer transaction": Behind("persistent", "transaction"),
}


def available(name: str) -> bool:
    """Whether the strategy's ENGINE is installed (django-db-connection-pool
    comes with the ``bench`` extra only)."""
    if STRATEGIES[name].engine != DBCP:
        return True
    try:
        import dj_db_conn_pool  # noqa: F401
    except ImportError:
        return False
    return True


def database(
    name: str,
    server: dict[str, Any],
    *,
    min_size: int,
    max_size: int,
    timeout: float = 10,
    pool: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``DATABASES`` entry of strategy *name* on *server* (NAME, USER,
    PASSWORD, HOST, PORT); pools hold *min_size* to *max_size* connections
    and wait at most *timeout* seconds for one; *pool* adds pool options."""
    try:
        strategy = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}: one of {', '.join(STRATEGIES)}") from None
    db: dict[str, Any] = {
        "ENGINE": strategy.engine,
        **server,
        "CONN_MAX_AGE": strategy.conn_max_age,
        "OPTIONS": {},
    }
    if strategy.pool is None:
        return db
    if strategy.engine == DBCP:
        db["POOL_OPTIONS"] = {"POOL_SIZE": max_size, "MAX_OVERFLOW": 0, "TIMEOUT": timeout}
    else:
        db["OPTIONS"]["pool"] = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout,
            **strategy.pool,
            **(pool or {}),
        }
    return db
