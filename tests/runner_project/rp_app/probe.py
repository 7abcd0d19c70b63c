"""What the fixture tests observe, reported to ``$RP_OUT`` for tests/test_runners.py.

One JSON line per observation, with the reporting process, the xdist worker
(if any) and the test database both as Django names it and as the server
does, so the outer test can check which pooled test database each runner used.
"""

import json
import os
import time

import psycopg
from django.db import connection, connections


def session(alias="default"):
    """(backend pid, current database, its oid) of the alias's pooled session."""
    with connections[alias].cursor() as cursor:
        cursor.execute(
            "SELECT pg_backend_pid(), current_database(), "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        pid, dbname, oid = cursor.fetchone()
    return pid, dbname, int(oid)


def reopen(times=3):
    """Close and reopen the default connection *times* times, both at once and
    after a pause; what was seen.

    Reopened at once, the session reset sent at the close may still be in
    flight, and the pool then hands out another idle connection if it has
    one (documented): no new connection is opened either way. After a pause
    the thread gets its own connection back: the same backend pid.
    """
    pool = connection.pool
    opened = pool.get_stats().get("connections_num", 0)
    first = session()[0]
    at_once = []
    for _ in range(times):
        connection.close()  # back to the pool, not closed
        assert connection.connection is None
        at_once.append(session()[0])
    own = session()[0]  # the connection in hand, whichever it was
    paused = []
    for _ in range(times):
        connection.close()
        time.sleep(0.2)  # the reset's answer arrives meanwhile
        paused.append(session()[0])
    return {
        "first": first,
        "at_once": at_once,
        "own": own,
        "paused": paused,
        "new_connections": pool.get_stats().get("connections_num", 0) - opened,
    }


def report(**fields):
    if path := os.environ.get("RP_OUT"):
        line = {
            "pid": os.getpid(),
            "worker": os.environ.get("PYTEST_XDIST_WORKER"),
            "settings_name": connection.settings_dict["NAME"],
            **fields,
        }
        with open(path, "a") as out:
            out.write(json.dumps(line) + "\n")


def in_use(pool, wait=5.0):
    """Connections of *pool* checked out, once none is (or after *wait* s)."""
    deadline = time.monotonic() + wait
    while True:
        stats = pool.get_stats()
        used = stats["pool_size"] - stats["pool_available"]
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def server_session(pid):
    """(state, last query) of backend *pid*, seen from outside every pool."""
    s = connection.settings_dict
    with psycopg.connect(
        host=s["HOST"],
        port=s["PORT"],
        user=s["USER"],
        password=s["PASSWORD"],
        dbname="postgres",
        autocommit=True,
    ) as admin:
        row = admin.execute(
            "SELECT state, query FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
    return list(row) if row else None
