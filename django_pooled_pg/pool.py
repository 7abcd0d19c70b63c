"""The process-wide pools and the life of a pooled connection.

A pooled connection goes round one loop:

* checkout (``DjangoPool.getconn``): the session reset sent at the previous
  return is collected, the socket is polled to catch a backend the server
  closed while the connection sat idle, and the connection is leased to the
  calling thread;
* return (``putconn``): an open transaction is rolled back, the psycopg
  connection's own settings are restored, and ``DISCARD ALL`` is *sent*
  without waiting for its answer, so the reset costs the request no round
  trip.

Around that loop: a thread that ends while holding a lease gives it back
(``_ThreadLeases``), a forked child never touches what it inherited
(``_after_fork_in_child``), and pools close at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import threading
import traceback
import weakref
from collections.abc import Callable, Hashable
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, MaintenanceTask, Schedule

from . import measures
from .errors import PoolExhausted, ServerUnavailable
from .options import PoolOptions

if TYPE_CHECKING:
    from .base import DatabaseWrapper

logger = logging.getLogger("django_pooled_pg")

_IDLE = pq.TransactionStatus.IDLE
_INTRANS = pq.TransactionStatus.INTRANS
_INERROR = pq.TransactionStatus.INERROR
_UNKNOWN = pq.TransactionStatus.UNKNOWN
_ACTIVE = pq.TransactionStatus.ACTIVE
_CONN_OK = pq.ConnStatus.OK
_DISCARD_ALL = b"DISCARD ALL"


class PooledConnection(psycopg.Connection[Any]):
    """A psycopg connection that knows its place in the loop above."""

    # Set by the pool; class defaults keep a fresh connection consistent.
    _dpp_reset_pending: bool = False
    _dpp_generation: int = 0  # bumped at every checkout and return
    _dpp_leases: set[PooledConnection] | None = None  # the holding thread's
    _dpp_owner: weakref.ref[DatabaseWrapper] | None = None
    _dpp_pool: DjangoPool | None = None
    _dpp_fatal: bool = False  # the server said FATAL: it is closing the session
    _dpp_deadline: float | None = None  # of the checkout that is taking it
    _dpp_out_at: float = 0.0  # monotonic time of the current checkout
    _dpp_stack: traceback.StackSummary | None = None  # where it was checked out
    _dpp_leak_reported: bool = False
    _dpp_close_hint: str | None = None  # why it is about to be closed
    _dpp_close_counted: bool = False


def _watch_for_fatal(conn: PooledConnection) -> None:
    """Flag the connection when the server announces it is closing it.

    A terminated backend sends its FATAL message before closing the socket.
    libpq hands an error that arrives while the connection is idle to the
    notice processor; the EOF may follow a moment later.
    """
    ref = weakref.ref(conn)

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("FATAL", "PANIC") and (c := ref()) is not None:
            c._dpp_fatal = True

    conn.add_notice_handler(on_notice)


class DjangoPool(ConnectionPool[PooledConnection]):
    """psycopg_pool's ConnectionPool, shaped for a Django alias.

    Differences from the base class, each for a reason stated where it lives:
    a checkout never sleeps after finding a dead connection, it raises
    ``PoolExhausted`` naming the alias and the pool's state, and returned
    connections are reset without a round trip.
    """

    def __init__(
        self,
        *,
        alias: str,
        options: PoolOptions,
        kwargs: dict[str, Any] | Callable[[], dict[str, Any]],
        check: Callable[[Any], None] | None,
        database: tuple[str, str, str],
        user: str = "",
        **pool_kwargs: Any,
    ) -> None:
        self.alias = alias
        self.options = options
        self.database = database  # (host, port, dbname), to find pools by database
        self.user = user
        self.reset_session = options.reset_session
        self.fail_fast = options.fail_fast
        self.leak_timeout = options.leak_timeout
        self.log_waits_over = options.log_waits_over
        #: This alias's running record (None: the ``stats`` option is off).
        record = measures.record_for(alias)
        record.config = measures.config_of(options, database, user)
        self.record = record if options.stats else None
        # Checkouts waiting for a connection: thread id -> since when.
        self._waits: dict[int, float] = {}
        # Since when every connection attempt has failed, and the last cause.
        self._failing_since: float | None = None
        self._last_failure = ""
        self._user_configure = options.configure
        self._pid = os.getpid()
        self._leased: set[PooledConnection] = set()
        # Returned by a thread and kept for its next checkout (see release()).
        self._parked: dict[PooledConnection, float] = {}
        self._local = threading.local()
        super().__init__(
            kwargs=kwargs,
            connection_class=PooledConnection,
            open=False,
            name=options.name or alias,
            check=check,
            configure=self._configure_new if options.configure else None,
            reset=options.reset,
            **pool_kwargs,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} alias={self.alias!r} at 0x{id(self):x}>"

    # -- checkout ----------------------------------------------------------

    def getconn(self, timeout: float | None = None) -> PooledConnection:
        """Check out a clean, live connection or raise ``PoolExhausted``.

        Unlike the base class, a connection found dead is replaced at once:
        detecting it cost no round trip, so there is nothing to back off from.
        """
        self._check_open_getconn()
        self._stats[self._REQUESTS_NUM] += 1
        if timeout is None:
            timeout = self.timeout
        t0 = monotonic()
        deadline = t0 + timeout
        local = self._local
        conn: PooledConnection | None = getattr(local, "parked", None)
        if conn is not None:
            local.parked = None
            # Ours again unless another thread took it meanwhile.
            if self._parked.pop(conn, None) is not None:
                if self._pool and not _reset_done(conn):
                    # Its reset is still in flight and a connection in the
                    # pool is idle: take that one, let this one finish.
                    conn = self._swap(conn)
                if conn is not None and self._take(conn, deadline):
                    self._checked_out(conn, t0)
                    return conn
        record = self.record
        if self._failing_since is not None and self.fail_fast and self._holds_nothing():
            with self._lock:
                self._maybe_grow_pool()  # an attempt is always under way
            if record is not None:
                record.counters.errors += 1
            raise self._unavailable()
        waits = self._waits
        ident = threading.get_ident()
        waits[ident] = t0
        try:
            while True:
                try:
                    conn = self._getconn_unchecked(deadline - monotonic())
                except PoolTimeout:
                    if record is not None:
                        record.counters.timeouts += 1
                    raise self._exhausted(
                        f"no connection was free after {monotonic() - t0:.2f} s", t0
                    ) from None
                except TooManyRequests:
                    if record is not None:
                        record.counters.rejected += 1
                    raise self._exhausted(
                        f"the queue is full (max_waiting={self.max_waiting})", t0
                    ) from None
                except BaseException:
                    if record is not None:
                        record.counters.errors += 1
                    raise
                if self._take(conn, deadline):
                    self._checked_out(conn, t0)
                    return conn
        finally:
            del waits[ident]

    def _swap(self, conn: PooledConnection) -> PooledConnection | None:
        """Put *conn* in the pool and take its oldest idle connection instead.

        A return and a checkout in one critical section: an idle connection
        in the pool means nobody is waiting, so *conn* goes to the pool.
        """
        with self._lock:
            if self._pool and not self._closed:
                other = self._pool.popleft()
                conn._pool = None  # as _add_to_pool does
                self._pool.append(conn)
                other._pool = self  # as getconn does
                return other
        self._add_to_pool(conn)
        return None

    def _checked_out(self, conn: PooledConnection, t0: float) -> None:
        conn._dpp_out_at = now = monotonic()
        waited = now - t0
        if (record := self.record) is not None:
            record.counters.checkouts += 1
            record.wait.observe(waited)
        if self.leak_timeout is not None:
            # Lines are looked up only if the leak is reported.
            conn._dpp_stack = traceback.StackSummary.extract(
                traceback.walk_stack(None), lookup_lines=False
            )
        if self.log_waits_over is not None and waited > self.log_waits_over:
            logger.warning(
                "pool %r: a checkout waited %.2f s for a connection (%s)",
                self.name,
                waited,
                self._describe_state(),
            )

    def _take(self, conn: PooledConnection, deadline: float) -> bool:
        """Lease a connection taken from the pool, or discard it if unfit."""
        conn._dpp_deadline = deadline
        if conn._created_at <= self._drained_at or conn._expire_at <= monotonic():
            self._close_connection(conn, "lifetime")
            self._return_connection(conn, from_getconn=True)
            return False
        try:
            self._check_connection(conn)
        except Exception as exc:
            logger.info("pool %r: discarding a connection at checkout: %s", self.name, exc)
            self._close_connection(conn)  # broken, or its reset failed
            self._return_connection(conn, from_getconn=True)
            return False
        except BaseException:
            self._return_connection(conn, from_getconn=True)
            raise
        finally:
            conn._dpp_deadline = None  # pool.check() later gives its own
        self._lease(conn)
        return True

    def _get_ready_connection(self, timeout: float | None) -> PooledConnection | None:
        # Under the pool's lock. An idle connection parked by another thread
        # is as good as one in the pool: take it before waiting or growing.
        if not self._pool and self._parked:
            try:
                conn, _ = self._parked.popitem()
            except KeyError:  # its thread took it back meanwhile
                pass
            else:
                return conn
        if not self._pool and self.max_waiting and len(self._waiting) >= self.max_waiting:
            # psycopg_pool (3.3) leaves a client that timed out in the queue
            # until a connection is handed out, and counts it against
            # max_waiting: drop those before judging the queue full.
            live = [w for w in self._waiting if w.conn is None and w.error is None]
            if len(live) < len(self._waiting):
                self._waiting.clear()
                self._waiting.extend(live)
        ready = super()._get_ready_connection(timeout)
        if ready is None and (record := self.record) is not None:
            record.counters.checkouts_waited += 1  # it will queue
        return ready

    def _holds_nothing(self) -> bool:
        """No connection idle, parked or in use: none could come back."""
        return not (self._pool or self._parked or self._leased)

    def _unavailable(self) -> ServerUnavailable:
        since = self._failing_since
        failing_for = monotonic() - since if since is not None else 0.0
        return ServerUnavailable(
            f"Database alias {self.alias!r} is unavailable: connection attempts have "
            f"failed for {failing_for:.1f} s, the last with: {self._last_failure}. "
            "The pool keeps retrying and serves again as soon as one succeeds "
            "(pool option fail_fast=False makes checkouts wait up to timeout instead).",
            alias=self.alias,
            cause=self._last_failure,
            failing_for=failing_for,
        )

    def _exhausted(self, why: str, t0: float) -> PoolExhausted:
        waited = monotonic() - t0
        waiting = self._count_waiting()
        in_use = len(self._leased)
        cause = ""
        if self._failing_since is not None:
            cause = (
                f" Connection attempts have been failing for "
                f"{monotonic() - self._failing_since:.1f} s: {self._last_failure}."
            )
        logger.warning(
            "pool %r exhausted: %s (max_size=%d, in use=%d, waiting=%d, waited %.2f s)",
            self.name,
            why,
            self.max_size,
            in_use,
            waiting,
            waited,
        )
        return PoolExhausted(
            f"Connection pool for database alias {self.alias!r} exhausted: {why} "
            f"(max_size={self.max_size}, in use={in_use}, waiting={waiting}, "
            f"waited {waited:.2f} s).{cause} Return connections sooner, raise "
            "max_size, or raise timeout.",
            alias=self.alias,
            max_size=self.max_size,
            in_use=in_use,
            waiting=waiting,
            waited=waited,
        )

    def _check_connection(self, conn: PooledConnection) -> None:
        # Runs for every checkout, before psycopg_pool's own check: finish
        # the reset sent at return, then make sure the server did not close
        # the session while it was idle.
        if conn._dpp_reset_pending:
            self._finish_reset(conn)
        if not _socket_alive(conn):
            raise psycopg.OperationalError("the server closed the connection while it was idle")
        super()._check_connection(conn)

    def _lease(self, conn: PooledConnection) -> None:
        conn._dpp_generation += 1
        conn._dpp_pool = self
        self._leased.add(conn)
        leases = _thread_leases()
        leases.add(conn)
        conn._dpp_leases = leases

    # -- return ------------------------------------------------------------

    def putconn(self, conn: PooledConnection) -> None:
        self._unlease(conn)
        super().putconn(conn)

    def release(self, conn: PooledConnection) -> None:
        """Return a connection from the thread that holds it (Django's close).

        The connection is reset as by putconn() and then *parked*: kept
        for this thread's next checkout, which then skips the pool's lock
        and queue, while any other thread that finds the pool empty takes
        it. It goes to the pool's queue instead when a client is waiting.
        """
        self._unlease(conn)
        self._check_pool_putconn(conn)
        if self._maybe_close_connection(conn):
            return
        self._return_connection(conn, from_getconn=False, park=True)

    def _unlease(self, conn: PooledConnection) -> None:
        conn._dpp_generation += 1
        self._leased.discard(conn)
        if (record := self.record) is not None or conn._dpp_leak_reported:
            held = monotonic() - conn._dpp_out_at
            if record is not None:
                record.hold.observe(held)
            if conn._dpp_leak_reported:
                conn._dpp_leak_reported = False
                logger.info(
                    "pool %r: the connection reported as leaked came back after %.1f s",
                    self.name,
                    held,
                )
        conn._dpp_stack = None
        if (leases := conn._dpp_leases) is not None:
            leases.discard(conn)
            conn._dpp_leases = None
        conn._dpp_owner = None

    def _return_connection(
        self, conn: PooledConnection, from_getconn: bool, park: bool = False
    ) -> None:
        # The base class's, with parking (see release()).
        self._reset_connection(conn)
        if conn.pgconn.transaction_status == _UNKNOWN:
            self._stats[self._RETURNS_BAD if not from_getconn else self._CONNECTIONS_LOST] += 1
            if not conn._dpp_close_counted:
                # Closed while in use (terminated, network gone): lost, not
                # closed by the pool. At checkout, _take() already counted it.
                conn._dpp_close_counted = True
                if (record := self.record) is not None:
                    record.counters.lost += 1
            logger.info("pool %r: replacing a closed connection", self.name)
            self.run_task(AddConnection(self))
            return
        if conn._created_at <= self._drained_at or conn._expire_at <= monotonic():
            logger.info("pool %r: discarding expired connection", self.name)
            self._close_connection(conn, "lifetime")
            self.run_task(AddConnection(self))
            return
        if park:
            with self._lock:
                if not self._waiting and not self._closed:
                    self._parked[conn] = monotonic()
                    self._local.parked = conn
                    return
        self._add_to_pool(conn)

    def _unpark(self, idle_for: float = 0.0) -> int:
        """Move parked connections idle for *idle_for* seconds to the pool."""
        limit = monotonic() - idle_for
        moved = 0
        for conn, parked_at in list(self._parked.items()):
            if parked_at <= limit and self._parked.pop(conn, None) is not None:
                self._add_to_pool(conn)
                moved += 1
        return moved

    def _shrink_pool(self) -> None:
        # A parked connection is idle: let max_idle close it as it would
        # close one waiting in the pool.
        if moved := self._unpark(idle_for=self.max_idle):
            with self._lock:
                self._nconns_min += moved
        self._local.close_reason = "idle"
        try:
            super()._shrink_pool()
        finally:
            self._local.close_reason = None

    def _close_connection(self, conn: PooledConnection, reason: str | None = None) -> None:
        """Close a connection, counted under why (see measures.CLOSE_REASONS)."""
        if not conn._dpp_close_counted:
            conn._dpp_close_counted = True
            if reason is None:
                reason = conn._dpp_close_hint or getattr(self._local, "close_reason", None)
            if reason is None:
                if self._closed:
                    reason = "shutdown"
                elif conn._created_at <= self._drained_at or conn._expire_at <= monotonic():
                    reason = "lifetime"
                else:
                    reason = "broken"
            if (record := self.record) is not None:
                record.closed(reason)
            log = logger.debug if reason == "shutdown" else logger.info
            log("pool %r: closed a connection (%s)", self.name, reason)
        super()._close_connection(conn)

    def _putconn(self, conn: PooledConnection, from_getconn: bool) -> None:
        # Always in the returning thread. psycopg_pool hands returns to its
        # workers when a reset callback is set, where they queue behind
        # connection attempts (up to connect_timeout each to a silent server)
        # while the pool looks exhausted.
        self._return_connection(conn, from_getconn=from_getconn)

    def _reset_connection(self, conn: PooledConnection) -> None:
        """Roll back, restore the connection object, send the session reset.

        Replaces the base class's version, which logs a warning for what
        Django does routinely (returning a connection with autocommit off).
        """
        pgconn = conn.pgconn
        status = pgconn.transaction_status
        if status == _UNKNOWN:
            return
        try:
            if status in (_INTRANS, _INERROR):
                logger.debug("pool %r: rolling back a returned connection", self.name)
                conn.rollback()  # psycopg forgets its prepared statements too
            elif status != _IDLE:  # ACTIVE: returned in the middle of a query
                raise psycopg.OperationalError("connection returned while a query was running")
            if self._reset is not None:
                self._reset(conn)
            # What a request changed on the psycopg object itself (these
            # are client-side: no I/O).
            if not conn.autocommit:
                conn.autocommit = True
            if conn.read_only is not None:
                conn.read_only = None
            if conn.deferrable is not None:
                conn.deferrable = None
            if conn.isolation_level is not None:
                conn.isolation_level = None
            if pgconn.transaction_status != _IDLE:
                raise psycopg.ProgrammingError("reset left the connection in a transaction")
            if self.reset_session:
                # Sent now, collected at the next checkout: the answer
                # arrives while the connection waits in the pool.
                pgconn.send_query(_DISCARD_ALL)
                conn._dpp_reset_pending = True
                if (record := self.record) is not None:
                    record.counters.resets += 1
        except Exception as exc:
            logger.info("pool %r: discarding a returned connection: %s", self.name, exc)
            self._close_connection(conn, "reset_failed")

    def _finish_reset(self, conn: PooledConnection) -> None:
        conn._dpp_reset_pending = False
        pgconn = conn.pgconn
        fd = pgconn.socket
        # A server that hangs, or a network gone silent, never answers: give
        # up when the checkout's time is up, and discard the connection.
        deadline = conn._dpp_deadline or monotonic() + self.timeout
        poller = None
        error = None
        # libpq's PQgetResult waits for the socket while holding the GIL when
        # the answer is incomplete: wait in poll() (which releases it) until
        # is_busy() says the answer is there. The server sends its whole
        # answer, CommandComplete and ReadyForQuery, in one write, so once
        # the first part is in, so is the rest, and the results are read
        # without asking again: each is_busy() releases the GIL, and under
        # load from several threads every release can cost a thread switch.
        pgconn.consume_input()
        while pgconn.is_busy():
            left = deadline - monotonic()
            if left <= 0:
                conn._dpp_close_hint = "reset_failed"
                raise psycopg.OperationalError(
                    f"no answer to the session reset within {self.timeout:g} s"
                )
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLIN)
            poller.poll(1000 * left)
            pgconn.consume_input()
        while (res := pgconn.get_result()) is not None:
            if res.status != pq.ExecStatus.COMMAND_OK:
                # Often the session ending (a FATAL, EOF to follow): the
                # connection is discarded, and nothing more is read from it.
                error = res.get_error_message()
                severity = res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
                if severity in (b"FATAL", b"PANIC"):
                    conn._dpp_fatal = True  # closed by the server: broken
                break
        if error is not None:
            if pgconn.status == _CONN_OK and not conn._dpp_fatal:
                conn._dpp_close_hint = "reset_failed"
            raise psycopg.OperationalError(f"session reset failed: {error}")
        _forget_prepared_statements(conn)
        if self._user_configure is not None:
            self._configure_new(conn)

    def _configure_new(self, conn: PooledConnection) -> None:
        # The user's configure; Django's time zone and role travel in the
        # startup packet's options instead, so DISCARD ALL keeps them and no
        # callback needs the Django wrapper (whose use here deadlocks Django's
        # own pool, see DJANGO-NOTES: assume_role).
        assert self._user_configure is not None
        self._user_configure(conn)
        if conn.pgconn.transaction_status != _IDLE:
            conn.rollback()
            raise psycopg.ProgrammingError(
                f"configure {self._user_configure!r} left the connection in a transaction"
            )

    def _connect(self, timeout: float | None = None) -> PooledConnection:
        t0 = monotonic()
        try:
            conn = super()._connect(timeout)
        except Exception as exc:
            if (record := self.record) is not None:
                record.counters.connect_errors += 1
            self._connect_failed(exc)
            raise
        if (record := self.record) is not None:
            record.counters.opened += 1
            record.connect.observe(monotonic() - t0)
        if self._failing_since is not None:
            logger.warning(
                "pool %r: connected again after %.1f s of failed attempts",
                self.name,
                monotonic() - self._failing_since,
            )
            self._failing_since = None
        _watch_for_fatal(conn)
        return conn

    def _connect_failed(self, exc: Exception) -> None:
        # psycopg's messages name the host, port, user and cause, never the
        # password.
        self._last_failure = " ".join(str(exc).split()) or type(exc).__name__
        if self._failing_since is None:
            self._failing_since = monotonic()
            logger.warning(
                "pool %r: cannot connect (%s); retrying in the background",
                self.name,
                self._last_failure,
            )
        if self.fail_fast and self._holds_nothing():
            # Clients already waiting would wait for nothing until timeout.
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            if waiting:
                error = self._unavailable()
                for client in waiting:
                    client.fail(error)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        # psycopg_pool retries a failed connect after 1 s, then doubles the
        # wait up to reconnect_timeout: after a minute-long outage the pool
        # could stay empty a minute after the server is back. Retry sooner
        # and never wait more than RECONNECT_DELAY_MAX between attempts.
        if attempt is None:
            attempt = _ReconnectAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    # -- what it is doing ---------------------------------------------------

    def live_state(self, now: float | None = None) -> measures.Live:
        """Sizes, checkouts and waits at this moment (see measures.Live)."""
        if now is None:
            now = monotonic()
        leased = list(self._leased)
        waits = list(self._waits.values())
        failing = self._failing_since
        return measures.Live(
            open=not self._closed,
            size=self._nconns,
            idle=len(self._pool) + len(self._parked),
            in_use=len(leased),
            waiting=self._count_waiting(),
            oldest_checkout=max((now - c._dpp_out_at for c in leased), default=0.0),
            longest_wait=max((now - t for t in waits), default=0.0),
            failing_for=now - failing if failing is not None else 0.0,
            last_failure=self._last_failure if failing is not None else "",
        )

    def _count_waiting(self) -> int:
        # Clients that timed out stay in psycopg_pool's queue for a while.
        return sum(1 for w in list(self._waiting) if w.conn is None and w.error is None)

    def _describe_state(self) -> str:
        live = self.live_state()
        return (
            f"size={live.size}, max_size={self.max_size}, idle={live.idle}, "
            f"in use={live.in_use}, waiting={live.waiting}"
        )

    def _find_leaks(self) -> None:
        """Log each connection held longer than leak_timeout, once."""
        limit = self.leak_timeout
        if limit is None:
            return
        now = monotonic()
        for conn in list(self._leased):
            if conn._dpp_leak_reported or now - conn._dpp_out_at < limit:
                continue
            stack = conn._dpp_stack
            if stack is None:
                continue  # returned meanwhile
            conn._dpp_leak_reported = True
            if (record := self.record) is not None:
                record.counters.leaks += 1
            where = "".join(traceback.StackSummary.from_list(list(reversed(stack))).format())
            logger.warning(
                "pool %r: a connection has been checked out for %.1f s (leak_timeout=%g); "
                "it was checked out at:\n%s",
                self.name,
                now - conn._dpp_out_at,
                limit,
                where,
            )

    # -- pool-wide operations ---------------------------------------------

    def _get_measures(self) -> dict[str, int]:
        # A parked connection is idle and any thread can take it.
        measures = super()._get_measures()
        measures[self._POOL_AVAILABLE] += len(self._parked)
        return measures

    def check(self) -> None:
        """As psycopg_pool's, after collecting resets pending on idle connections."""
        self._unpark()
        with self._lock:
            conns = list(self._pool)
        closed = 0
        for conn in conns:
            if conn._dpp_reset_pending:
                try:
                    self._finish_reset(conn)
                except Exception:
                    self._close_connection(conn)
                    closed += 1
        lost = self._stats[self._CONNECTIONS_LOST]
        super().check()
        # The base class drops the broken ones it finds (ours included).
        broken = self._stats[self._CONNECTIONS_LOST] - lost - closed
        if broken > 0 and (record := self.record) is not None:
            record.closed("broken", broken)

    def _start_initial_tasks(self) -> None:
        super()._start_initial_tasks()
        logger.info(
            "pool %r opened for alias %r (min_size=%d, max_size=%d, %s)",
            self.name,
            self.alias,
            self.min_size,
            self.max_size,
            "{}:{}/{}".format(*self.database),
        )
        if self.leak_timeout is not None:
            self.run_task(Schedule(self, _FindLeaks(self), self.leak_timeout / 2))
        from .transport import ensure_publishing

        ensure_publishing()

    def close(self, timeout: float = 5.0) -> None:
        if self._pid != os.getpid():
            # Inherited through fork: the parent owns its sockets and threads.
            self._disown()
            return
        was_open = not self._closed
        self._unpark()  # into the pool, which closes them
        super().close(timeout)
        if was_open:
            logger.info("pool %r closed (alias %r)", self.name, self.alias)
        # Parked by a thread between the two calls above: nothing parks
        # in a closed pool, so these are the last.
        for conn in list(self._parked):
            if self._parked.pop(conn, None) is not None:
                self._close_connection(conn)

    def _disown(self) -> None:
        """Forget an inherited pool without I/O, locks or threads."""
        if self._pid == -1:
            return  # done already
        self._pid = -1
        self._closed = True  # also keeps __del__ from signalling dead workers
        conns = list(self._pool) + list(self._leased) + list(self._parked)
        self._parked.clear()
        for w in list(self._waiting):
            if w.conn is not None:
                conns.append(w.conn)
        # Counted in the child's own record (measures.forget_all() ran).
        record = measures.record_for(self.alias)
        record.config = record.config or measures.config_of(self.options, self.database, self.user)
        if self.record is not None and conns:
            record.closed("fork", len(conns))
        for conn in conns:
            _neutralize(conn)
            conn._dpp_pool = None
            owner = conn._dpp_owner() if conn._dpp_owner is not None else None
            if owner is not None and owner.connection is conn:
                # The forking thread's Django wrapper: connect afresh.
                owner.connection = None
        self._leased.clear()


#: Longest wait between two attempts to open a connection to a server that
#: refused the last one (seconds): a bounded rate, a quick recovery.
RECONNECT_DELAY_MAX = 0.5


class _FindLeaks(MaintenanceTask):
    """Look for leaked connections every leak_timeout / 2 seconds."""

    def _run(self, pool: ConnectionPool[Any]) -> None:
        assert isinstance(pool, DjangoPool) and pool.leak_timeout is not None
        pool.schedule_task(self, pool.leak_timeout / 2)
        pool._find_leaks()


class _ReconnectAttempt(AttemptWithBackoff):
    INITIAL_DELAY = 0.05

    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_DELAY_MAX)


