"""django_pooled_pg.stats(): what the pool counts, measures and shows live, and its logs."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import psycopg
import pytest

import django_pooled_pg
from django_pooled_pg import PoolExhausted
from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.observability.activity import application_name, parse_application_name
from django_pooled_pg.observability.records import BUCKETS, Histogram
from tests.conftest import Make
from tests.helpers import CheckedThread, backend_pids, wait_until
from tests.test_forking import in_child


def query(wrapper: DatabaseWrapper, sql: str = "SELECT 1") -> Any:
    with wrapper.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def backend_pid(wrapper: DatabaseWrapper) -> int:
    return int(query(wrapper, "SELECT pg_backend_pid()"))


SET_PATH = "SELECT set_config('search_path', 'public', false)"


def test_checkouts_resets_and_hold_times_are_counted(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 2})
    t0 = time.monotonic()
    for i in range(10):
        query(wrapper, SET_PATH if i % 5 == 0 else "SELECT 1")
        time.sleep(0.01)  # held at least 10 ms (Django closes at the end)
        wrapper.close()
    elapsed = time.monotonic() - t0
    s = django_pooled_pg.stats(wrapper.alias)
    assert s.alias == wrapper.alias
    assert s.counters.checkouts == 10
    # reset_session="auto": a reset after each of the two set_config() calls only.
    assert (s.counters.resets, s.counters.resets_skipped) == (2, 8)
    assert s.counters.timeouts == s.counters.rejected == s.counters.errors == 0
    assert s.counters.opened >= 1 and s.counters.connect_errors == 0
    assert s.hold.count == 10 and s.wait.count == 10
    assert s.hold.p50 >= 0.01 and s.hold.max >= 0.01
    # Each hold lies within the loop: measured per checkout, whatever the load.
    assert s.hold.sum <= elapsed
    # Only the first checkout waited (the pool opened its first connection);
    # each later one took its returned connection back at once.
    assert s.counters.checkouts_waited <= 1
    assert s.wait.p50 < 0.1
    assert s.connect.count == s.counters.opened and s.connect.max > 0
    assert s.live.open and s.live.in_use == 0 and s.live.waiting == 0
    assert s.live.idle == s.live.size >= 1
    assert s.config.max_size == 2 and s.config.min_size == 1
    assert s.config.database.endswith("/" + wrapper.settings_dict["NAME"])


def test_live_state_shows_holders_waiters_and_their_ages(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 10})
    query(wrapper)  # held by this thread
    got = threading.Event()

    def waiter() -> None:
        other = wrapper.copy()
        query(other)
        got.set()
        other.close()

    t = CheckedThread(target=waiter)
    t.start()
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting == 1, message="a queued waiter"
    )
    time.sleep(0.3)  # the holder and the waiter age
    live = django_pooled_pg.stats(wrapper.alias).live
    assert live.in_use == 1 and live.waiting == 1 and live.idle == 0 and live.size == 1
    assert live.oldest_checkout >= 0.3
    assert 0.3 <= live.longest_wait < 5
    wrapper.close()
    assert got.wait(5)
    t.join(5)
    s = django_pooled_pg.stats(wrapper.alias)
    assert s.live.waiting == 0 and s.live.longest_wait == 0 and s.live.in_use == 0
    assert s.counters.checkouts_waited >= 1
    assert s.wait.max >= 0.3  # the waiter's wait was measured


def test_timeouts_and_rejections_are_counted_and_logged(make_wrapper: Make, caplog) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.2, "max_waiting": 1})
    query(wrapper)
    caplog.set_level(logging.WARNING, logger="django_pooled_pg")
    with pytest.raises(PoolExhausted):
        query(wrapper.copy())
    assert django_pooled_pg.stats(wrapper.alias).counters.timeouts == 1
    exhausted = [r for r in caplog.records if "exhausted" in r.getMessage()]
    assert exhausted and "in use=1" in exhausted[0].getMessage()

    # One waiter fills the queue (max_waiting=1); the next is rejected at once.
    waiter = CheckedThread(target=lambda: pytest.raises(PoolExhausted, query, wrapper.copy()))
    waiter.start()
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting == 1, message="a queued waiter"
    )
    with pytest.raises(PoolExhausted, match="queue is full"):
        query(wrapper.copy())
    waiter.join(5)
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert counters.rejected == 1 and counters.timeouts == 2


def test_closes_are_counted_by_reason(
    make_wrapper: Make, admin: psycopg.Connection[Any], caplog
) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_pg")
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "max_lifetime": 0.3})
    query(wrapper)
    wrapper.close()
    time.sleep(0.4)  # the idle one outlives max_lifetime
    query(wrapper)  # the idle one expired: closed, replaced
    wrapper.close()
    assert django_pooled_pg.stats(wrapper.alias).closed_by_reason["lifetime"] == 1
    assert f"pool '{wrapper.alias}': closed a connection (lifetime)" in caplog.text

    dbname = wrapper.settings_dict["NAME"]
    broken = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid = backend_pid(broken)
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    broken.close()  # its reset goes to a dead session
    wait_until(lambda: pid not in backend_pids(admin, dbname), message=f"backend {pid} to exit")
    query(broken)
    broken.close()
    s = django_pooled_pg.stats(broken.alias)
    assert s.closed_by_reason["broken"] == 1 and s.counters.lost == 0

    lost = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid = backend_pid(lost)
    admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    wait_until(lambda: pid not in backend_pids(admin, dbname), message=f"backend {pid} to exit")
    with pytest.raises(Exception):  # noqa: B017 - the terminated session's error
        query(lost)
    lost.close()  # comes back closed: lost while in use
    assert django_pooled_pg.stats(lost.alias).counters.lost == 1

    def failing_reset(conn: Any) -> None:
        raise RuntimeError("no")

    resetting = make_wrapper(pool={"min_size": 0, "max_size": 1, "reset": failing_reset})
    query(resetting)
    resetting.close()
    assert django_pooled_pg.stats(resetting.alias).closed_by_reason["reset_failed"] == 1

    idle = make_wrapper(pool={"min_size": 0, "max_size": 2, "max_idle": 0.3})
    query(idle)
    idle.close()
    wait_until(
        lambda: django_pooled_pg.stats(idle.alias).closed_by_reason["idle"] >= 1,
        message="a close for max_idle",
    )

    shut = make_wrapper(pool={"min_size": 2, "max_size": 2})
    query(shut)
    shut.close()
    wait_until(lambda: django_pooled_pg.stats(shut.alias).live.idle == 2, message="2 idle")
    shut.close_pool()
    s = django_pooled_pg.stats(shut.alias)
    assert s.closed_by_reason["shutdown"] == 2
    assert s.counters.closed == sum(s.closed_by_reason.values())
    assert not s.live.open


def test_a_dead_threads_connection_is_counted_as_reclaimed(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})

    def leave_open() -> None:
        query(wrapper.copy())  # never closed

    t = CheckedThread(target=leave_open)
    t.start()
    t.join()
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).counters.reclaimed == 1,
        message="the dead thread's connection reclaimed",
    )
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0


def test_a_forked_child_starts_its_own_counts(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 2})
    query(wrapper)
    wrapper.close()
    parent = django_pooled_pg.stats(wrapper.alias)

    def child() -> dict[str, Any]:
        s = django_pooled_pg.stats(wrapper.alias)
        query(wrapper)
        wrapper.close()
        after = django_pooled_pg.stats(wrapper.alias)
        return {
            "fork": s.closed_by_reason["fork"],
            "checkouts": s.counters.checkouts,
            "after": after.counters.checkouts,
            "pid": after.pid,
        }

    seen = in_child(child)
    assert seen["fork"] == parent.live.size  # let go of what it inherited
    assert seen["checkouts"] == 0 and seen["after"] == 1
    assert seen["pid"] != parent.pid
    assert django_pooled_pg.stats(wrapper.alias).counters.checkouts == parent.counters.checkouts


def test_stats_off_keeps_the_live_state_only(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 2, "stats": False})
    query(wrapper)
    s = django_pooled_pg.stats(wrapper.alias)
    assert s.live.in_use == 1 and s.live.size == 1
    wrapper.close()
    s = django_pooled_pg.stats(wrapper.alias)
    assert s.counters.checkouts == 0 and s.wait.count == 0 and s.hold.count == 0
    assert s.live.idle == 1


def test_stats_of_every_alias_and_bad_aliases(make_wrapper: Make) -> None:
    wrapper = make_wrapper()
    query(wrapper)
    everything = django_pooled_pg.stats()
    assert {"default", "small", wrapper.alias} <= set(everything)
    assert everything[wrapper.alias].live.in_use == 1
    with pytest.raises(ValueError, match="no database alias 'nope'; configured: default, small"):
        django_pooled_pg.stats("nope")


def test_leaks_are_logged_once_with_the_stack_and_on_return(make_wrapper: Make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_pg")
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "leak_timeout": 0.2})

    def checkout_site_for_the_leak() -> None:
        query(wrapper)

    checkout_site_for_the_leak()
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).counters.leaks == 1,
        timeout=5,
        message="one leak reported",
    )
    time.sleep(0.5)  # several more scans: still reported once
    warnings = [r for r in caplog.records if "checked out for" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "checkout_site_for_the_leak" in warnings[0].getMessage()
    assert "leak_timeout=0.2" in warnings[0].getMessage()
    wrapper.close()
    back = [r for r in caplog.records if "came back after" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert django_pooled_pg.stats(wrapper.alias).counters.leaks == 1


def test_no_leak_is_reported_for_short_checkouts(make_wrapper: Make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_pg")
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "leak_timeout": 0.3})
    for _ in range(20):
        query(wrapper)
        wrapper.close()
        time.sleep(0.03)
    assert django_pooled_pg.stats(wrapper.alias).counters.leaks == 0
    assert not [r for r in caplog.records if "checked out for" in r.getMessage()]


def test_long_waits_are_logged(make_wrapper: Make, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_pg")
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "log_waits_over": 0.1})
    held = threading.Event()

    def hold_for_a_while() -> None:
        holder = wrapper.copy()
        query(holder)
        held.set()
        time.sleep(0.3)
        holder.close()

    t = CheckedThread(target=hold_for_a_while)
    t.start()
    assert held.wait(5)
    query(wrapper)  # waits about 0.3 s
    wrapper.close()
    t.join(5)
    waits = [
        r for r in caplog.records if "waited" in r.getMessage() and "checkout" in r.getMessage()
    ]
    assert len(waits) == 1 and "max_size=1" in waits[0].getMessage()


def test_pool_open_and_close_are_logged(make_wrapper: Make, caplog) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_pg")
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    query(wrapper)
    wrapper.close()
    wrapper.close_pool()
    messages = [r.getMessage() for r in caplog.records]
    assert any("opened for alias" in m and "max_size=1" in m for m in messages)
    assert any(m.startswith(f"pool '{wrapper.alias}' closed") for m in messages)
    password = wrapper.settings_dict["PASSWORD"]
    assert all(password not in m for m in messages)


def test_histogram_percentiles_stay_within_the_observed_range() -> None:
    h = Histogram()
    for i in range(1, 101):
        h.observe(i / 1000)  # 1 ms .. 100 ms
    d = h.summary()
    assert d.count == 100 and d.max == 0.1
    assert abs(d.mean - 0.0505) < 1e-9
    assert 0.025 <= d.p50 <= 0.05  # the bucket holding the 50th value
    assert 0.05 <= d.p95 <= 0.1 and d.p99 <= 0.1
    assert sum(d.buckets) == 100 and len(d.buckets) == len(BUCKETS) + 1


# -- application_name ---------------------------------------------------------


def test_sessions_carry_host_pid_and_alias(make_wrapper: Make, admin) -> None:
    import os

    from django_pooled_pg.observability.records import HOSTNAME

    wrapper = make_wrapper(options={"application_name": "billing"})
    pid = backend_pid(wrapper)
    (name,) = admin.execute(
        "SELECT application_name FROM pg_stat_activity WHERE pid = %s", [pid]
    ).fetchone()
    assert name == f"billing dpp:{HOSTNAME}:{os.getpid()}:{wrapper.alias}"
    assert parse_application_name(name) == (HOSTNAME, os.getpid(), wrapper.alias)


def test_long_application_names_keep_pid_and_alias() -> None:
    host = "web-" + "x" * 70 + ".example.internal"
    name = application_name(
        "a-very-long-application-name-given-by-the-user", host, 4194304, "replica_eu"
    )
    assert len(name.encode()) <= 63
    parsed = parse_application_name(name)
    assert parsed is not None and parsed[1:] == (4194304, "replica_eu")
    assert parsed[0].startswith("#")  # the host, hashed
    short = application_name("myapp", "web1", 12, "default")
    assert short == "myapp dpp:web1:12:default"
    cut = application_name("u" * 80, "web1", 12, "default")
    assert cut.endswith(" dpp:web1:12:default") and len(cut.encode()) <= 63
    assert application_name(None, "web1", 12, "default") == "dpp:web1:12:default"
    assert parse_application_name("psql") is None
    assert application_name("é" * 40, "web1", 1, "d").encode().decode()  # never cut mid-character
