"""A connection the server closed while it sat idle is never handed out."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from django_pooled_pg.base import DatabaseWrapper
from tests.conftest import Make
from tests.helpers import CheckedThread, wait_until

APP = "pooled-liveness"


def warm(wrapper: DatabaseWrapper, n: int) -> set[int]:
    """Open *n* connections at once, return them all to the pool idle."""
    twins = [wrapper.copy() for _ in range(n)]
    pids = set()
    for twin in twins:
        with twin.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.add(cursor.fetchone()[0])
    for twin in twins:
        twin.close()
    return pids


def wait_gone(admin: psycopg.Connection[Any], pids: set[int], deadline: float = 5.0) -> None:
    def count() -> int:
        return int(
            admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)]
            ).fetchone()[0]
        )

    wait_until(lambda: count() == 0, timeout=deadline, message=f"backends {pids} gone")


def requests(wrapper: DatabaseWrapper, n: int) -> tuple[int, list[str]]:
    """Run *n* request cycles (checkout, query, return); count failures."""
    failures = []
    for _ in range(n):
        try:
            with wrapper.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            wrapper.close()
    return n - len(failures), failures


def test_terminated_idle_connections_are_never_handed_out(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 4, "max_size": 4}, options={"application_name": APP})
    pids = warm(wrapper, 4)
    assert len(pids) == 4
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)]
    )
    wait_gone(admin, pids)

    t0 = time.monotonic()
    ok, failures = requests(wrapper, 20)
    elapsed = time.monotonic() - t0
    assert failures == []
    assert ok == 20
    # Detected by a poll of the socket, replaced at once: no backoff sleeps.
    assert elapsed < 2.0, elapsed
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] not in pids
    wrapper.close()


@pytest.mark.parametrize("reset_session", [True, False])
def test_connection_terminated_a_moment_ago_is_not_handed_out(
    make_wrapper: Make, admin, reset_session: bool
) -> None:
    """The FATAL message arrives before the EOF: either one is enough to tell.

    Checked out right after the backend exited (gone from pg_stat_activity),
    when its EOF may still be on its way.
    """
    wrapper = make_wrapper(
        pool={"min_size": 1, "max_size": 1, "reset_session": reset_session},
        options={"application_name": APP},
    )
    failures = []
    for _ in range(20):
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend = cursor.fetchone()[0]
        wrapper.close()
        admin.execute("SELECT pg_terminate_backend(%s)", [backend])
        wait_gone(admin, {backend})
        failures += requests(wrapper, 1)[1]
    assert failures == []


def test_terminated_idle_connections_from_many_threads(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 4, "max_size": 4}, options={"application_name": APP})
    pids = warm(wrapper, 4)
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", [list(pids)]
    )
    wait_gone(admin, pids)

    failures: list[str] = []
    start = threading.Barrier(4)

    def worker() -> None:
        twin = wrapper.copy()
        start.wait(10)
        failures.extend(requests(twin, 5)[1])

    threads = [CheckedThread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert failures == []


def test_idle_session_timeout_closed_connections_are_never_handed_out(
    make_wrapper: Make, admin
) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 2, "max_size": 2},
        options={"application_name": APP, "options": "-c idle_session_timeout=200"},
    )
    pids = warm(wrapper, 2)
    wait_gone(admin, pids)  # the server closes them after 200 ms idle
    ok, failures = requests(wrapper, 20)
    assert failures == []


@pytest.mark.slow
def test_restarted_server_leaves_no_stale_connection(private_server) -> None:
    """After a restart every pooled socket is dead; none reaches a request."""
    from tests.helpers import private_settings

    wrapper = DatabaseWrapper(
        private_settings(private_server, OPTIONS={"pool": {"min_size": 3, "max_size": 3}}),
        "liveness_restart",
    )
    try:
        warm(wrapper, 3)
        private_server.restart("fast")
        ok, failures = requests(wrapper, 20)
        assert failures == []
    finally:
        wrapper.close()
        wrapper.close_pool()
