"""One pooled session: the connection class, its reset, and its liveness.

A returned connection is made fit for the next request without waiting:
``send_reset()`` rolls back, restores what a request changed on the psycopg
object, and *sends* ``DISCARD ALL``; ``collect_reset()`` reads the answer at
the next checkout, by which time it has arrived. ``socket_alive()`` catches a
backend the server closed while the connection sat idle, without a round
trip, and ``watch_for_fatal()`` hears the server announce that it is closing
a session.
"""

from __future__ import annotations

import os
import select
import traceback
import weakref
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq

from . import roles, watch

if TYPE_CHECKING:
    from .base import DatabaseWrapper
    from .holders import Holder
    from .pool import DjangoPool
    from .trace import Entry, Trace

IDLE = pq.TransactionStatus.IDLE
INTRANS = pq.TransactionStatus.INTRANS
INERROR = pq.TransactionStatus.INERROR
UNKNOWN = pq.TransactionStatus.UNKNOWN
ACTIVE = pq.TransactionStatus.ACTIVE
_CONN_OK = pq.ConnStatus.OK
_DISCARD_ALL = b"DISCARD ALL"


class PooledConnection(psycopg.Connection[Any]):
    """A psycopg connection that knows its place in the pool's loop."""

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
    _dpp_holder: Holder | None = None  # who checked it out (pool option holders)
    _dpp_trace: tuple[Trace, Entry] | None = None  # a request the toolbar panel watches
    _dpp_leak_reported: bool = False
    _dpp_closed: bool = False  # closed by the pool (counted once)
    # reset_session="auto" (watch.py): unchanged since the last mark_clean(),
    # the reported parameters then, WITH HOLD cursors declared since.
    _dpp_clean: bool = False
    _dpp_baseline: tuple[bytes | None, ...] = ()
    _dpp_held: list[Any] | None = None
    # A write failed with SQLSTATE 25006 (read-only transaction): see the pool.
    _dpp_read_only_error: bool = False
    # default_transaction_read_only as the new session reported it once configured (roles.py).
    _dpp_read_only_at_start: bytes | None = None
    # The role check at return passed and nothing was heard since (pool.py).
    _dpp_role_checked: bool = False


class SessionBroken(psycopg.OperationalError):
    """The server or the network ended the session: close it as ``broken``."""


class ResetFailed(psycopg.OperationalError):
    """The session is alive but its reset did not succeed: close it as ``reset_failed``."""


def close_reason(exc: BaseException) -> str:
    """The close reason (see CLOSE_REASONS) for a connection that raised *exc* at checkout."""
    if isinstance(exc, ResetFailed):
        return "reset_failed"
    if isinstance(exc, roles.RoleChanged):
        return "role_change"
    return "broken"


def watch_for_fatal(conn: PooledConnection) -> None:
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


def socket_alive(conn: PooledConnection) -> bool:
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
        if pgconn.transaction_status != ACTIVE:  # no query pending: never waits
            pgconn.get_result()
    except psycopg.OperationalError:
        return False
    return not conn._dpp_fatal and pgconn.status == _CONN_OK


#: What send_reset() did about the session.
SENT = "sent"
SKIPPED = "skipped"  # "auto": the request changed nothing


