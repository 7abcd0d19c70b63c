"""Every private upstream name django-pooled-pg depends on, and a guard for them.

The engine subclasses psycopg_pool's ``ConnectionPool`` and overrides its
private hooks, reads and writes its private attributes, empties psycopg's
prepared-statement cache, copies Django's ``BaseDatabaseWrapper.connect()``
and overrides parts of Django's postgresql wrapper. None of that is a public
API: any release may change it. ``USES`` lists each such name once, with why
we use it and which code of ours depends on it; ``FINGERPRINTS`` records, for
each function or class, a hash of its upstream source and the releases in
which that source was seen.

``check()`` compares the installed psycopg, psycopg_pool and Django with the
table and returns one sentence per problem: a name that is gone, or a source
that differs from every recorded one. A new release that leaves the guarded
code alone passes, because fingerprints are looked up by hash, not by
version. ``tests/test_upstream.py`` fails with those sentences.

To record the installed versions after reviewing a change::

    python -m django_pooled_pg.upstream            # what the installed versions have
    python -m django_pooled_pg.upstream --record   # write them into FINGERPRINTS below

This module is a leaf: it imports nothing from the rest of the package, so
it can run against any install (``python django_pooled_pg/upstream.py``).
The upgrade procedure is in docs/contributing.md.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Top-level module -> the distribution whose version is reported.
DISTRIBUTIONS = {"psycopg": "psycopg", "psycopg_pool": "psycopg-pool", "django": "Django"}

# What we do with a name. Every kind but ATTRIBUTE is fingerprinted.
OVERRIDDEN = "overridden"  # a subclass of ours defines it (calling super() or not)
COPIED = "copied"  # our code is a copy of its body, adapted
MIRRORED = "mirrored"  # our code re-implements (part of) what it does
CALLED = "called"  # our code calls it and relies on what it does
CLASS = "class"  # our code subclasses or instantiates it
ATTRIBUTE = "attribute"  # our code reads or writes it (checked for existence only)
WRAPPED = "wrapped"  # our hook replaces it on its class and calls it (watch.install)
KINDS = (OVERRIDDEN, COPIED, MIRRORED, CALLED, CLASS, ATTRIBUTE, WRAPPED)

_ADVICE = {
    OVERRIDDEN: "compare it with our override, {used_by}, and adapt ours",
    COPIED: "our {used_by} is a copy of it: carry the change over",
    MIRRORED: "our {used_by} re-implements what it does: make ours agree",
    CALLED: "{used_by} calls it: check that the call still means the same",
    CLASS: "{used_by} subclasses or instantiates it: check how ours uses it",
    ATTRIBUTE: "review {used_by}, where we use it",
    WRAPPED: "{used_by} wraps it on every cursor class: check that its first argument is "
    "still the query as written and that every query still passes through one of them",
}


@dataclass(frozen=True)
class Use:
    """One private upstream name and what we do with it."""

    #: Dotted path: the module part is imported, the rest looked up with getattr.
    name: str
    kind: str
    #: Why we use it, in one line.
    why: str
    #: Our code that depends on it (class and method: modules may move).
    used_by: str
    #: For an instance attribute that no cheap sample object has: the
    #: top-level package whose source must assign it (default: name's own).
    set_by: str | None = None

    @property
    def package(self) -> str:
        """The top-level package whose version decides (the one that sets it)."""
        return self.set_by or self.name.split(".", 1)[0]

    @property
    def fingerprinted(self) -> bool:
        return self.kind != ATTRIBUTE

    @property
    def short(self) -> str:
        """The name without its module path, as messages show it."""
        owner, _, member = self.name.rpartition(".")
        return f"{owner.rpartition('.')[2]}.{member}" if owner else member


_POOL = "psycopg_pool.ConnectionPool"
_BASEPOOL = "psycopg_pool.base.BasePool"
_WAITING = "psycopg_pool.pool.WaitingClient"
_CONN = "psycopg.Connection"
_PREPARE = "psycopg._preparing.PrepareManager"
_CURSOR = "psycopg.Cursor"
_SERVER_CURSOR = "psycopg.ServerCursor"
_PG = "django.db.backends.postgresql.base.DatabaseWrapper"
_DJBASE = "django.db.backends.base.base.BaseDatabaseWrapper"
_PGCREATION = "django.db.backends.postgresql.creation.DatabaseCreation"

USES: tuple[Use, ...] = (
    # -- psycopg_pool: hooks DjangoPool overrides --------------------------
    Use(f"{_POOL}.getconn", OVERRIDDEN,
        "replaced, no super(): our checkout, with parking, fail-fast and no backoff sleep",
        "DjangoPool.getconn"),
    Use(f"{_POOL}.putconn", OVERRIDDEN,
        "calls super() after unleasing; release() repeats its steps with parking",
        "DjangoPool.putconn, DjangoPool.release"),
    Use(f"{_POOL}.check", OVERRIDDEN,
        "collects pending resets first, then counts what super() found broken",
        "DjangoPool.check"),
    Use(f"{_POOL}._get_ready_connection", OVERRIDDEN,
        "takes a parked connection first and drops timed-out clients before the max_waiting test",
        "DjangoPool._get_ready_connection"),
    Use(f"{_POOL}._check_connection", OVERRIDDEN,
        "finishes the pending DISCARD ALL and polls the socket before super()'s check",
        "DjangoPool._check_connection"),
    Use(f"{_POOL}._return_connection", OVERRIDDEN,
        "replaced, no super(): the base's, with session.send_reset() instead of "
        "_reset_connection(), close reasons and parking",
        "DjangoPool._return_connection"),
    Use(f"{_POOL}._putconn", OVERRIDDEN,
        "replaced: returns in the caller's thread even with a reset callback",
        "DjangoPool._putconn"),
    Use(f"{_POOL}._reset_connection", MIRRORED,
        "never called (our _return_connection replaces its caller): session.send_reset() "
        "rolls back and runs the reset callback as it does, then sends DISCARD ALL",
        "session.send_reset"),
    Use(f"{_POOL}._close_connection", OVERRIDDEN,
        "takes the close reason as an argument and counts it, then super(); the base "
        "calls it without one only at shutdown and for expired or drained connections",
        "DjangoPool._close_connection"),
    Use(f"{_POOL}._shrink_pool", COPIED,
        "replaced, no super(): unparks idle connections, then the base's body, closing "
        "with the reason 'idle'",
        "DjangoPool._shrink_pool"),
    Use(f"{_POOL}._connect", OVERRIDDEN,
        "times and counts connection attempts around super(), tracks failing since when",
        "DjangoPool._connect"),
    Use(f"{_POOL}._add_connection", OVERRIDDEN,
        "passes our shorter-backoff attempt to super()",
        "DjangoPool._add_connection"),
    Use(f"{_POOL}._start_initial_tasks", OVERRIDDEN,
        "adds the leak finder after super()",
        "DjangoPool._start_initial_tasks"),
    Use(f"{_POOL}._get_measures", OVERRIDDEN,
        "adds parked connections to pool_available",
        "DjangoPool._get_measures"),
    Use("psycopg_pool.pool.MaintenanceTask._run", OVERRIDDEN,
        "the body of our maintenance tasks",
        "leases.FindLeaks._run, leases._ReclaimConnection._run"),
    Use("psycopg_pool.base.AttemptWithBackoff.update_delay", OVERRIDDEN,
        "caps the reconnection delay at RECONNECT_DELAY_MAX",
        "failures.ReconnectAttempt.update_delay"),
    # -- psycopg_pool: methods we call or re-implement ---------------------
    Use(f"{_POOL}._check_open_getconn", CALLED,
        "getconn() raises PoolClosed / opens an implicit pool as the base's does",
        "DjangoPool.getconn"),
    Use(f"{_POOL}._getconn_unchecked", CALLED,
        "the base's queue: a ready connection or a wait; sets conn._pool",
        "DjangoPool.getconn"),
    Use(f"{_POOL}._getconn_with_check_loop", MIRRORED,
        "our checkout loop replaces it (no backoff sleep after a dead connection)",
        "DjangoPool.getconn, DjangoPool._take"),
    Use(f"{_POOL}._maybe_grow_pool", CALLED,
        "starts a connection attempt when failing fast (under _lock)",
        "DjangoPool.getconn"),
    Use(f"{_POOL}._add_to_pool", CALLED,
        "hands a connection to a waiting client or the idle deque; _swap copies its conn._pool = None",
        "DjangoPool._swap, _unpark, _return_connection"),
    Use(f"{_POOL}._check_pool_putconn", CALLED,
        "release() rejects a connection of another pool as putconn() does",
        "DjangoPool.release"),
    Use(f"{_POOL}._maybe_close_connection", CALLED,
        "release() closes the connection when the pool is closed, as putconn() does",
        "DjangoPool.release"),
    Use(f"{_BASEPOOL}._get_measures", CALLED,
        "via super(): its pool_available is len(_pool), to which we add the parked",
        "DjangoPool._get_measures"),
    Use(f"{_WAITING}.fail", CALLED,
        "fails queued clients at once with ServerUnavailable",
        "DjangoPool._connect_failed"),
    # -- psycopg_pool: classes ---------------------------------------------
    Use("psycopg_pool.base.AttemptWithBackoff", CLASS,
        "subclassed for a shorter first delay and a capped backoff",
        "failures.ReconnectAttempt"),
    Use("psycopg_pool.pool.AddConnection", CLASS,
        "instantiated to replace a connection we discarded",
        "DjangoPool._replace, _return_connection"),
    Use("psycopg_pool.pool.MaintenanceTask", CLASS,
        "subclassed for tasks run by the pool's workers",
        "leases.FindLeaks, leases._ReclaimConnection"),
    Use("psycopg_pool.pool.Schedule", CLASS,
        "instantiated to repeat the leak finder",
        "DjangoPool._start_initial_tasks"),
    Use(_WAITING, CLASS,
        "its instances fill _waiting; a timed-out one stays there with .error set",
        "DjangoPool._get_ready_connection, _count_waiting, _connect_failed, disown"),
    # -- psycopg_pool: attributes ------------------------------------------
    Use(f"{_POOL}._pool", ATTRIBUTE, "the idle deque: read, popped and appended",
        "DjangoPool.getconn, _swap, check, live_state, disown"),
    Use(f"{_POOL}._lock", ATTRIBUTE, "the pool's lock, held for our changes to its state",
        "DjangoPool._swap, _return_connection, _shrink_pool, check"),
    Use(f"{_POOL}._waiting", ATTRIBUTE, "the queue of waiting clients, filtered and cleared",
        "DjangoPool._get_ready_connection, _connect_failed, _count_waiting, disown"),
    Use(f"{_POOL}._nconns", ATTRIBUTE, "the pool's size", "DjangoPool.live_state"),
    Use(f"{_POOL}._nconns_min", ATTRIBUTE, "raised by the connections we unpark",
        "DjangoPool._shrink_pool"),
    Use(f"{_POOL}._min_size", ATTRIBUTE, "the pool never shrinks below it",
        "DjangoPool._shrink_pool"),
    Use(f"{_POOL}._drained_at", ATTRIBUTE, "a connection older than this is discarded",
        "DjangoPool._expired"),
    Use(f"{_POOL}._stats", ATTRIBUTE, "the base's counters, kept right by our overrides",
        "DjangoPool.getconn, _return_connection, check"),
    Use(f"{_POOL}._closed", ATTRIBUTE, "read everywhere; set by hand on a pool inherited by fork",
        "DjangoPool.disown, DatabaseWrapper._checkout"),
    Use(f"{_POOL}._reset", ATTRIBUTE, "the user's reset callback, run by our reset",
        "DjangoPool._return_connection"),
    Use(f"{_POOL}._opened", ATTRIBUTE, "whether the pool was ever opened",
        "tests/test_checkout.py"),
    Use(f"{_POOL}._check", ATTRIBUTE, "the check callback given", "tests/test_validation.py"),
    Use(f"{_POOL}._tasks", ATTRIBUTE, "the workers' queue, waited on until empty",
        "tests/test_errors.py"),
    Use(f"{_POOL}._REQUESTS_NUM", ATTRIBUTE, "stats key", "DjangoPool.getconn"),
    Use(f"{_POOL}._RETURNS_BAD", ATTRIBUTE, "stats key", "DjangoPool._return_connection"),
    Use(f"{_POOL}._CONNECTIONS_LOST", ATTRIBUTE, "stats key",
        "DjangoPool._return_connection, check"),
    Use(f"{_POOL}._POOL_AVAILABLE", ATTRIBUTE, "stats key", "DjangoPool._get_measures"),
    Use(f"{_CONN}._pool", ATTRIBUTE,
        "the pool a checked-out connection belongs to; None while idle",
        "DjangoPool._swap", set_by="psycopg_pool"),
    Use(f"{_CONN}._created_at", ATTRIBUTE, "set by the pool at connect",
        "DjangoPool._expired", set_by="psycopg_pool"),
    Use(f"{_CONN}._expire_at", ATTRIBUTE, "set by the pool at connect from max_lifetime",
        "DjangoPool._expired", set_by="psycopg_pool"),
    Use(f"{_WAITING}.conn", ATTRIBUTE, "set when a client was served",
        "DjangoPool._get_ready_connection, _count_waiting, disown"),
    Use(f"{_WAITING}.error", ATTRIBUTE, "set when a client timed out or failed",
        "DjangoPool._get_ready_connection, _count_waiting"),
    Use("psycopg_pool.base.AttemptWithBackoff.INITIAL_DELAY", ATTRIBUTE,
        "overridden: the first retry comes sooner", "failures.ReconnectAttempt"),
    Use("psycopg_pool.base.AttemptWithBackoff.delay", ATTRIBUTE,
        "capped after the base computes it", "failures.ReconnectAttempt.update_delay"),
    # -- psycopg: the prepared-statement cache -----------------------------
    Use(f"{_CONN}._prepared", ATTRIBUTE,
        "the connection's PrepareManager, emptied after DISCARD ALL",
        "session.forget_prepared_statements"),
    Use(f"{_PREPARE}._names", ATTRIBUTE, "prepared statements psycopg thinks exist",
        "session.forget_prepared_statements"),
    Use(f"{_PREPARE}._counts", ATTRIBUTE, "queries seen, towards prepare_threshold",
        "session.forget_prepared_statements"),
    Use(f"{_PREPARE}._to_flush", ATTRIBUTE, "DEALLOCATEs queued for the next query",
        "session.forget_prepared_statements"),
    Use(f"{_PREPARE}.clear", MIRRORED,
        "ours empties the same state, minus the DEALLOCATE ALL it would queue",
        "session.forget_prepared_statements"),
    Use(f"{_PREPARE}._should_discard", MIRRORED,
        "what psycopg does when DISCARD ALL goes through its execute(); ours goes around it",
        "session.forget_prepared_statements"),
    # -- psycopg: cursor methods every query passes through (reset_session="auto") --
    Use(f"{_CURSOR}._execute_gen", WRAPPED, "execute() and Connection.execute()",
        "watch.install"),
    Use(f"{_CURSOR}._executemany_gen_pipeline", WRAPPED, "executemany() in pipeline mode",
        "watch.install"),
    Use(f"{_CURSOR}._executemany_gen_no_pipeline", WRAPPED, "executemany() without pipeline",
        "watch.install"),
    Use(f"{_CURSOR}._stream_send_gen", WRAPPED, "stream()'s send", "watch.install"),
    Use(f"{_CURSOR}._start_copy_gen", WRAPPED, "copy()'s send", "watch.install"),
    Use(f"{_SERVER_CURSOR}._declare_gen", WRAPPED,
        "a named cursor's DECLARE (Django's chunked reads)", "watch.install"),
    Use(f"{_SERVER_CURSOR}._close_gen", WRAPPED,
        "a named cursor's CLOSE, skipped in a failed transaction", "watch.install"),
    Use(f"{_CURSOR}._conn", ATTRIBUTE, "the cursor's connection, marked as changed",
        "watch._query_hook"),
    Use(f"{_SERVER_CURSOR}._withhold", ATTRIBUTE, "a WITH HOLD cursor outlives its transaction",
        "watch._declare_hook"),
    # -- Django: the wrapper -------------------------------------------------
    Use(f"{_DJBASE}.connect", COPIED,
        "run at every checkout: ours skips connection parameters and a no-op set_autocommit",
        "DatabaseWrapper.connect"),
    Use(f"{_DJBASE}.set_autocommit", MIRRORED,
        "connect() sets self.autocommit = True itself when nothing would change",
        "DatabaseWrapper.connect"),
    Use(f"{_DJBASE}.init_connection_state", CALLED,
        "called directly, skipping the postgresql wrapper's time zone and role setup",
        "DatabaseWrapper.init_connection_state"),
    Use(f"{_DJBASE}.wrap_database_errors", OVERRIDDEN,
        "our error wrapper lets PoolExhausted through", "DatabaseWrapper.wrap_database_errors"),
    Use(f"{_PG}.pool", OVERRIDDEN,
        "our process-wide registry instead of Django's one pool per alias",
        "DatabaseWrapper.pool"),
    Use(f"{_PG}.close_pool", OVERRIDDEN, "closes our pools of the alias",
        "DatabaseWrapper.close_pool"),
    Use(f"{_PG}.get_connection_params", OVERRIDDEN,
        "empty for a pooled wrapper; super()'s feed the pool's parameters",
        "DatabaseWrapper.get_connection_params, _pool_connection_params"),
    Use(f"{_PG}.get_new_connection", OVERRIDDEN,
        "a checkout; _checkout copies its isolation level handling",
        "DatabaseWrapper.get_new_connection, _checkout"),
    Use(f"{_PG}.init_connection_state", OVERRIDDEN,
        "time zone and role come in the startup packet instead",
        "DatabaseWrapper.init_connection_state"),
    Use(f"{_PG}._close", OVERRIDDEN, "returns the connection to our pool",
        "DatabaseWrapper._close"),
    Use(f"{_PG}._set_autocommit", OVERRIDDEN, "skips psycopg's setter when nothing changes",
        "DatabaseWrapper._set_autocommit"),
    Use(f"{_PG}.close_if_health_check_failed", OVERRIDDEN,
        "a pooled wrapper skips it: the pool checks at checkout",
        "DatabaseWrapper.close_if_health_check_failed"),
    Use(f"{_PG}.ensure_timezone", OVERRIDDEN,
        "keeps the pool (the time zone is in its key), switches the connection in hand",
        "DatabaseWrapper.ensure_timezone"),
    Use(f"{_PG}._configure_timezone", CALLED, "sets the time zone on the connection in hand",
        "DatabaseWrapper.ensure_timezone"),
    Use(f"{_PG}._connection_pools", ATTRIBUTE, "Django's own pools, which must stay empty",
        "tests/test_checkout.py"),
    Use("django.db.backends.postgresql.psycopg_any.IsolationLevel", ATTRIBUTE,
        "psycopg's isolation level enum, as Django's psycopg shim exports it",
        "DatabaseWrapper._checkout"),
    Use("django.db.utils.DatabaseErrorWrapper.__exit__", OVERRIDDEN,
        "lets PoolExhausted through, setting errors_occurred as the base does",
        "_ErrorWrapper.__exit__"),
    Use("django.db.utils.DatabaseErrorWrapper.wrapper", ATTRIBUTE,
        "the database wrapper, flagged errors_occurred", "_ErrorWrapper.__exit__"),
    Use("django.db.utils.ConnectionHandler._connections", ATTRIBUTE,
        "the per-thread wrappers, emptied by a test", "tests/test_poolstats.py"),
    # -- Django: test databases --------------------------------------------
    Use(f"{_PGCREATION}._create_test_db", OVERRIDDEN,
        "closes pools connected to the test database first", "DatabaseCreation._create_test_db"),
    Use(f"{_PGCREATION}._clone_test_db", OVERRIDDEN,
        "closes pools connected to the source and the clone first",
        "DatabaseCreation._clone_test_db"),
    Use(f"{_PGCREATION}._destroy_test_db", OVERRIDDEN,
        "closes pools connected to the test database first", "DatabaseCreation._destroy_test_db"),
    Use(f"{_PGCREATION}._get_test_db_name", CALLED, "the test database's name",
        "DatabaseCreation._create_test_db"),
)  # fmt: skip


# BEGIN FINGERPRINTS (written by `python -m django_pooled_pg.upstream --record`)
FINGERPRINTS: dict[str, dict[str, tuple[str, ...]]] = {
    "psycopg_pool.ConnectionPool.getconn": {
        "fda1ed1073fb": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool.putconn": {
        "38e6a5ce4f5e": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool.check": {
        "e8b7f9bc14b7": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._get_ready_connection": {
        "fc9c30d30e47": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._check_connection": {
        "d550a1cf6364": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._return_connection": {
        "1256accf6a45": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._putconn": {
        "954fb6a331f3": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._reset_connection": {
        "608d0af4d6bc": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._close_connection": {
        "0d9edc58458b": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._shrink_pool": {
        "4d882d9c84b5": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._connect": {
        "4baa9e21a290": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._add_connection": {
        "b428dec45e23": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._start_initial_tasks": {
        "2146428411a2": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._get_measures": {
        "4dd00a462a59": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.MaintenanceTask._run": {
        "df09ac9888cc": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.base.AttemptWithBackoff.update_delay": {
        "cdf974282af8": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._check_open_getconn": {
        "1be284076e28": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._getconn_unchecked": {
        "3e85e498824e": ("3.3.0",),
        "b104f1a64a1b": ("3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._getconn_with_check_loop": {
        "e94dc0f9c447": ("3.3.0", "3.3.1"),
        "0cc77cdc1b2b": ("3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._maybe_grow_pool": {
        "858b57ba1420": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._add_to_pool": {
        "6a350af2cc74": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._check_pool_putconn": {
        "baf29f383dc9": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.ConnectionPool._maybe_close_connection": {
        "7d90456fe314": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.base.BasePool._get_measures": {
        "5691eeb1f600": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.WaitingClient.fail": {
        "f13c6f4b9958": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.base.AttemptWithBackoff": {
        "8b139fea1252": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.AddConnection": {
        "1163ad3a3a2f": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.MaintenanceTask": {
        "d86f4b050521": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.Schedule": {
        "6608165038a1": ("3.3.0", "3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg_pool.pool.WaitingClient": {
        "61cbada2fb42": ("3.3.0",),
        "4e54e9479b38": ("3.3.1", "3.3.2", "3.3.3"),
    },
    "psycopg._preparing.PrepareManager.clear": {
        "8c4e7bdcdf9b": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "psycopg._preparing.PrepareManager._should_discard": {
        "ae4f4ffdf5f9": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4",
        ),
        "f3197e42adbf": ("3.3.5",),
        "a0d04df34011": ("3.3.6", "3.3.7", "3.3.8", "3.3.9"),
    },
    "psycopg.Cursor._execute_gen": {
        "9f790d005b32": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "psycopg.Cursor._executemany_gen_pipeline": {
        "186873e2626f": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "psycopg.Cursor._executemany_gen_no_pipeline": {
        "f6bc52c7ade7": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "psycopg.Cursor._stream_send_gen": {
        "581ffdc652e3": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "psycopg.Cursor._start_copy_gen": {
        "5ed2b3dca236": ("3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6"),
        "d20e7e83ad4f": ("3.2.7", "3.2.8", "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13"),
        "b16dbdb15b4c": (
            "3.3.0", "3.3.1", "3.3.2", "3.3.3", "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8",
            "3.3.9",
        ),
    },
    "psycopg.ServerCursor._declare_gen": {
        "e3315ef87fd6": ("3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6"),
        "f56e9d547960": ("3.2.7", "3.2.8", "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13"),
        "a5fce37a0f8b": (
            "3.3.0", "3.3.1", "3.3.2", "3.3.3", "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8",
            "3.3.9",
        ),
    },
    "psycopg.ServerCursor._close_gen": {
        "73d11f19977a": (
            "3.2.0", "3.2.1", "3.2.2", "3.2.3", "3.2.4", "3.2.5", "3.2.6", "3.2.7", "3.2.8",
            "3.2.9", "3.2.10", "3.2.11", "3.2.12", "3.2.13", "3.3.0", "3.3.1", "3.3.2", "3.3.3",
            "3.3.4", "3.3.5", "3.3.6", "3.3.7", "3.3.8", "3.3.9",
        ),
    },
    "django.db.backends.base.base.BaseDatabaseWrapper.connect": {
        "d1a07c567b41": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.base.base.BaseDatabaseWrapper.set_autocommit": {
        "e3ca5eaddbdf": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.base.base.BaseDatabaseWrapper.init_connection_state": {
        "a2f7da1aec32": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.base.base.BaseDatabaseWrapper.wrap_database_errors": {
        "e0963ad9616e": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.pool": {
        "6b88baa4f587": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10"),
        "7cfb955e5617": ("6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.close_pool": {
        "c1f4fa764081": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.get_connection_params": {
        "c588046ce7c7": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.get_new_connection": {
        "a12656e46f19": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.init_connection_state": {
        "35daa9f863a2": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper._close": {
        "e446705623c6": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper._set_autocommit": {
        "812326d2cbd8": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.close_if_health_check_failed": {
        "3c2c20c66812": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper.ensure_timezone": {
        "73fc57d5b2f5": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.base.DatabaseWrapper._configure_timezone": {
        "d8bcd9fb0674": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.utils.DatabaseErrorWrapper.__exit__": {
        "779cb369a563": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.creation.DatabaseCreation._create_test_db": {
        "0cd579a9fea2": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.creation.DatabaseCreation._clone_test_db": {
        "47ef9e422a01": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.creation.DatabaseCreation._destroy_test_db": {
        "1dd77d444470": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
    "django.db.backends.postgresql.creation.DatabaseCreation._get_test_db_name": {
        "e5a41c1b9d9f": ("5.2", "5.2.10", "5.2.19", "6.0", "6.0.10", "6.1", "6.1.3"),
    },
}  # fmt: skip
# END FINGERPRINTS


# -- looking names up ----------------------------------------------------------


class Missing(Exception):
    """An upstream name that cannot be found."""


def resolve(name: str) -> Any:
    """The object a dotted name designates: modules imported, the rest by getattr."""
    parts = name.split(".")
    try:
        obj: Any = importlib.import_module(parts[0])
    except ImportError as exc:
        raise Missing(f"cannot import {parts[0]} ({exc})") from None
    path = parts[0]
    imported = True
    for part in parts[1:]:
        path = f"{path}.{part}"
        if imported and inspect.ismodule(obj) and not hasattr(obj, part):
            try:
                obj = importlib.import_module(path)
                continue
            except ModuleNotFoundError as exc:
                if exc.name != path:
                    raise Missing(f"cannot import {path} ({exc})") from None
                imported = False
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise Missing(path) from None
        except Exception as exc:  # a descriptor that fails on the class
            raise Missing(f"{path} ({type(exc).__name__}: {exc})") from None
    return obj


def _source_object(obj: Any) -> Any:
    """What inspect.getsource() can read for *obj*: a property's getter, and so on."""
    if isinstance(obj, property) and obj.fget is not None:
        return obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        return obj.__func__
    func = getattr(obj, "func", None)  # functools' and Django's cached_property
    if not inspect.isclass(obj) and callable(func):
        return func
    return obj


