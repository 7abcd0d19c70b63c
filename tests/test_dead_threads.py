"""A thread that ends without closing its connection takes no capacity with it."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.db import connections

import django_pooled_pg
from django_pooled_pg.base import DatabaseWrapper
from tests.conftest import Make
from tests.helpers import CheckedThread, wait_until

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "small"])


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Nobody collects garbage: Django's wrappers sit in reference cycles."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def tiny_alias(django_db_setup: None) -> Iterator[str]:
    """The test project's "small" alias: a pool of two on the test database."""
    yield "small"
    connections["small"].close()
    connections["small"].close_pool()


def query(alias: str) -> int:
    with connections[alias].cursor() as cursor:  # this thread's wrapper
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def wait_until_idle(wrapper: DatabaseWrapper, deadline: float = 1.0) -> None:
    """Nothing is checked out from the alias's pool within *deadline* seconds."""

    def in_use() -> int:
        return django_pooled_pg.stats(wrapper.alias).live.in_use

    wait_until(
        lambda: in_use() == 0,
        timeout=deadline,
        interval=0.002,
        message=lambda: f"every connection back ({in_use()} still out)",
    )


def test_fifty_threads_that_never_close(tiny_alias: str, no_gc: None) -> None:
    pool_wrapper = connections[tiny_alias]
    pids: list[int] = []
    for _ in range(50):
        t = CheckedThread(target=lambda: pids.append(query(tiny_alias)))
        t.start()
        t.join(10)
        assert not t.is_alive()
        wait_until_idle(pool_wrapper)  # back within 1 s of the thread's end
    assert len(pids) == 50
    assert len(set(pids)) <= 2
    t0 = time.monotonic()
    query(tiny_alias)  # the main thread gets a connection at once
    assert time.monotonic() - t0 < 0.5
    connections[tiny_alias].close()


def test_fifty_threads_at_once_that_never_close(tiny_alias: str, no_gc: None) -> None:
    """More threads than connections: each waits its turn, none keeps one."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            query(tiny_alias)
        except BaseException as exc:
            errors.append(exc)

    threads = [CheckedThread(target=work) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    wait_until_idle(connections[tiny_alias])


def test_executor_workers_that_exit_give_connections_back(tiny_alias: str, no_gc: None) -> None:
    with ThreadPoolExecutor(max_workers=2) as executor:
        list(executor.map(lambda _: query(tiny_alias), range(10)))
    # The executor's threads have exited (shutdown joins them).
    wait_until_idle(connections[tiny_alias])
    query(tiny_alias)
    connections[tiny_alias].close()


def test_reclaimed_connection_is_rolled_back_and_reset(tiny_alias: str, no_gc: None) -> None:
    with connections[tiny_alias].cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS reclaim_rows (x int)")
    connections[tiny_alias].close()

    def leave_a_mess() -> None:
        wrapper = connections[tiny_alias]
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute("INSERT INTO reclaim_rows VALUES (1)")
            cursor.execute("SET search_path = nowhere")

    t = CheckedThread(target=leave_a_mess)
    t.start()
    t.join(10)
    wait_until_idle(connections[tiny_alias])
    with connections[tiny_alias].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM public.reclaim_rows")
        assert cursor.fetchone()[0] == 0
        cursor.execute("SHOW search_path")
        assert cursor.fetchone()[0] != "nowhere"
        cursor.execute("DROP TABLE public.reclaim_rows")
    connections[tiny_alias].close()


def test_threads_that_close_are_not_reclaimed_twice(make_wrapper: Make, caplog) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 4})
    caplog.set_level(logging.WARNING, logger="django_pooled_pg")

    def work() -> None:
        twin = wrapper.copy()
        with twin.cursor() as cursor:
            cursor.execute("SELECT 1")
        twin.close()

    threads = [CheckedThread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    pool = wrapper.pool
    assert not [r for r in caplog.records if "thread ended" in r.getMessage()]
    stats = wait_until(  # a connection may still be opening (growth)
        lambda: (s := pool.get_stats())["pool_available"] == s["pool_size"] and s,
        timeout=5,
        message=lambda: f"every connection idle; now {pool.get_stats()}",
    )
    assert stats["pool_size"] <= 4  # every connection accounted for: all idle
    # No connection was put back twice: four checkouts at once get four sessions.
    twins = [wrapper.copy() for _ in range(4)]
    pids = set()
    for twin in twins:
        with twin.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pids.add(cursor.fetchone()[0])
    assert len(pids) == 4
    for twin in twins:
        twin.close()


def test_reclaim_is_logged(tiny_alias: str, no_gc: None, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_pg")
    t = CheckedThread(target=lambda: query(tiny_alias))
    t.start()
    t.join(10)
    wait_until_idle(connections[tiny_alias])
    assert any("thread ended without closing" in r.getMessage() for r in caplog.records)
