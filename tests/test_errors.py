"""Errors: an exhausted pool says why, an outage fails in time and heals."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from django.db import OperationalError, connections
from psycopg_pool import PoolTimeout

import django_pooled_pg
from demoapp.models import Counter
from django_pooled_pg import PoolExhausted
from django_pooled_pg.base import DatabaseWrapper
from tests.conftest import Make
from tests.helpers import CheckedThread, private_settings, wait_until


def hold(wrapper: DatabaseWrapper) -> None:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")


def test_exhausted_pool_raises_one_class_naming_its_state(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.3}, alias="tiny")
    hold(wrapper)
    other = wrapper.copy()
    t0 = time.monotonic()
    with pytest.raises(PoolExhausted) as info:
        hold(other)
    waited = time.monotonic() - t0
    exc = info.value
    assert type(exc) is PoolExhausted
    assert isinstance(exc, PoolTimeout)  # what Django's pool raises
    assert isinstance(exc, OperationalError)  # what applications catch
    message = str(exc)
    assert "'tiny'" in message
    assert "max_size=1" in message
    assert "in use=1" in message
    assert "waiting=0" in message
    assert 0.3 <= waited < 1.5
    assert (exc.alias, exc.max_size, exc.in_use) == ("tiny", 1, 1)


def test_exhausted_pool_message_counts_waiters(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.5})
    hold(wrapper)
    pool = wrapper.pool
    queued = threading.Event()
    outcome: list[object] = []

    def patient() -> None:
        queued.set()
        try:
            conn = pool.getconn(timeout=5)
        except Exception as exc:
            outcome.append(exc)
        else:
            outcome.append("got it")
            pool.putconn(conn)

    t = CheckedThread(target=patient)
    t.start()
    queued.wait(5)
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting,
        timeout=5,
        interval=0.005,
        message="the patient client queued",
    )
    with pytest.raises(PoolExhausted, match=r"waiting=1"):
        hold(wrapper.copy())
    wrapper.close()  # the patient one gets it now
    t.join(10)
    assert outcome == ["got it"]


def test_orm_receives_pool_exhausted_itself(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.2}, alias="orm_tiny")
    hold(wrapper)
    connections["orm_tiny"] = wrapper.copy()  # this thread's wrapper for the alias
    try:
        with pytest.raises(PoolExhausted) as info:
            Counter.objects.using("orm_tiny").count()
        assert type(info.value) is PoolExhausted
    finally:
        del connections["orm_tiny"]


def test_full_queue_is_rejected_at_once(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 5, "max_waiting": 1})
    hold(wrapper)
    pool = wrapper.pool
    t = CheckedThread(target=lambda: pool.putconn(pool.getconn(timeout=5)))
    t.start()
    wait_until(
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting,
        timeout=5,
        interval=0.005,
        message="a client queued",
    )
    t0 = time.monotonic()
    with pytest.raises(PoolExhausted, match=r"queue is full \(max_waiting=1\)"):
        hold(wrapper.copy())
    assert time.monotonic() - t0 < 0.5
    wrapper.close()
    t.join(10)


@pytest.fixture
def deaf_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def test_deaf_server_fails_within_timeout(make_wrapper: Make, deaf_listener: int) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 0, "max_size": 1, "timeout": 1},
        PORT=str(deaf_listener),
        options={"connect_timeout": 2},
    )
    t0 = time.monotonic()
    with pytest.raises(OperationalError):
        hold(wrapper)
    assert time.monotonic() - t0 < 1 + 2 + 0.5


def test_deaf_server_attempt_ends_at_default_connect_timeout(
    make_wrapper: Make, deaf_listener: int
) -> None:
    """No connect_timeout in OPTIONS: the engine's default bounds the attempt."""
    from django_pooled_pg.options import DEFAULT_CONNECT_TIMEOUT

    wrapper = make_wrapper(
        pool={"min_size": 0, "max_size": 1, "timeout": 0.5}, PORT=str(deaf_listener)
    )
    with pytest.raises(PoolExhausted):
        hold(wrapper)
    pool = wrapper.pool
    # The pool's worker gave up on the silent server, it was not stuck for good.
    wait_until(
        lambda: pool.get_stats().get("connections_errors", 0) >= 1,
        timeout=DEFAULT_CONNECT_TIMEOUT + 1.5,
        interval=0.05,
        message="a failed connection attempt",
    )


@pytest.mark.slow
def test_outage_fails_in_time_and_pool_recovers(private_server) -> None:
    wrapper = DatabaseWrapper(
        private_settings(
            private_server, OPTIONS={"pool": {"min_size": 2, "max_size": 2, "timeout": 1.5}}
        ),
        "outage",
    )
    try:
        hold(wrapper)
        wrapper.close()
        private_server.stop("fast")
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(OperationalError):
                hold(wrapper)
            wrapper.close()
            assert time.monotonic() - t0 < 1.5 + 0.5
        private_server.start()
        back = time.monotonic()

        def serves() -> bool:
            try:
                hold(wrapper)
                return True
            except OperationalError:
                wrapper.close()
                return False

        wait_until(serves, timeout=10, interval=0, message="the pool to recover")
        recovered = time.monotonic() - back
        wrapper.close()
        # No restart of the application; no failure afterwards either.
        for _ in range(10):
            hold(wrapper)
            wrapper.close()
        assert recovered < 2.0, recovered
    finally:
        wrapper.close()
        wrapper.close_pool()


_stall = threading.Event()
_stalling = threading.Event()


def slow_password() -> str:
    """A credentials service that hangs: connection attempts stall in the pool's workers."""
    from django.db import connection

    _stalling.set()
    _stall.wait(10)
    return str(connection.settings_dict["PASSWORD"])


def count_resets(conn: object) -> None:
    count_resets.calls += 1  # type: ignore[attr-defined]


count_resets.calls = 0  # type: ignore[attr-defined]


def test_return_and_check_never_wait_behind_connection_attempts(make_wrapper: Make) -> None:
    wrapper = make_wrapper(
        pool={
            "min_size": 1,
            "max_size": 1,
            "num_workers": 2,
            "timeout": 5,
            "reset": "tests.test_errors.count_resets",
            "password_provider": "tests.test_errors.slow_password",
        },
        CONN_HEALTH_CHECKS=True,
    )
    _stall.set()  # let the first connection through
    hold(wrapper)
    _stall.clear()
    _stalling.clear()
    pool = wrapper.pool
    # Two connection attempts at once (the pool grows one at a time, resize
    # adds in parallel): both workers now hang in the password provider.
    pool.resize(min_size=3, max_size=4)
    try:
        assert _stalling.wait(5)
        # Both attempts taken by the two workers (psycopg_pool's task queue:
        # only private state shows it).
        wait_until(lambda: not pool._tasks.qsize(), timeout=5, message="an empty task queue")
        calls = count_resets.calls
        t0 = time.monotonic()
        wrapper.close()  # reset callback and session reset: inline
        with wrapper.cursor() as cursor:  # check (CONN_HEALTH_CHECKS): inline
            cursor.execute("SELECT 1")
        assert time.monotonic() - t0 < 0.5
        assert count_resets.calls >= calls + 1  # waiting clients got it first, also reset
        assert pool._check is not None
    finally:
        _stall.set()
        wrapper.close()
