"""This process's pools: found by key, opened, closed, forked, closed at exit.

One pool per alias and connection settings per process. A forked child
never touches what it inherited: ``os.register_at_fork`` makes it forget
the parent's pools (each ``_disown``s its connections without I/O), and the
child builds its own on first use. Pools close at interpreter exit.

Other parts of the package learn that a pool opened through
``on_pool_opened`` (the app starts its stats publisher there), so the
pools need not know who watches them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Hashable

from .errors import ServerUnavailable
from .observability import records
from .pool import DjangoPool
from .session import PooledConnection, neutralize

logger = logging.getLogger("django_pooled_pg")

_pools: dict[Hashable, DjangoPool] = {}
_pools_pid = os.getpid()
_pools_lock = threading.Lock()
_opened_listeners: list[Callable[[DjangoPool], None]] = []


def get_or_create(key: Hashable, alias: str, create: Callable[[], DjangoPool]) -> DjangoPool:
    """The pool for *key*, created (not opened) on first use in this process.

    A pool made for other settings of the same alias (the test runner renamed
    the database, a test changed TIME_ZONE) is closed: nothing checks out
    from it any more.
    """
    if _pools_pid != os.getpid():
        _missed_fork()
    pool = _pools.get(key)
    if pool is not None:
        return pool
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = create()
            stale = [k for k, p in _pools.items() if p.alias == alias]
            _pools[key] = pool
            for k in stale:
                _pools.pop(k).close()
    return pool


def open_pool(pool: DjangoPool) -> None:
    """Open *pool* (at its first checkout) and tell the listeners."""
    pool.open()
    for listener in list(_opened_listeners):
        try:
            listener(pool)
        except Exception:  # a watcher must never fail a checkout
            logger.exception("pool %r: a pool-opened listener failed", pool.name)


def on_pool_opened(listener: Callable[[DjangoPool], None]) -> None:
    """Call *listener(pool)* whenever a pool of this process opens (once per listener)."""
    if listener not in _opened_listeners:
        _opened_listeners.append(listener)


def find(alias: str | None = None) -> list[DjangoPool]:
    """This process's pools (of one alias), without creating any."""
    if _pools_pid != os.getpid():
        _missed_fork()
    return [p for p in list(_pools.values()) if alias is None or p.alias == alias]


def close_matching(predicate: Callable[[DjangoPool], bool]) -> None:
    """Close and forget every pool of this process matching *predicate*."""
    with _pools_lock:
        doomed = [k for k, p in _pools.items() if predicate(p)]
        closing = [_pools.pop(k) for k in doomed]
    for pool in closing:
        pool.close()


def give_back(conn: PooledConnection, generation: int) -> None:
    """Return a checked-out connection to the pool it came from (Django's close).

    *generation* is the connection's at checkout: a connection already
    given back (its thread ended, or the pool was forked) is left alone.
    """
    pool = conn._dpp_pool
    if pool is None or conn._dpp_generation != generation:
        return
    if pool.pid != os.getpid():
        # Forked without os.register_at_fork running (a C-level fork).
        neutralize(conn)
        conn.close()
        return
    pool.release(conn)


def check_fork(**_: object) -> None:
    """Notice a fork that Python's fork hooks did not see (Django's request_started).

    uWSGI forks its workers in C: without --py-call-uwsgi-fork-hooks no
    os.register_at_fork hook runs, and a worker's threads would go on using
    what the master left in them (a checked-out connection, a pool). The
    first request of such a worker lets them go, as the hook would have.
    """
    if _pools_pid != os.getpid():
        _missed_fork()


#: Taken only in a process that missed its fork hook (never in the parent,
#: which therefore cannot have held it at the fork).
_missed_fork_lock = threading.Lock()


def _missed_fork() -> None:
    with _missed_fork_lock:
        if _pools_pid == os.getpid():
            return  # another thread of this process did it first
        inherited = bool(_pools)
        _after_fork_in_child()
    if inherited:
        logger.warning(
            "process %d was forked without Python's fork hooks (uWSGI without "
            "--py-call-uwsgi-fork-hooks?): the pools it inherited were let go at its "
            "first use; locks the parent held at the fork may still hang it. Run "
            "uWSGI with --py-call-uwsgi-fork-hooks or --lazy-apps.",
            os.getpid(),
        )


def _after_fork_in_child() -> None:
    global _pools_pid, _pools_lock
    _pools_lock = threading.Lock()  # the parent may have held it
    records.forget_all()
    inherited = list(_pools.values())
    _pools.clear()
    _pools_pid = os.getpid()
    for pool in inherited:
        pool.disown()
    _inherited.extend(inherited)


# Inherited pools stay referenced: their objects are never finalized in the child.
_inherited: list[DjangoPool] = []

os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    if _pools_pid != os.getpid():
        return
    for pool in find():
        try:
            pool.close(timeout=1.0)
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("pool %r: error closing at exit", pool.name, exc_info=True)


def unavailable(alias: str) -> ServerUnavailable | None:
    """Whether *alias* is known to be unreachable now, without I/O.

    The ``ServerUnavailable`` its next checkout would fail with (``fail_fast``)
    while every connection attempt since the last success has failed and its
    pool holds no connection; None otherwise, and when its pool was not used
    in this process yet. For routers choosing where reads go.
    """
    for pool in reversed(find(alias)):
        if not pool.closed and pool.pid == os.getpid():
            return pool.unavailable()
    return None