def normalised_source(source: str) -> str:
    """*source* with comments and docstrings removed and whitespace collapsed.

    Edits that cannot change behaviour (rewording a comment, reindenting) keep
    the fingerprint; the result does not depend on the Python version.
    """
    text = textwrap.dedent(source)
    lines = text.splitlines(keepends=True)
    spans: list[tuple[int, int, int, int]] = []  # (line, col, end line, end col), 1-based lines
    try:
        tree = ast.parse(text)
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                spans.append((*tok.start, *tok.end))
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return " ".join(text.split())

    def col(line: int, byte_offset: int) -> int:  # ast counts UTF-8 bytes
        return len(lines[line - 1].encode()[:byte_offset].decode(errors="ignore"))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
                and first.end_lineno is not None
                and first.end_col_offset is not None
            ):
                spans.append(
                    (
                        first.lineno,
                        col(first.lineno, first.col_offset),
                        first.end_lineno,
                        col(first.end_lineno, first.end_col_offset),
                    )
                )
    chars = [list(line) for line in lines]
    for line, start, end_line, end in sorted(spans, reverse=True):
        if line == end_line:
            del chars[line - 1][start:end]
        else:
            del chars[end_line - 1][:end]
            for i in range(line, end_line - 1):
                chars[i] = []
            del chars[line - 1][start:]
    return " ".join("".join("".join(c) for c in chars).split())


