"""A returned connection is parked for its thread, and stays the pool's.

Parking makes a thread's next checkout skip the pool's lock and queue; these
tests show it never costs capacity: other threads take parked connections,
waiting clients are served first, and idle, closed and forked pools treat
parked connections as the idle connections they are.
"""

from __future__ import annotations

import threading
import time

import django_pooled_pg
from tests.conftest import Make
from tests.helpers import CheckedThread, backend_pids, run_in_thread, wait_until


def backend_pid(wrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def reset_answered(conn) -> bool:
    """The answer to the session reset sent at return has come (read without waiting)."""
    conn.pgconn.consume_input()
    return not conn.pgconn.is_busy()


def test_thread_gets_its_returned_connection_back(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 2, "max_size": 2})
    pid = backend_pid(wrapper)
    wait_until(
        lambda: (live := django_pooled_pg.stats(wrapper.alias).live).idle + live.in_use == 2,
        message="both connections open",
    )
    wrapper.close()
    stats = wrapper.pool.get_stats()
    assert stats["pool_available"] == stats["pool_size"]  # parked counts as idle
    # Which connection is parked, and where it is, only the pool's private
    # state shows.
    (parked,) = wrapper.pool._parked
    # Once its reset has come back, there is nothing to swap it for.
    wait_until(lambda: reset_answered(parked), message="the answer to its session reset")
    assert backend_pid(wrapper) == pid
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 1
    assert not wrapper.pool._parked


def test_other_thread_takes_a_parked_connection_at_once(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 1, "timeout": 3})
    pid = backend_pid(wrapper)
    wrapper.close()  # parked for this thread

    def other() -> tuple[int, float]:
        twin = wrapper.copy()
        t0 = time.monotonic()
        try:
            return backend_pid(twin), time.monotonic() - t0
        finally:
            twin.close()

    other_pid, waited = run_in_thread(other)
    assert other_pid == pid
    assert waited < 1.0
    # Taken and returned by the other thread: this thread still gets one.
    assert backend_pid(wrapper) == pid


def test_waiting_client_is_served_before_parking(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 1, "timeout": 5})
    pid = backend_pid(wrapper)
    got: list[tuple[int, float]] = []
    started = threading.Event()

    def waiter() -> None:
        twin = wrapper.copy()
        started.set()
        t0 = time.monotonic()
        got.append((backend_pid(twin), time.monotonic() - t0))
        twin.close()

    t = CheckedThread(target=waiter)
    t.start()
    started.wait(5)
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting,
        timeout=5,
        message="the other thread to wait",
    )
    wrapper.close()  # must go to the waiter, not to this thread's slot
    t.join(10)
    assert got and got[0][0] == pid
    assert got[0][1] < 2.0  # served on return, not at its timeout


def test_parked_connection_idle_past_max_idle_is_closed(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 2, "max_idle": 1})
    name = wrapper.settings_dict["NAME"]
    pid = backend_pid(wrapper)
    wrapper.close()
    assert pid in backend_pids(admin, name)
    wait_until(
        lambda: pid not in backend_pids(admin, name),
        timeout=10,
        interval=0.2,
        message="the parked connection closed after max_idle",
    )
    assert wrapper.pool.get_stats()["pool_size"] == 0


def test_close_pool_closes_parked_connections(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 2})
    name = wrapper.settings_dict["NAME"]
    pid = backend_pid(wrapper)
    wrapper.close()
    wrapper.close_pool()
    wait_until(
        lambda: pid not in backend_pids(admin, name),
        timeout=5,
        interval=0.05,
        message="the parked connection closed",
    )


def test_spare_connection_serves_while_a_reset_is_in_flight(make_wrapper: Make) -> None:
    """Back-to-back requests of one thread alternate with an idle spare.

    Rather than wait for its own DISCARD ALL to come back, the thread takes
    the pool's idle connection; no session state crosses between requests
    either way, and the pool stays within its size.
    """
    wrapper = make_wrapper(pool={"min_size": 2, "max_size": 3})
    pids = set()
    for i in range(200):
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT current_setting('dpp.mark', true), pg_backend_pid()")
            mark, pid = cursor.fetchone()
            assert mark in (None, ""), f"request {i} saw a previous request's setting"
            cursor.execute("SET dpp.mark = 'leak'")
            pids.add(pid)
        wrapper.close()
    assert 1 <= len(pids) <= 3
    stats = wrapper.pool.get_stats()
    assert stats["pool_size"] <= 3
    # The swaps lost or doubled nothing: every connection is idle or parked,
    # and each in one place only (which place, only private state shows).
    idle, parked = list(wrapper.pool._pool), list(wrapper.pool._parked)
    assert len(set(idle + parked)) == len(idle) + len(parked) == stats["pool_size"]
    assert stats["pool_available"] == stats["pool_size"]  # parked counts as available
