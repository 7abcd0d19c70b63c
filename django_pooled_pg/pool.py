"""``DjangoPool``: psycopg_pool's ConnectionPool, shaped for a Django alias.

A pooled connection goes round one loop:

* checkout (``getconn``): a connection parked by this thread, else one from
  the pool; the session reset sent at its previous return is collected and
  the socket is checked for a backend the server closed while the
  connection sat idle (``session``), and it is leased to the calling thread
  (``leases``);
* return (``release``, Django's close): the session reset is *sent* without
  waiting for its answer (``session.send_reset``), and the connection is
  parked for this thread's next checkout, where any other thread can take
  it too.

This module holds the loop and the psycopg_pool hooks it overrides; what
each step does lives in the module named for it: ``session`` (the pooled
connection, its reset and liveness), ``leases`` (thread leases, dead-thread
reclaim, leak reports), ``failures`` (failed connection attempts, fail-fast,
exhaustion), ``observability.records`` (what the pool reports, through its
``recorder``). Every private psycopg_pool name used here is listed in
``upstream``.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from time import monotonic
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout, TooManyRequests
from psycopg_pool.base import AttemptWithBackoff
from psycopg_pool.pool import AddConnection, Schedule

from . import holders, leases, roles, session, trace, watch
from .errors import PoolExhausted, ServerUnavailable
from .failures import Outage, ReconnectAttempt, exhausted
from .observability import records
from .options import PoolOptions
from .session import IDLE, UNKNOWN, PooledConnection
from .startup import StartupOptionsRefused, StartupSettings

logger = logging.getLogger("django_pooled_pg")

#: Called once per pool with its first new connection to a server (not a
#: pooler), by what watches the pools: the app checks there that the
#: deployment fits the server's max_connections. Each must leave the
#: connection idle; what one raises is logged, never raised.
FIRST_CONNECTION_HOOKS: list[Callable[[DjangoPool, PooledConnection], None]] = []


class DjangoPool(ConnectionPool[PooledConnection]):
    """psycopg_pool's ConnectionPool, shaped for a Django alias.

    Differences from the base class, each for a reason stated where it lives:
    a checkout never sleeps after finding a dead connection, it raises
    ``PoolExhausted`` naming the alias and the pool's state, returned
    connections are reset without a round trip and parked for their thread.
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
        startup: StartupSettings | None = None,
        role: str = roles.ANY,
    ) -> None:
        self.alias = alias
        #: What server the sessions must be on (roles.py): "primary", "standby" or "any".
        self.role = role
        # Not behind a pooler: it answers with the parameters of its first
        # server login, whichever server a session now reaches.
        self._check_role = role != roles.ANY and options.pgbouncer is None
        # Counts the first connections configured (next() is atomic): hooks run once.
        self._first_connections = itertools.count()
        # Idle connections taken out of _pool to be looked at (_sweep_idle, check).
        self._set_aside = 0
        # When the last role change drained the pool (monotonic; 0: never).
        self._role_drained_at = 0.0
        #: The engine's own session settings (time zone, role) and where they travel.
        self.startup = startup if startup is not None else StartupSettings(alias, {})
        self._kwargs = kwargs
        #: Whether a pooler stands before the server (None: not known yet).
        self.behind_pooler: bool | None = None
        self.options = options
        self.database = database  # (host, port, dbname), to find pools by database
        self.user = user
        self.pid = os.getpid()  # -1 once disowned in a forked child
        #: The password-free view of the options that poolstats shows.
        self.config = records.PoolConfig.build(
            database, user, {**options.shown(), "server_role": role}
        )
        record = records.record_for(alias)
        record.config = self.config
        #: Where the pool reports what it does (records nothing with stats off).
        self.recorder = records.recorder_for(alias, options.name or alias, options.stats)
        # Checkouts waiting for a connection: thread id -> since when.
        self._waits: dict[int, float] = {}
        # Of those, the ones that found nothing idle and queued (holders' wait caused).
        self._queued: dict[int, float] = {}
        self.outage = Outage()
        self._leased: set[PooledConnection] = set()
        # Returned by a thread and kept for its next checkout (see release()).
        self._parked: dict[PooledConnection, float] = {}
        self._local = threading.local()
        # Who each checkout is charged to (holders.py): off, its context, or a stack walk too.
        self._holders = options.holders is not False
        self._walk_stack = options.holders == "stack"
        #: reset_session="auto": connections are watched (watch.py).
        self._auto_reset = options.reset_session == "auto"
        if self._auto_reset:
            watch.install()
        super().__init__(
            kwargs=self._connection_kwargs,
            connection_class=PooledConnection,
            open=False,
            name=options.name or alias,
            check=check,
            configure=self._configure_session,
            **options.psycopg_pool_kwargs(),
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
                if self._pool and not session.reset_done(conn):
                    # Its reset is still in flight and a connection in the
                    # pool is idle: take that one, let this one finish.
                    conn = self._swap(conn)
                if conn is not None and self._take(conn, deadline):
                    self._checked_out(conn, t0)
                    return conn
        if self.outage.ongoing and self.options.fail_fast and self._holds_nothing():
            with self._lock:
                self._maybe_grow_pool()  # an attempt is always under way
            self.recorder.failed()
            raise self.outage.unavailable(self.alias, self.role)
        waits = self._waits
        ident = threading.get_ident()
        waits[ident] = t0
        conn = None  # a parked one given up above is no longer this checkout's
        try:
            while True:
                try:
                    conn = self._getconn_unchecked(deadline - monotonic())
                except PoolTimeout:
                    self.recorder.timed_out()
                    raise self._exhausted(
                        f"no connection was free after {monotonic() - t0:.2f} s", t0
                    ) from None
                except TooManyRequests:
                    self.recorder.rejected()
                    raise self._exhausted(
                        f"the queue is full (max_waiting={self.max_waiting})", t0
                    ) from None
                except BaseException:
                    self.recorder.failed()
                    raise
                if self._take(conn, deadline):
                    self._checked_out(conn, t0)
                    return conn
        finally:
            del waits[ident]
            # Empty but for checkouts that queued: no lookup on the usual path.
            # (Popped whatever the holders option: it must not grow.)
            queued = self._queued.pop(ident, None) if self._queued else None
            if queued is not None and self._holders:
                self._charge_wait(queued, conn)

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

    def _take(self, conn: PooledConnection, deadline: float) -> bool:
        """Lease a connection taken from the pool, or replace it if unfit."""
        if self._expired(conn):
            self._replace(conn, self._expiry_reason(conn))
            return False
        conn._dpp_deadline = deadline
        try:
            self._check_connection(conn)
        except roles.RoleChanged as exc:
            # Read-only by the session's own SET (with reset_session off):
            # this connection only; by the server's settings: all of them.
            server_wide = exc.server_wide or roles.read_only_by_server(conn)
            self._replace(conn, "role_change")
            if server_wide:
                self._role_changed(str(exc))
            return False
        except Exception as exc:
            logger.info("pool %r: discarding a connection at checkout: %s", self.name, exc)
            self._stats[self._CONNECTIONS_LOST] += 1  # as psycopg_pool counts it
            self._replace(conn, session.close_reason(exc))
            if isinstance(exc, session.SessionBroken):
                self._sweep_idle()
            return False
        except BaseException:
            self._return_connection(conn, from_getconn=True)
            raise
        finally:
            conn._dpp_deadline = None  # pool.check() later gives its own
        self._leased.add(conn)
        leases.lease(conn, self, self.options.leak_timeout)
        return True

    def _checked_out(self, conn: PooledConnection, t0: float) -> None:
        conn._dpp_out_at = now = monotonic()  # before the holder: _charge_wait reads both
        if self._holders:
            conn._dpp_holder = holders.holder(self._walk_stack)
        waited = now - t0
        self.recorder.checked_out(waited)
        if trace.ever_started and (watched := trace.current()) is not None:
            self._traced(watched, conn, waited, now)
        limit = self.options.log_waits_over
        if limit is not None and waited > limit:
            logger.warning(
                "pool %r: a checkout waited %.2f s for a connection (%s)",
                self.name,
                waited,
                self._describe_state(),
            )

    def _traced(
        self, watched: trace.Trace, conn: PooledConnection, waited: float, now: float
    ) -> None:
        holder = conn._dpp_holder
        entry = trace.Entry(
            alias=self.alias,
            holder=holder.name if holder is not None else None,
            cell=holder,
            waited=waited,
            new=conn._dpp_generation == 1,  # leased once: now
            backend_pid=conn.pgconn.backend_pid,
            at=now,
        )
        watched.entries.append(entry)
        conn._dpp_trace = (watched, entry)

    def _trace_returned(self, watched: trace.Trace, entry: trace.Entry) -> None:
        """The watched checkout is back (reset sent, skipped, or discarded): say so."""
        if entry.reset is None:
            entry.reset = "discarded"
        if watched.on_return is not None:
            try:
                watched.on_return()
            except Exception:  # a watcher must never fail a return
                logger.exception("pool %r: the checkout trace's listener failed", self.name)

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
        if ready is None:
            self.recorder.queued()
            ident = threading.get_ident()
            self._queued.setdefault(ident, self._waits.get(ident, monotonic()))
        return ready

    def _check_connection(self, conn: PooledConnection) -> None:
        # Runs for every checkout, before psycopg_pool's own check: finish
        # the reset sent at return, then make sure the server did not close
        # the session while it was idle.
        if conn._dpp_reset_pending:
            self._collect_reset(conn)
        if not session.socket_alive(conn):
            raise session.SessionBroken("the server closed the connection while it was idle")
        if self._check_role:
            # Checked at return; since then only a collected reset or a
            # check() can have brought news (they clear the flag).
            if not conn._dpp_role_checked and (why := roles.mismatch(conn, self.role)):
                raise roles.RoleChanged(why, server_wide=why is not roles.READ_ONLY)
            conn._dpp_role_checked = False  # the request may hear a change
        super()._check_connection(conn)

    def _collect_reset(self, conn: PooledConnection) -> None:
        deadline = conn._dpp_deadline or monotonic() + self.timeout
        session.collect_reset(conn, deadline, self.timeout)
        conn._dpp_role_checked = False  # its answer carries what RESET ALL restored
        # The engine's own settings rode with the reset (send_reset); the
        # user's configure runs again, so that what it sets survives resets.
        if self.options.configure is not None:
            self._configure_user(conn)
        if self._auto_reset:
            watch.mark_clean(conn)

    def unavailable(self) -> ServerUnavailable | None:
        """Whether a checkout has nothing to count on now (no I/O), for routers.

        A ServerUnavailable while every connection attempt since the last
        success has failed and no idle connection is left (those in use may
        hang on a silent server: a checkout would wait for them), else None.
        """
        if not self.outage.ongoing:
            return None
        if self._pool or self._parked:
            # Idle sessions the server may have ended since: their sockets tell.
            self._sweep_idle()
        if not (self._pool or self._parked or self._set_aside):
            return self.outage.unavailable(self.alias, self.role)
        return None

    def _holds_nothing(self) -> bool:
        """No connection idle, parked or in use: none could come back."""
        return not (self._pool or self._parked or self._leased or self._set_aside)

    def _exhausted(self, why: str, t0: float) -> PoolExhausted:
        return exhausted(
            self.name,
            self.alias,
            why,
            max_size=self.max_size,
            in_use=len(self._leased),
            waiting=self._count_waiting(),
            waited=monotonic() - t0,
            outage=self.outage,
            holders=self.holders_in_use() if self._holders else None,
        )

    # -- return ------------------------------------------------------------

    def putconn(self, conn: PooledConnection) -> None:
        traced = self._unlease(conn)
        super().putconn(conn)
        if traced is not None:
            traced[1].reset = traced[1].reset or "returned"
            self._trace_returned(*traced)

    def release(self, conn: PooledConnection) -> None:
        """Return a connection from the thread that holds it (Django's close).

        The connection is reset as by putconn() and then *parked*: kept
        for this thread's next checkout, which then skips the pool's lock
        and queue, while any other thread that finds the pool empty takes
        it. It goes to the pool's queue instead when a client is waiting.
        """
        traced = self._unlease(conn)
        self._check_pool_putconn(conn)
        if not self._maybe_close_connection(conn):
            self._return_connection(
                conn, from_getconn=False, park=True, entry=traced[1] if traced else None
            )
        if traced is not None:
            self._trace_returned(*traced)

    def _unlease(self, conn: PooledConnection) -> tuple[trace.Trace, trace.Entry] | None:
        """End the checkout (stats, holder, lease); its toolbar trace, if watched."""
        self._leased.discard(conn)
        now = monotonic()
        out_at = conn._dpp_out_at
        held = now - out_at
        self.recorder.returned(held)
        # Taken off now: once returned, another thread may check it out.
        if (traced := conn._dpp_trace) is not None:
            conn._dpp_trace = None
            traced[1].held = held
        if (holder := conn._dpp_holder) is not None:
            conn._dpp_holder = None
            self.recorder.held_by(holder, held)
            if self._queued and len(self._leased) + 1 >= self.max_size:
                # Checkouts queued while it held this connection in a full pool: its share.
                waited = sum(now - max(t, out_at) for t in list(self._queued.values()))
                self.recorder.caused_wait(holder.name, waited / self.max_size)
        leases.unlease(conn, self.name, held)
        return traced

    def _charge_wait(self, t0: float, mine: PooledConnection | None) -> None:
        """A checkout that queued since *t0* ended: charge the holders still out.

        Only while the pool is full (else it waited for a new connection to
        open: nobody's doing). Each connection in use shares the wait by its
        time out within it, divided by max_size, so the wait charged to all
        holders adds up to the time spent queued. Those returned during the
        wait were charged at their return; *mine* is the waiter's own
        connection, if it got one.
        """
        now = monotonic()
        leased = list(self._leased)
        if len(leased) < self.max_size:
            return
        for conn in leased:
            if conn is mine:
                continue
            holder = conn._dpp_holder
            if holder is not None and (share := now - max(t0, conn._dpp_out_at)) > 0:
                self.recorder.caused_wait(holder.name, share / self.max_size)

    def holders_in_use(self) -> list[tuple[str, float]]:
        """Who holds the connections in use now, longest-held first: (holder, seconds)."""
        now = monotonic()
        out = []
        for c in list(self._leased):
            holder = c._dpp_holder  # read once: its thread may return it meanwhile
            out.append(
                (holder.name if holder is not None else holders.UNKNOWN, now - c._dpp_out_at)
            )
        return sorted(out, key=lambda h: h[1], reverse=True)

    def _putconn(self, conn: PooledConnection, from_getconn: bool) -> None:
        # Always in the returning thread. psycopg_pool hands returns to its
        # workers when a reset callback is set, where they queue behind
        # connection attempts (up to connect_timeout each to a silent server)
        # while the pool looks exhausted.
        self._return_connection(conn, from_getconn=from_getconn)

    def _return_connection(
        self,
        conn: PooledConnection,
        from_getconn: bool,
        park: bool = False,
        entry: trace.Entry | None = None,
    ) -> None:
        # The base class's, with the reset sent, not awaited, and parking.
        # (Its _reset_connection, which this replaces, warns about what
        # Django does routinely: returning a connection with autocommit off.)
        if conn.pgconn.transaction_status == UNKNOWN:
            # Closed while out of the pool (terminated, network gone).
            if from_getconn:  # handed to a checkout that had given up
                self._stats[self._CONNECTIONS_LOST] += 1
                self.recorder.closed("broken")
            else:
                self._stats[self._RETURNS_BAD] += 1
                self.recorder.lost()
            logger.info("pool %r: replacing a closed connection", self.name)
            self.run_task(AddConnection(self))
            self._sweep_idle()
            return
        if self._expired(conn):
            logger.info("pool %r: discarding expired connection", self.name)
            self._replace(conn, self._expiry_reason(conn))
            return
        if self._check_role:
            if self._returned_on_wrong_server(conn):
                return
            conn._dpp_role_checked = True
        try:
            done = session.send_reset(
                conn, self._reset, self.options.reset_session, self.startup.sql
            )
        except Exception as exc:
            logger.info("pool %r: discarding a returned connection: %s", self.name, exc)
            self._replace(conn, "reset_failed")
            return
        if done is session.SENT:
            self.recorder.reset_sent()
        elif done is session.SKIPPED:
            self.recorder.reset_skipped()
        if entry is not None:  # the toolbar panel watches this request
            entry.reset = done or "none"
        if park:
            with self._lock:
                if not self._waiting and not self._closed:
                    self._parked[conn] = monotonic()
                    self._local.parked = conn
                    return
        self._add_to_pool(conn)

    def _returned_on_wrong_server(self, conn: PooledConnection) -> bool:
        """Discard a returned connection whose request heard its server change role.

        The server became a hot standby (or, for a standby alias, was
        promoted) or turned read-only, or a write failed with SQLSTATE
        25006. default_transaction_read_only may be the request's own SET,
        which the session reset undoes: one query (only then) tells. A
        25006 in the request's own read-only transaction or session
        discards only this connection.
        """
        why = roles.mismatch(conn, self.role)
        if why is roles.READ_ONLY and not roles.read_only_by_server(conn):
            why = None  # the request's own setting
        if why is None and not conn._dpp_read_only_error:
            return False
        self._replace(conn, "role_change")
        if why is not None:
            self._role_changed(why)
        else:
            logger.warning(
                "pool %r: discarded a connection whose write failed as read-only "
                "(SQLSTATE 25006), where the server reports nothing read-only",
                self.name,
            )
        return True

    def _sweep_idle(self) -> None:
        """One connection was found closed by the server: look at the idle ones.

        A server that stopped or crashed, or a failover, ends every session
        at once. Their sockets tell without a round trip (session.socket_alive);
        the dead ones are replaced now, so that the pool knows it holds
        nothing (fail_fast, ``unavailable()``) instead of each checkout
        finding one more.
        """
        self._unpark()
        with self._lock:
            idle = list(self._pool)
            self._pool.clear()
            self._set_aside += len(idle)
        try:
            while idle:
                conn = idle.pop()
                if session.socket_alive(conn):
                    self._add_to_pool(conn)
                else:
                    self._stats[self._CONNECTIONS_LOST] += 1
                    self._replace(conn, "broken")
                with self._lock:
                    self._set_aside -= 1
        finally:
            with self._lock:
                self._set_aside -= len(idle)
            for conn in idle:  # only after an unexpected error
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

    # -- opening and closing connections --------------------------------------

    def _expired(self, conn: PooledConnection) -> bool:
        return conn._created_at <= self._drained_at or conn._expire_at <= monotonic()

    def _expiry_reason(self, conn: PooledConnection) -> str:
        return "role_change" if conn._created_at <= self._role_drained_at else "lifetime"

    def _role_changed(self, why: str) -> None:
        """A session found its server no longer of the alias's role.

        With drain_on_role_change, every connection opened before is
        replaced (idle ones now, those in use when returned): they reach
        the same server, and each would otherwise fail a request to be
        found out.
        """
        if not self.options.drain_on_role_change:
            logger.warning(
                "pool %r: discarded a connection: %s (alias %r needs server_role=%r)",
                self.name,
                why,
                self.alias,
                self.role,
            )
            return
        logger.warning(
            "pool %r: %s (alias %r needs server_role=%r): replacing every connection "
            "opened before (drain_on_role_change)",
            self.name,
            why,
            self.alias,
            self.role,
        )
        # Connections in use come back expired (_drained_at), closed then.
        self._role_drained_at = monotonic()
        self.drain()

    def drain(self) -> None:
        """psycopg_pool's drain(), parked connections included.

        The connections it closes count as ``role_change`` when a role
        change drained the pool (``_role_changed``), else as ``lifetime``.
        """
        self._unpark()
        super().drain()

    def _replace(self, conn: PooledConnection, reason: str) -> None:
        """Close a connection that left the pool's count for *reason*, open another."""
        self._close_connection(conn, reason)
        self.run_task(AddConnection(self))

    def _close_connection(self, conn: PooledConnection, reason: str | None = None) -> None:
        """Close a connection, counted once under *reason* (see CLOSE_REASONS).

        psycopg_pool's own code calls this without a reason only to close a
        connection of a closed pool ("shutdown") or an expired or drained one
        ("lifetime"); every other close here names its reason.
        """
        if not conn._dpp_closed:
            conn._dpp_closed = True
            if reason is None:
                reason = "shutdown" if self._closed else self._expiry_reason(conn)
            self.recorder.closed(reason)
            log = logger.debug if reason == "shutdown" else logger.info
            log("pool %r: closed a connection (%s)", self.name, reason)
        super()._close_connection(conn)

    def _shrink_pool(self) -> None:
        # psycopg_pool's, closing with the reason, after unparking: a
        # parked connection is idle, and max_idle closes it as one in the pool.
        if moved := self._unpark(idle_for=self.max_idle):
            with self._lock:
                self._nconns_min += moved
        to_close: PooledConnection | None = None
        with self._lock:
            nconns_min = self._nconns_min
            self._nconns_min = len(self._pool)
            if self._nconns > self._min_size and nconns_min > 0 and self._pool:
                to_close = self._pool.popleft()
                self._nconns -= 1
                self._nconns_min -= 1
        if to_close is not None:
            self._close_connection(to_close, "idle")

    def _connection_kwargs(self) -> dict[str, Any]:
        # Per attempt: the startup options change when a pooler refuses them.
        kwargs = self._kwargs() if callable(self._kwargs) else dict(self._kwargs)
        if options := self.startup.options():
            kwargs["options"] = options
        return kwargs

    def _configure_session(self, conn: PooledConnection) -> None:
        # A new connection (psycopg_pool's configure hook). Django's time
        # zone and role travel in the startup packet's options, so DISCARD
        # ALL keeps them and no callback needs the Django wrapper (whose use
        # here deadlocks Django's own pool, see DJANGO-NOTES: assume_role);
        # where a pooler refused them, they are set here (startup.py).
        if self._check_role and (why := roles.refused(conn.pgconn, self.role)):
            # As libpq's target_session_attrs refuses one: a failed attempt,
            # retried in the background until the server's role is right.
            host, port = conn.info.host, conn.info.port
            conn.close()
            raise roles.WrongRole(
                f"connection to server at {host!r}, port {port} refused by the "
                f"pool: {why}, and alias {self.alias!r} needs server_role={self.role!r}. "
                "For a read replica, set OPTIONS['target_session_attrs'] to 'read-only' "
                "or 'prefer-standby' (or OPTIONS['pool']['server_role'] to 'any')"
            )
        if "TimeZone" in self.startup.by_sql:  # reported by the server (ParameterStatus)
            self.startup.server_default("TimeZone", conn.info.parameter_status("TimeZone"))
        if sql := self.startup.sql:
            conn.execute(sql)
        if self.behind_pooler is None:
            self._check_for_pooler(conn)
            # Two first connections may be configured at once: one runs the hooks.
            if not self.behind_pooler and next(self._first_connections) == 0:
                self._first_connection(conn)
        if self.options.configure is not None:
            self._configure_user(conn)
        if self._check_role:
            roles.remember_start(conn)
        if self._auto_reset:
            # What the engine and configure set is the session's starting point.
            watch.mark_clean(conn)

    def _first_connection(self, conn: PooledConnection) -> None:
        for hook in list(FIRST_CONNECTION_HOOKS):
            if self._closed:
                # Closed meanwhile (at exit, the interpreter may be past
                # starting threads): nobody is left to advise.
                return
            try:
                hook(self, conn)
            except Exception:
                logger.exception("pool %r: a first-connection hook failed", self.name)
            finally:
                if conn.pgconn.transaction_status != IDLE and not conn.closed:
                    conn.rollback()

    def _check_for_pooler(self, conn: PooledConnection) -> None:
        """Once per pool: warn when a pooler is there and the pgbouncer option is not."""
        self.behind_pooler = found = session.behind_a_pooler(conn)
        if found:
            self.startup.restore_all_by_sql()
            self._check_role = False  # see __init__
        if found and self.options.pgbouncer is None:
            logger.warning(
                "pool %r: a pooler such as PgBouncer stands between the engine and "
                "PostgreSQL (the server's backend pid differs from the one the "
                "connection was given). If it pools by transaction, set "
                "DATABASES[%r]['OPTIONS']['pool']['pgbouncer'] = 'transaction' "
                "(see docs/scaling-out.md); in session mode, 'session' says so.",
                self.name,
                self.alias,
            )

    def _configure_user(self, conn: PooledConnection) -> None:
        """The user's configure, on each new connection and after each reset."""
        configure = self.options.configure
        assert configure is not None
        configure(conn)
        if conn.pgconn.transaction_status != IDLE:
            conn.rollback()
            raise psycopg.ProgrammingError(
                f"configure {configure!r} left the connection in a transaction"
            )

    def _connect(self, timeout: float | None = None) -> PooledConnection:
        t0 = monotonic()
        try:
            conn = self._connect_learning(timeout)
        except StartupOptionsRefused as exc:
            self.recorder.connect_failed()
            error = psycopg.OperationalError(str(exc))
            self._connect_failed(error)
            raise error from None
        except Exception as exc:
            self.recorder.connect_failed()
            self._connect_failed(exc)
            raise
        self.recorder.opened(monotonic() - t0)
        if (lasted := self.outage.attempt_succeeded()) is not None:
            logger.warning(
                "pool %r: connected again after %.1f s of failed attempts", self.name, lasted
            )
        session.watch_for_fatal(conn)
        return conn

    def _connect_learning(self, timeout: float | None) -> PooledConnection:
        while True:
            learned = self.startup.learned
            try:
                return super()._connect(timeout)
            except psycopg.OperationalError as exc:
                # A pooler that refuses the engine's startup settings: they
                # are set after connecting from now on; try again at once.
                # (Each refusal moves at least one setting, so this ends.)
                # An attempt that set out before another one learned that
                # simply goes again.
                if self.startup.learned == learned and not self.startup.learn(exc):
                    raise

    def _connect_failed(self, exc: Exception) -> None:
        if self.outage.attempt_failed(exc):
            logger.warning(
                "pool %r: cannot connect (%s); retrying in the background",
                self.name,
                self.outage.cause,
            )
        if self.options.fail_fast and self._holds_nothing():
            # Clients already waiting would wait for nothing until timeout.
            with self._lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            if waiting:
                error: ServerUnavailable = self.outage.unavailable(self.alias, self.role)
                for client in waiting:
                    client.fail(error)

    def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        if attempt is None:
            attempt = ReconnectAttempt(timeout=self.reconnect_timeout)
        super()._add_connection(attempt, growing)

    # -- what it is doing ---------------------------------------------------

    def live_state(self, now: float | None = None) -> records.LiveState:
        """Sizes, checkouts and waits at this moment (see records.LiveState)."""
        if now is None:
            now = monotonic()
        leased = list(self._leased)
        waits = list(self._waits.values())
        return records.LiveState(
            open=not self._closed,
            size=self._nconns,
            idle=len(self._pool) + len(self._parked),
            in_use=len(leased),
            waiting=self._count_waiting(),
            oldest_checkout=max((now - c._dpp_out_at for c in leased), default=0.0),
            longest_wait=max((now - t for t in waits), default=0.0),
            failing_for=self.outage.failing_for(now),
            last_failure=self.outage.cause if self.outage.ongoing else "",
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

    def _get_measures(self) -> dict[str, int]:
        # A parked connection is idle and any thread can take it.
        measures = super()._get_measures()
        measures[self._POOL_AVAILABLE] += len(self._parked)
        return measures

    # -- pool-wide operations ---------------------------------------------

    def check(self) -> None:
        """As psycopg_pool's, after collecting resets pending on idle connections."""
        self._unpark()
        with self._lock:
            # Out of the pool while their answers are read: no checkout (or
            # sweep) touches them meanwhile.
            pending = [c for c in self._pool if c._dpp_reset_pending]
            for conn in pending:
                self._pool.remove(conn)
            self._set_aside += len(pending)
        for conn in pending:
            try:
                self._collect_reset(conn)
            except Exception as exc:
                self._replace(conn, session.close_reason(exc))
            else:
                self._add_to_pool(conn)
            finally:
                with self._lock:
                    self._set_aside -= 1
        with self._lock:
            for conn in self._pool:
                conn._dpp_role_checked = False  # the check's query may bring news
        lost = self._stats[self._CONNECTIONS_LOST]
        super().check()
        # The base class drops the broken ones it finds, without closing them.
        if (broken := self._stats[self._CONNECTIONS_LOST] - lost) > 0:
            self.recorder.closed("broken", broken)

    def _start_initial_tasks(self) -> None:
        super()._start_initial_tasks()
        logger.info(
            "pool %r opened for alias %r (min_size=%d, max_size=%d, %s)",
            self.name,
            self.alias,
            self.min_size,
            self.max_size,
            self.config.database,
        )
        if (leak_timeout := self.options.leak_timeout) is not None:
            self.run_task(Schedule(self, leases.FindLeaks(self, leak_timeout), leak_timeout / 2))

    def close(self, timeout: float = 5.0) -> None:
        if self.pid != os.getpid():
            # Inherited through fork: the parent owns its sockets and threads.
            self.disown()
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
                self._close_connection(conn, "shutdown")

    def disown(self) -> None:
        """Forget a pool inherited through fork, without I/O, locks or threads."""
        if self.pid == -1:
            return  # done already
        self.pid = -1
        self._closed = True  # also keeps __del__ from signalling dead workers
        conns = list(self._pool) + list(self._leased) + list(self._parked)
        self._parked.clear()
        for w in list(self._waiting):
            if w.conn is not None:
                conns.append(w.conn)
        # Counted in the child's own record (records.forget_all() ran).
        record = records.record_for(self.alias)
        record.config = record.config or self.config
        if self.options.stats and conns:
            record.closed("fork", len(conns))
        for conn in conns:
            session.neutralize(conn)
            conn._dpp_pool = None
            owner = conn._dpp_owner() if conn._dpp_owner is not None else None
            if owner is not None and owner.connection is conn:
                # The forking thread's Django wrapper: connect afresh.
                owner.connection = None
        self._leased.clear()
