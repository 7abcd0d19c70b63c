"""What a request did to its session: the watch behind ``reset_session="auto"``.

Every way application code sends SQL through psycopg on a connection
(Django's cursors, and the raw connection's ``execute()``, cursors of any
class, ``executemany()``, ``stream()``, ``copy()``, pipelines, server-side
cursors) passes through one of a few generator methods of psycopg's cursor
base classes. ``install()`` wraps them, once per process, so that a
statement that may change session state (``statements.may_change_session``)
marks its connection as changed. A connection is watched only while its
pool runs in ``"auto"`` mode and only until it is marked: any other psycopg
connection pays one attribute lookup per query.

A second net comes from the server itself: PostgreSQL reports some
parameters whenever they change (``ParameterStatus``), even inside a
function the classifier cannot see into. ``session_changed()`` compares them
with their values when the connection was last made clean.

What neither can see: SQL sent through the libpq object itself
(``connection.pgconn``), session state changed by code the request reaches
without naming it (triggers, views, column defaults, policies, attribute
notation, a user's overload of a built-in function's name), unless it
changes a reported parameter, and sequence state (``lastval()``).
docs/configuration.md says so.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import pq, sql

from .statements import may_change_session

if TYPE_CHECKING:
    from .session import PooledConnection

#: The cursor methods every query passes through, first argument the query
#: as the application wrote it (before client-side parameters are merged,
#: so one cached verdict serves every call of the same statement). Each is
#: listed in ``upstream``.
HOOKED: tuple[tuple[type[Any], str], ...] = (
    (psycopg.Cursor, "_execute_gen"),  # execute(), Connection.execute()
    (psycopg.Cursor, "_executemany_gen_pipeline"),  # executemany()
    (psycopg.Cursor, "_executemany_gen_no_pipeline"),
    (psycopg.Cursor, "_stream_send_gen"),  # stream()
    (psycopg.Cursor, "_start_copy_gen"),  # copy()
    (psycopg.ServerCursor, "_declare_gen"),  # named cursors (Django's chunked reads)
    (psycopg.ServerCursor, "_close_gen"),  # ... and their CLOSE (not sent in a failed transaction)
)

#: Parameters PostgreSQL reports on its own when they change, in functions
#: too (server_version, server_encoding and integer_datetimes never change;
#: newer servers report more, older ones leave those None). Behind
#: PgBouncer these are the client's view.
REPORTED_PARAMETERS: tuple[bytes, ...] = (
    b"TimeZone",
    b"DateStyle",
    b"IntervalStyle",
    b"is_superuser",
    b"session_authorization",
    b"default_transaction_read_only",
    b"in_hot_standby",
    b"application_name",
    b"standard_conforming_strings",
    b"client_encoding",
    b"scram_iterations",  # PostgreSQL 16+
    b"search_path",  # PostgreSQL 18+
)

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Wrap psycopg's cursor send methods (once per process; idempotent)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        for cls, name in HOOKED:
            owner = next(c for c in cls.__mro__ if name in c.__dict__)
            original = owner.__dict__[name]
            hook = _HOOKS.get(name, _query_hook)
            setattr(owner, name, hook(original))
        _installed = True


def _query_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def watched(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        # Inline for the common case, a clean str statement seen before.
        if getattr(conn, "_dpp_clean", False) and (
            type(query) is not str or may_change_session(query)
        ):
            _classify(conn, query, self)
        return original(self, query, *args, **kwargs)

    return watched


def _declare_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def watched(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if getattr(conn, "_dpp_clean", False):
            _classify(conn, query, self)  # the cursor's query; DECLARE adds a cursor:
            if self._withhold:  # one WITH HOLD outlives the transaction unless closed
                held = conn._dpp_held
                if held is None:
                    conn._dpp_held = [self]
                else:
                    held.append(self)
        return original(self, query, *args, **kwargs)

    return watched


def _close_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def watched(self: Any) -> Any:
        conn = self._conn
        if (
            getattr(conn, "_dpp_clean", False)
            and self._withhold
            and conn.pgconn.transaction_status not in _CLOSABLE
        ):
            # psycopg sends no CLOSE in a failed transaction, yet marks the
            # cursor closed; a WITH HOLD one declared earlier stays open.
            conn._dpp_clean = False
        return original(self)

    return watched


_CLOSABLE = (pq.TransactionStatus.IDLE, pq.TransactionStatus.INTRANS)
_HOOKS = {"_declare_gen": _declare_hook, "_close_gen": _close_hook}


def _classify(conn: PooledConnection, query: Any, cursor: Any) -> None:
    kind = type(query)
    if kind is str or kind is bytes:
        changes = may_change_session(query)
    elif isinstance(query, sql.Composable):
        try:
            changes = may_change_session(query.as_bytes(cursor))
        except Exception:
            changes = True  # psycopg will raise the same error itself
    else:
        changes = True  # a template string, or something we do not know
    if changes:
        conn._dpp_clean = False


def reported_parameters(pgconn: Any) -> tuple[bytes | None, ...]:
    """The reported parameters' current values, read from libpq (no round trip).

    Read through the libpq object: about 1 us for all of them, where
    ``connection.info.parameter_status`` costs several times that.
    """
    status = pgconn.parameter_status
    return tuple([status(name) for name in REPORTED_PARAMETERS])


def mark_clean(conn: PooledConnection) -> None:
    """The session is as a new one (just configured, or reset): watch it from here."""
    conn._dpp_held = None
    conn._dpp_baseline = reported_parameters(conn.pgconn)
    conn._dpp_clean = True


def session_changed(conn: PooledConnection) -> bool:
    """Whether the request may have changed the session since ``mark_clean()``.

    Changed: a statement the classifier does not know to be clean, a
    ``WITH HOLD`` cursor still open, or a reported parameter that differs.
    """
    if not conn._dpp_clean:
        return True
    held = conn._dpp_held
    if held is not None:
        conn._dpp_held = None
        if not all(cursor.closed for cursor in held):
            conn._dpp_clean = False
            return True
    if reported_parameters(conn.pgconn) != conn._dpp_baseline:
        conn._dpp_clean = False
        return True
    return False