def _socket_alive(conn: PooledConnection) -> bool:
    """True unless the server closed the session: no round trip, no GIL release.

    An idle connection's socket has nothing to read; a backend that was
    terminated left its FATAL message and then EOF there. Reading is
    PQconsumeInput on the non-blocking socket (EOF fails it) and parsing is
    PQgetResult, which on an idle connection never waits and hands an error
    to the notice handler. Both keep the GIL: poll() and PQisBusy release it,
    and under load from several threads each release can cost the checkout
    a thread switch.
    """
    pgconn = conn.pgconn
    if conn._dpp_fatal or pgconn.status != _CONN_OK:
        return False
    try:
        pgconn.consume_input()
        if pgconn.transaction_status != _ACTIVE:  # no query pending: never waits
            pgconn.get_result()
    except psycopg.OperationalError:
        return False
    return not conn._dpp_fatal and pgconn.status == _CONN_OK


def _reset_done(conn: PooledConnection) -> bool:
    """Whether the answer to a pending session reset has arrived (no wait)."""
    if not conn._dpp_reset_pending:
        return True
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()  # libpq's socket is non-blocking: never waits
    except psycopg.OperationalError:
        return True  # broken: the checkout's own check will say so
    return not pgconn.is_busy()


def _forget_prepared_statements(conn: psycopg.Connection[Any]) -> None:
    """DISCARD ALL dropped the server's prepared statements: tell psycopg.

    psycopg clears its cache only when DISCARD ALL goes through its own
    execute(); ours went through the low-level connection. Emptying the
    cache (without queueing a DEALLOCATE) keeps the two in agreement.
    """
    prepared = conn._prepared
    prepared._names.clear()
    prepared._counts.clear()
    prepared._to_flush.clear()