def send_reset(
    conn: PooledConnection,
    user_reset: Callable[[Any], None] | None,
    reset_session: bool | str,
    restore: bytes = b"",
) -> str | None:
    """Make a returned connection fit for the next request.

    Rolls back an open transaction, runs the user's ``reset`` callback,
    restores the psycopg object's own settings (client-side: no I/O) and
    sends ``DISCARD ALL`` without waiting for its answer, which arrives while
    the connection waits in the pool: always with *reset_session* True, with
    ``"auto"`` only when the request may have changed the session
    (``watch.session_changed``). *restore* (``SET`` statements) rides in the
    same query. Returns SENT, SKIPPED ("auto", nothing changed) or None
    (reset off). Raises if the connection cannot be made fit.
    """
    pgconn = conn.pgconn
    status = pgconn.transaction_status
    if status in (INTRANS, INERROR):
        conn.rollback()  # psycopg forgets its prepared statements too
    elif status != IDLE:  # ACTIVE: returned in the middle of a query
        raise psycopg.OperationalError("connection returned while a query was running")
    if user_reset is not None:
        user_reset(conn)
    # What a request changed on the psycopg object itself.
    if not conn.autocommit:
        conn.autocommit = True
    if conn.read_only is not None:
        conn.read_only = None
    if conn.deferrable is not None:
        conn.deferrable = None
    if conn.isolation_level is not None:
        conn.isolation_level = None
    if pgconn.transaction_status != IDLE:
        raise psycopg.ProgrammingError("reset left the connection in a transaction")
    if not reset_session:
        return None
    if reset_session == "auto" and not watch.session_changed(conn):
        return SKIPPED
    pgconn.send_query(reset_query(restore))
    conn._dpp_reset_pending = True
    conn._dpp_clean = False  # until the reset's answer is read (watch.mark_clean)
    return SENT


def reset_query(restore: bytes = b"") -> bytes:
    """``DISCARD ALL``, or what it does followed by *restore* in one query.

    DISCARD ALL refuses to share a query string ("cannot run inside a
    transaction block"); the statements PostgreSQL documents it as equal to
    can, so settings to restore (startup.py) cost no extra round trip.
    """
    if not restore:
        return _DISCARD_ALL
    return _DISCARD_ALL_STATEMENTS + b"; " + restore


_DISCARD_ALL_STATEMENTS = (
    b"CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; "
    b"UNLISTEN *; SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; "
    b"DISCARD SEQUENCES"
)
_RESET_OK = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


def reset_done(conn: PooledConnection) -> bool:
    """Whether the answer to a pending session reset has arrived (no wait)."""
    if not conn._dpp_reset_pending:
        return True
    pgconn = conn.pgconn
    try:
        pgconn.consume_input()  # libpq's socket is non-blocking: never waits
    except psycopg.OperationalError:
        return True  # broken: the checkout's own check will say so
    return not pgconn.is_busy()


def collect_reset(conn: PooledConnection, deadline: float, timeout: float) -> None:
    """Read the answer to the reset sent at return, waiting until *deadline*.

    Raises ``ResetFailed`` if no answer came in time or the server refused
    the reset on a live session, ``SessionBroken`` if the session ended.
    """
    conn._dpp_reset_pending = False
    pgconn = conn.pgconn
    fd = pgconn.socket
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
            # A server that hangs, or a network gone silent, never answers.
            raise ResetFailed(f"no answer to the session reset within {timeout:g} s")
        if poller is None:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        poller.poll(1000 * left)
        pgconn.consume_input()
    while (res := pgconn.get_result()) is not None:
        if res.status not in _RESET_OK:
            # Often the session ending (a FATAL, EOF to follow): the
            # connection is discarded, and nothing more is read from it.
            error = res.get_error_message()
            severity = res.error_field(pq.DiagnosticField.SEVERITY_NONLOCALIZED)
            if severity in (b"FATAL", b"PANIC"):
                conn._dpp_fatal = True
            break
    if error is not None:
        if pgconn.status == _CONN_OK and not conn._dpp_fatal:
            raise ResetFailed(f"session reset failed: {error}")
        raise SessionBroken(f"session reset failed: {error}")
    forget_prepared_statements(conn)


def behind_a_pooler(conn: psycopg.Connection[Any]) -> bool:
    """Whether a pooler such as PgBouncer stands between *conn* and PostgreSQL (one query).

    PgBouncer hands each client a made-up backend pid (and cancel key) in
    its startup answer; the server's own pid for the session differs.
    """
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return row is not None and row[0] != conn.info.backend_pid


def forget_prepared_statements(conn: psycopg.Connection[Any]) -> None:
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


def neutralize(conn: psycopg.Connection[Any]) -> None:
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
