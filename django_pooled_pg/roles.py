"""Which server a session is on (primary or standby), told without a round trip.

PostgreSQL 14+ reports ``in_hot_standby`` and ``default_transaction_read_only``
to the client (``ParameterStatus``) when a session starts and whenever they
change; libpq keeps the last values, free to read. An idle session hears of
a change (a promotion, a primary fenced read-only and reloaded) only with
the answer to its next query, so the pool reads them at each return and at
the checkout after anything ran on an idle session (a reset, a check): a
session an earlier request saw turn read-only never serves another.

An alias's *server role* says what its sessions must be on:

* ``"primary"``: a server that accepts writes (not a hot standby, not
  ``default_transaction_read_only``), as libpq's ``target_session_attrs``
  ``read-write`` requires (for ``primary``, libpq checks only the standby
  flag; the pool checks both);
* ``"standby"``: a hot standby, as ``target_session_attrs=standby``;
* ``"any"``: no check (``read-only``, ``prefer-standby``, ``any``: libpq may
  choose either kind of server, and reads are served by both).

Without ``target_session_attrs`` the role is ``"primary"``: Django writes
through every alias the router does not send elsewhere. Behind a pooler
(PgBouncer caches the parameters of its first server login) the pool does
not judge sessions by them.
"""

from __future__ import annotations

from typing import Any

import psycopg

PRIMARY = "primary"
STANDBY = "standby"
ANY = "any"

#: libpq's target_session_attrs -> the server role the pool enforces.
ROLE_OF_TARGET = {
    "read-write": PRIMARY,
    "primary": PRIMARY,
    "standby": STANDBY,
    "read-only": ANY,
    "prefer-standby": ANY,
    "any": ANY,
}


class RoleChanged(psycopg.OperationalError):
    """The session's server is no longer of the alias's role: close it as ``role_change``.

    *server_wide*: known to hold for the server (hot standby or not), not
    only for this session (default_transaction_read_only, which a session
    may SET itself).
    """

    def __init__(self, why: str, server_wide: bool) -> None:
        super().__init__(why)
        self.server_wide = server_wide


class WrongRole(psycopg.OperationalError):
    """A new connection reached a server of another role: a failed attempt."""


READ_ONLY = "the server is read-only (default_transaction_read_only=on)"
_HOT_STANDBY = b"in_hot_standby"
_READ_ONLY = b"default_transaction_read_only"
_ON = b"on"


def role_for(server_role: str | None, db_options: dict[str, Any]) -> str:
    """The role to enforce: the option if given, else from target_session_attrs."""
    if server_role is not None:
        return server_role
    target = str(db_options.get("target_session_attrs") or "read-write")
    return ROLE_OF_TARGET.get(target, ANY)


def mismatch(conn: Any, role: str) -> str | None:
    """Why the session *conn* cannot serve an alias of *role* (None: it can).

    Reads what the server last reported; a server that reports neither
    parameter (before PostgreSQL 14) is taken as it comes, and a write there
    fails with SQLSTATE 25006 instead (see the pool). A session that started
    read-only (the pool's ``configure`` set default_transaction_read_only)
    is judged by the standby flag alone.
    """
    return _why(conn.pgconn, role, conn._dpp_read_only_at_start != _ON)


def refused(pgconn: Any, role: str) -> str | None:
    """Why a new session (before ``configure``) cannot serve an alias of *role*."""
    return _why(pgconn, role, True)


def remember_start(conn: Any) -> None:
    """Note what a new session reports once configured (see mismatch())."""
    conn._dpp_read_only_at_start = conn.pgconn.parameter_status(_READ_ONLY)


def _why(pgconn: Any, role: str, read_only_counts: bool) -> str | None:
    if role == PRIMARY:
        if pgconn.parameter_status(_HOT_STANDBY) == _ON:
            return "the server is a hot standby (in_hot_standby=on)"
        if read_only_counts and pgconn.parameter_status(_READ_ONLY) == _ON:
            return READ_ONLY
        return None
    if role == STANDBY:
        hot = pgconn.parameter_status(_HOT_STANDBY)
        if hot is not None and hot != _ON:
            return "the server is not a standby (in_hot_standby=off)"
    return None


def read_only_by_server(conn: Any) -> bool:
    """Whether a session's default_transaction_read_only comes from the server
    (its configuration, ALTER SYSTEM/DATABASE/ROLE), not from the session's
    own SET: one round trip, on a connection about to be discarded."""
    try:
        if conn.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        row = conn.execute(
            "SELECT source FROM pg_settings WHERE name = 'default_transaction_read_only'"
        ).fetchone()
    except psycopg.Error:
        return False  # a broken session: discard it alone
    return row is None or row[0] != "session"


def server_role_of(pgconn: Any) -> str | None:
    """ "primary" or "standby" as the session last heard, None if not reported."""
    hot = pgconn.parameter_status(_HOT_STANDBY)
    if hot is None:
        return None
    return STANDBY if hot == _ON else PRIMARY
