"""Fork safety with real forked processes.

A child gets a pool of its own, never sends a byte on a connection it
inherited, and never waits on a lock, condition or thread of the parent's
pool. The parent's sessions survive, whatever the child does and however it
ends. Each child reports through a pipe and always ends in ``os._exit``.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.db import connection

import django_pooled_pg
from django_pooled_pg.base import DatabaseWrapper
from tests.conftest import Make
from tests.helpers import CheckedThread, backend_pids, wait_until


def backend_pid(wrapper: DatabaseWrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


def in_child(work: Callable[[], Any], exit_how: str = "_exit", timeout: float = 30) -> Any:
    """Fork; run *work* in the child; return what it returned (or raise what it raised)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 0
        try:
            os.close(read_fd)
            try:
                payload = {"ok": work()}
            except BaseException as exc:
                payload = {"error": f"{type(exc).__name__}: {exc}"}
                code = 1
            os.write(write_fd, json.dumps(payload).encode())
            os.close(write_fd)
            if exit_how == "sys.exit":
                try:
                    sys.exit(code)  # runs atexit hooks, the engine's included
                except SystemExit:
                    # pytest's own state must not run in the child: exit the way
                    # the interpreter would, hooks first.
                    import atexit

                    atexit._run_exitfuncs()
            elif exit_how == "gc":
                gc.collect()
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            raise AssertionError("the child hung")
        ready, _, _ = select.select([read_fd], [], [], remaining)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    payload = json.loads(b"".join(chunks) or b"{}")
    if "error" in payload:
        raise AssertionError(f"child failed: {payload['error']}")
    assert os.waitstatus_to_exitcode(status) == 0
    return payload["ok"]


@pytest.mark.parametrize("exit_how", ["_exit", "sys.exit", "gc", "drop"])
def test_child_never_touches_the_parents_session(make_wrapper: Make, admin, exit_how: str) -> None:
    wrapper = make_wrapper(pool={"min_size": 2, "max_size": 3})
    parent_backend = backend_pid(wrapper)  # held across the fork
    other = wrapper.copy()
    idle_backend = backend_pid(other)
    other.close()  # idle in the pool at fork time
    dbname = wrapper.settings_dict["NAME"]

    def child() -> list[int]:
        seen = [backend_pid(wrapper)]  # the same wrapper object: connects afresh
        wrapper.close()
        twin = wrapper.copy()
        seen.append(backend_pid(twin))
        twin.close()
        if exit_how == "drop":
            del twin
            gc.collect()
        return seen

    child_backends = in_child(child, exit_how=exit_how)
    assert parent_backend not in child_backends
    assert idle_backend not in child_backends
    # Nothing was sent on the parent's sessions: both alive, same backends.
    assert {parent_backend, idle_backend} <= backend_pids(admin, dbname)
    assert backend_pid(wrapper) == parent_backend
    wrapper.close()
    assert backend_pid(wrapper) not in child_backends  # the child's sessions are its own


def test_default_connection_in_child_uses_its_own_pool(transactional_db: None, admin) -> None:
    parent_backend = backend_pid(connection)

    def child() -> int:
        return backend_pid(connection)

    assert in_child(child) != parent_backend
    assert backend_pid(connection) == parent_backend
    connection.close()


def test_fork_while_another_thread_holds_or_waits(make_wrapper: Make) -> None:
    """The parent's lock, condition and waiting queue are busy at the fork."""
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 1, "timeout": 20})
    holding = threading.Event()
    release = threading.Event()
    outcome: list[int] = []

    def holder() -> None:
        twin = wrapper.copy()
        backend_pid(twin)
        holding.set()
        release.wait(30)
        twin.close()

    def waiter() -> None:
        twin = wrapper.copy()
        outcome.append(backend_pid(twin))  # waits: max_size=1 is held
        twin.close()

    threads = [CheckedThread(target=holder), CheckedThread(target=waiter)]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()
    wait_until(  # the fork happens with a client queued
        lambda: django_pooled_pg.stats(wrapper.alias).live.waiting,
        timeout=10,
        interval=0.005,
        message="a queued client",
    )

    def child() -> int:
        w = wrapper.copy()
        return backend_pid(w)

    t0 = time.monotonic()
    child_backend = in_child(child, timeout=15)
    assert time.monotonic() - t0 < 10  # no wait on the parent's pool
    release.set()
    for t in threads:
        t.join(30)
    assert len(outcome) == 1 and outcome[0] != child_backend  # the parent's waiter was served


def test_close_pool_in_child_discards_without_io(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 3, "max_size": 3})
    twins = [wrapper.copy() for _ in range(3)]
    parent_backends = {backend_pid(t) for t in twins}
    for t in twins:
        t.close()
    dbname = wrapper.settings_dict["NAME"]

    def child() -> bool:
        wrapper.close_pool()
        return True

    assert in_child(child)
    assert parent_backends <= backend_pids(admin, dbname)
    # And the parent's pool still serves from those same sessions.
    assert backend_pid(wrapper) in parent_backends


def test_fork_while_workers_open_connections(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(pool={"min_size": 4, "max_size": 4})
    pool = wrapper.pool
    pool.open()  # four connection attempts start in the pool's workers

    def child() -> int:
        return backend_pid(wrapper.copy())

    child_backend = in_child(child)  # forks while they are being made
    pool.wait(timeout=10)
    backends = set()
    twins = [wrapper.copy() for _ in range(4)]
    for t in twins:
        backends.add(backend_pid(t))
    for t in twins:
        t.close()
    assert len(backends) == 4
    assert child_backend not in backends


def test_child_of_child_and_parent_all_work(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 2})
    parent_backend = backend_pid(wrapper)

    def grandchild() -> int:
        return backend_pid(wrapper)

    def child() -> list[int]:
        mine = backend_pid(wrapper)
        theirs = in_child(grandchild)
        return [mine, theirs, backend_pid(wrapper)]

    mine, theirs, mine_again = in_child(child)
    assert len({parent_backend, mine, theirs}) == 3
    assert mine_again == mine
    assert backend_pid(wrapper) == parent_backend


def test_inherited_socket_is_neutralized(make_wrapper: Make) -> None:
    """In the child, an inherited connection object reaches /dev/null, not the server."""
    wrapper = make_wrapper(pool={"min_size": 1, "max_size": 1})
    backend_pid(wrapper)
    raw = wrapper.connection

    def child() -> list[Any]:
        fd = raw.pgconn.socket
        target = os.readlink(f"/proc/self/fd/{fd}")
        try:
            raw.execute("SELECT 1")  # goes nowhere: /dev/null answers EOF
            outcome = "answered"
        except psycopg.Error:
            outcome = "failed"
        raw.close()  # its terminate message also goes nowhere
        return [target, outcome, wrapper.connection is None]

    target, outcome, wrapper_reset = in_child(child)
    assert target == os.devnull
    assert outcome == "failed"
    assert wrapper_reset  # the forking thread's wrapper will connect afresh
    assert backend_pid(wrapper) == raw.info.backend_pid