def fingerprint(obj: Any) -> str:
    """12 hex digits of sha256 over *obj*'s normalised source."""
    source = inspect.getsource(_source_object(obj))
    return hashlib.sha256(normalised_source(source).encode()).hexdigest()[:12]


def installed_version(package: str) -> str:
    dist = DISTRIBUTIONS.get(package, package)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


# Cheap objects whose instance attributes are those of a real one.
_SAMPLES: dict[str, Callable[[Any], Any]] = {
    _POOL: lambda cls: cls(open=False),  # closed: no thread, no connection
    _PREPARE: lambda cls: cls(),
    "django.db.utils.DatabaseErrorWrapper": lambda cls: cls(None),
    "django.db.utils.ConnectionHandler": lambda cls: cls({}),
}


@functools.cache
def _package_sources(package: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return ""
    texts = []
    for location in spec.submodule_search_locations:
        for path in sorted(Path(location).rglob("*.py")):
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return "\n".join(texts)


def _has_attribute(use: Use) -> bool:
    """Whether the attribute exists: on the class, on a sample, or assigned in the source."""
    owner_name, _, attr = use.name.rpartition(".")
    owner = resolve(owner_name)
    if hasattr(owner, attr):
        return True
    if (make := _SAMPLES.get(owner_name)) is not None:
        try:
            sample = make(owner)
        except Exception:
            sample = None
        if sample is not None and hasattr(sample, attr):
            return True
    # An instance attribute set outside the class (the pool stamps connections)
    # or after construction: look for an assignment in the package's source.
    assigned = re.compile(rf"\.{re.escape(attr)}\s*(?::[^=\n]+)?=(?!=)")
    return bool(assigned.search(_package_sources(use.package)))


# -- the guard -----------------------------------------------------------------


def _version_key(version: str) -> tuple[Any, ...]:
    key: list[Any] = []
    for part in re.split(r"[.+-]", version):
        match = re.match(r"(\d*)(.*)", part)
        assert match is not None
        number, rest = match.groups()
        # 6.1 < 6.1.0? no: pad; a pre-release (rc1) sorts before the release.
        key.append((int(number) if number else -1, rest == "", rest))
    return tuple(key)


def _versions(versions: Iterable[str]) -> str:
    ordered = sorted(set(versions), key=_version_key)
    if len(ordered) > 3:
        return f"{ordered[0]}-{ordered[-1]} ({len(ordered)} releases)"
    return ", ".join(ordered)


@dataclass(frozen=True)
class Finding:
    use: Use
    version: str
    fingerprint: str | None  # None: not a function/class, or missing
    missing: str | None  # what could not be found


def inspect_installed(uses: Iterable[Use] = USES) -> list[Finding]:
    """Look every name up in the installed packages; fingerprint what has source."""
    findings = []
    for use in uses:
        version = installed_version(use.package)
        try:
            if use.kind == ATTRIBUTE:
                if not _has_attribute(use):
                    raise Missing(use.name)
                findings.append(Finding(use, version, None, None))
                continue
            obj = resolve(use.name)
            findings.append(Finding(use, version, fingerprint(obj), None))
        except Missing as exc:
            findings.append(Finding(use, version, None, str(exc)))
        except (OSError, TypeError) as exc:  # no source to read
            findings.append(Finding(use, version, None, f"{use.name} has no source ({exc})"))
    return findings


def check(
    uses: Iterable[Use] = USES,
    fingerprints: Mapping[str, Mapping[str, Iterable[str]]] | None = None,
) -> list[str]:
    """One sentence per problem with the installed versions; [] when all is known."""
    if fingerprints is None:
        fingerprints = FINGERPRINTS
    problems = []
    record = "python -m django_pooled_pg.upstream --record"
    for f in inspect_installed(uses):
        use = f.use
        dist = DISTRIBUTIONS.get(use.package, use.package)
        advice = _ADVICE[use.kind].format(used_by=use.used_by)
        if f.missing is not None:
            what = use.name if f.missing == use.name else f"{use.name}: {f.missing}"
            verb = "sets" if use.set_by else "has"
            problems.append(
                f"{dist} {f.version} no longer {verb} {use.short} ({what}), "
                f"which django_pooled_pg uses ({use.kind}: {use.why}); {advice}. "
                "See docs/contributing.md, 'A new upstream release'."
            )
            continue
        if f.fingerprint is None:
            continue
        known = fingerprints.get(use.name, {})
        if f.fingerprint in known:
            continue
        if not known:
            problems.append(
                f"No fingerprint recorded for {use.name} ({use.kind}, {use.used_by}): "
                f"{dist} {f.version} has {f.fingerprint}; record it with `{record}`."
            )
            continue
        seen = "; ".join(f"{h} in {_versions(v)}" for h, v in known.items())
        problems.append(
            f"{dist} {f.version} changed {use.short} ({use.name}): fingerprint "
            f"{f.fingerprint} is none of the known ({seen}). {advice[0].upper()}{advice[1:]} "
            f"(we use it because: {use.why}), then record the new fingerprint with `{record}` "
            "and review the version bound in pyproject.toml."
        )
    return problems


# -- recording ---------------------------------------------------------------


def merged(
    findings: Iterable[Finding],
    fingerprints: Mapping[str, Mapping[str, Iterable[str]]],
) -> dict[str, dict[str, tuple[str, ...]]]:
    """*fingerprints* with the installed versions' fingerprints added.

    A version moves to the hash now seen for it; hashes left with no version
    are dropped. Entries no longer in USES are dropped.
    """
    table = {name: {h: set(v) for h, v in seen.items()} for name, seen in fingerprints.items()}
    names = set()
    for f in findings:
        if not f.use.fingerprinted:
            continue
        names.add(f.use.name)
        if f.fingerprint is None:
            continue
        seen = table.setdefault(f.use.name, {})
        for versions in seen.values():
            versions.discard(f.version)
        seen.setdefault(f.fingerprint, set()).add(f.version)
    result = {}
    for name in (u.name for u in USES):  # in USES's order
        if name not in table or name not in names | set(fingerprints):
            continue
        ordered = {h: sorted(v, key=_version_key) for h, v in table[name].items() if v}
        result[name] = {
            h: tuple(v) for h, v in sorted(ordered.items(), key=lambda hv: _version_key(hv[1][0]))
        }
    return result


def render(fingerprints: Mapping[str, Mapping[str, tuple[str, ...]]]) -> str:
    out = [
        "# BEGIN FINGERPRINTS (written by `python -m django_pooled_pg.upstream --record`)",
        "FINGERPRINTS: dict[str, dict[str, tuple[str, ...]]] = {",
    ]
    for name, seen in fingerprints.items():
        out.append(f'    "{name}": {{')
        for h, versions in seen.items():
            quoted = [f'"{v}"' for v in versions]
            line = f'        "{h}": ({", ".join(quoted)}{"," if len(quoted) == 1 else ""}),'
            if len(line) <= 100:
                out.append(line)
                continue
            out.append(f'        "{h}": (')
            row: list[str] = []
            for q in quoted:
                if row and len("            " + " ".join(row) + f" {q},") > 100:
                    out.append("            " + " ".join(row))
                    row = []
                row.append(f"{q},")
            out.append("            " + " ".join(row))
            out.append("        ),")
        out.append("    },")
    out += ["}  # fmt: skip", "# END FINGERPRINTS"]
    return "\n".join(out) + "\n"


def record(path: Path | None = None) -> dict[str, dict[str, tuple[str, ...]]]:
    """Add the installed versions' fingerprints to this file's FINGERPRINTS."""
    path = path or Path(__file__)
    text = path.read_text(encoding="utf-8")
    start = text.index("# BEGIN FINGERPRINTS")
    end = text.index("# END FINGERPRINTS")
    end = text.index("\n", end) + 1
    namespace: dict[str, Any] = {}
    exec(text[start:end], namespace)  # the block is a plain literal
    table = merged(inspect_installed(), namespace["FINGERPRINTS"])
    path.write_text(text[:start] + render(table) + text[end:], encoding="utf-8")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m django_pooled_pg.upstream",
        description="Fingerprint the private psycopg, psycopg_pool and Django code "
        "django_pooled_pg depends on, for the installed versions.",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write the installed versions' fingerprints into FINGERPRINTS in this file",
    )
    parser.add_argument("--check", action="store_true", help="print check()'s problems")
    args = parser.parse_args(argv)
    versions = ", ".join(f"{d} {installed_version(p)}" for p, d in DISTRIBUTIONS.items())
    print(f"# Python {sys.version.split()[0]}; {versions}")
    findings = inspect_installed()
    for f in findings:
        if f.missing is not None:
            status = f"MISSING ({f.missing})"
        elif f.fingerprint is None:
            status = "present"
        elif f.fingerprint in FINGERPRINTS.get(f.use.name, {}):
            status = f"{f.fingerprint} known"
        else:
            status = f"{f.fingerprint} NEW"
        print(f"{f.use.package:13} {f.version:9} {f.use.kind:10} {f.use.name}: {status}")
    if args.record:
        record()
        print(f"# recorded in {Path(__file__)}")
    if args.check:
        problems = check()
        for problem in problems:
            print(f"\n{problem}")
        return 1 if problems else 0
    return 1 if any(f.missing for f in findings) else 0


if __name__ == "__main__":
    sys.exit(main())