_devnull_fd: int | None = None


def _neutralize(conn: psycopg.Connection[Any]) -> None:
    """Point an inherited connection's socket at /dev/null.

    Whatever happens to the object afterwards (close, garbage collection,
    TLS shutdown), its bytes go nowhere and the parent's session is intact.
    """
    global _devnull_fd
    try:
        fd = conn.pgconn.socket
    except Exception:
        return  # already closed
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDWR)
    os.dup2(_devnull_fd, fd)


# -- leases held by threads ------------------------------------------------


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
        assert isinstance(pool, DjangoPool)
        conn = self.conn
        if conn._dpp_generation != self.generation or conn not in pool._leased:
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
        if (record := pool.record) is not None:
            record.counters.reclaimed += 1
        pool.putconn(conn)


# -- the registry of this process's pools ---------------------------------

_pools: dict[Hashable, DjangoPool] = {}
_pools_pid = os.getpid()
_pools_lock = threading.Lock()


def get_pool(key: Hashable, alias: str, create: Callable[[], DjangoPool]) -> DjangoPool:
    """The pool for *key*, created on first use in this process.

    A pool made for other settings of the same alias (the test runner renamed
    the database, a test changed TIME_ZONE) is closed: nothing checks out
    from it any more.
    """
    if _pools_pid != os.getpid():
        _after_fork_in_child()
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


