"""Who holds a connection: thread leases, dead-thread reclaim, leak reports.

Every checkout is leased to the calling thread. A thread that ends while
holding leases gives them back (``_ReclaimConnection``), so a connection is
never lost with its thread. With ``leak_timeout`` set, a checkout remembers
where it was made, and ``FindLeaks`` logs each connection held too long,
with that stack, once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
import weakref
from time import monotonic
from typing import TYPE_CHECKING, Any, cast

from psycopg_pool import ConnectionPool
from psycopg_pool.pool import MaintenanceTask

from .observability.records import Recorder
from .session import PooledConnection

if TYPE_CHECKING:
    from .pool import DjangoPool

logger = logging.getLogger("django_pooled_pg")


class _ThreadLeases(threading.local):
    leases: set[PooledConnection] | None = None


_thread_local = _ThreadLeases()


class _LeaseHolder:
    """Lives only in one thread's locals: freed when that thread ends."""

    __slots__ = ("__weakref__",)


def _thread_leases() -> set[PooledConnection]:
    leases = _thread_local.leases
    if leases is None:
        leases = set()
        holder = _LeaseHolder()
        # CPython frees a thread's locals as the thread ends, at once and
        # without the garbage collector; Django's wrappers, which sit in
        # reference cycles, would wait for a collection that may not come.
        finalizer = weakref.finalize(holder, _thread_ended, leases, os.getpid())
        finalizer.atexit = False
        _thread_local.leases = leases
        _thread_local.holder = holder  # type: ignore[attr-defined]
    return leases


def lease(conn: PooledConnection, pool: DjangoPool, leak_timeout: float | None) -> None:
    """Lease *conn* to the calling thread (at checkout)."""
    conn._dpp_generation += 1
    conn._dpp_pool = pool
    leases = _thread_leases()
    leases.add(conn)
    conn._dpp_leases = leases
    if leak_timeout is not None:
        # Lines are looked up only if the leak is reported.
        conn._dpp_stack = traceback.StackSummary.extract(
            traceback.walk_stack(None), lookup_lines=False
        )


def unlease(conn: PooledConnection, pool_name: str, held: float) -> None:
    """End *conn*'s lease (at return), after *held* seconds."""
    conn._dpp_generation += 1
    if conn._dpp_leak_reported:
        conn._dpp_leak_reported = False
        logger.info(
            "pool %r: the connection reported as leaked came back after %.1f s",
            pool_name,
            held,
        )
    conn._dpp_stack = None
    if (leases := conn._dpp_leases) is not None:
        leases.discard(conn)
        conn._dpp_leases = None
    conn._dpp_owner = None


def _thread_ended(leases: set[PooledConnection], pid: int) -> None:
    if pid != os.getpid():
        return  # a forked child clearing its parent's thread states
    for conn in list(leases):
        pool = conn._dpp_pool
        if pool is not None and not pool.closed:
            with contextlib.suppress(Exception):  # the interpreter is shutting down
                pool.run_task(_ReclaimConnection(pool, conn, conn._dpp_generation))


class _ReclaimConnection(MaintenanceTask):
    """Return a connection whose thread ended without closing it."""

    def __init__(self, pool: DjangoPool, conn: PooledConnection, generation: int):
        super().__init__(pool)
        self.conn = conn
        self.generation = generation

    def _run(self, pool: ConnectionPool[Any]) -> None:
        ours = cast("DjangoPool", pool)
        conn = self.conn
        if conn._dpp_generation != self.generation or conn not in ours._leased:
            return  # returned meanwhile
        owner = conn._dpp_owner() if conn._dpp_owner is not None else None
        if owner is not None:
            if owner.allow_thread_sharing:
                return  # another thread was lent this connection
            if owner.connection is conn:
                owner.connection = None
        logger.warning(
            "pool %r: a thread ended without closing its connection; it is back in the pool",
            pool.name,
        )
        ours.recorder.reclaimed()
        ours.putconn(conn)


class FindLeaks(MaintenanceTask):
    """Look for leaked connections every leak_timeout / 2 seconds."""

    def __init__(self, pool: DjangoPool, leak_timeout: float):
        super().__init__(pool)
        self.leak_timeout = leak_timeout

    def _run(self, pool: ConnectionPool[Any]) -> None:
        ours = cast("DjangoPool", pool)
        pool.schedule_task(self, self.leak_timeout / 2)
        find_leaks(ours.name, list(ours._leased), self.leak_timeout, ours.recorder)


def find_leaks(
    pool_name: str, leased: list[PooledConnection], limit: float, recorder: Recorder
) -> None:
    """Log each connection of *leased* held longer than *limit*, once."""
    now = monotonic()
    for conn in leased:
        if conn._dpp_leak_reported or now - conn._dpp_out_at < limit:
            continue
        stack = conn._dpp_stack
        if stack is None:
            continue  # returned meanwhile
        conn._dpp_leak_reported = True
        holder = conn._dpp_holder
        recorder.leaked(holder.name if holder is not None else None)
        where = "".join(traceback.StackSummary.from_list(list(reversed(stack))).format())
        logger.warning(
            "pool %r: a connection has been checked out for %.1f s by %s (leak_timeout=%g); "
            "it was checked out at:\n%s",
            pool_name,
            now - conn._dpp_out_at,
            holder.name if holder is not None else "an unknown holder (holders=False)",
            limit,
            where,
        )