def pools(alias: str | None = None) -> list[DjangoPool]:
    """This process's pools (of one alias), without creating any."""
    if _pools_pid != os.getpid():
        _after_fork_in_child()
    return [p for p in list(_pools.values()) if alias is None or p.alias == alias]


def close_pools(predicate: Callable[[DjangoPool], bool]) -> None:
    """Close and forget every pool of this process matching *predicate*."""
    with _pools_lock:
        doomed = [k for k, p in _pools.items() if predicate(p)]
        closing = [_pools.pop(k) for k in doomed]
    for pool in closing:
        pool.close()


def release(conn: PooledConnection, generation: int) -> None:
    """Give a connection back to the pool it came from (Django's close)."""
    pool = conn._dpp_pool
    if pool is None or conn._dpp_generation != generation:
        return  # already given back (its thread ended, or the pool was forked)
    if pool._pid != os.getpid():
        # Forked without os.register_at_fork running (a C-level fork).
        _neutralize(conn)
        conn.close()
        return
    pool.release(conn)


def _after_fork_in_child() -> None:
    global _pools_pid, _pools_lock
    _pools_lock = threading.Lock()  # the parent may have held it
    measures.forget_all()
    inherited = list(_pools.values())
    _pools.clear()
    _pools_pid = os.getpid()
    for pool in inherited:
        pool._disown()
    _inherited.extend(inherited)


# Inherited pools stay referenced: their objects are never finalized in the child.
_inherited: list[DjangoPool] = []

os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    if _pools_pid != os.getpid():
        return
    for pool in pools():
        try:
            pool.close(timeout=1.0)
        except Exception:  # pragma: no cover - best effort at exit
            logger.debug("pool %r: error closing at exit", pool.name, exc_info=True)
