"""The pooled PostgreSQL backend: Django's own, with checkout instead of connect."""

from __future__ import annotations

import copy
import inspect
import logging
import os
import weakref
from time import monotonic
from typing import Any

import psycopg
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db.backends.base.base import NO_DB_ALIAS, BaseDatabaseWrapper
from django.db.backends.postgresql.base import DatabaseWrapper as PostgreSQLDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import IsolationLevel
from django.db.backends.signals import connection_created
from django.db.utils import DatabaseErrorWrapper
from django.utils.asyncio import async_unsafe
from django.utils.functional import cached_property
from psycopg import Connection
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from . import registry, roles
from .checks import check_pool_options
from .creation import DatabaseCreation
from .errors import PERSISTENT_CONNECTIONS_MESSAGE, PoolExhausted
from .observability.activity import application_name
from .observability.records import HOSTNAME
from .options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_TCP_SETTINGS,
    FLAT_PREFIX,
    OptionError,
    PoolOptions,
    parse,
    pool_switch,
)
from .pool import DjangoPool
from .session import PooledConnection
from .startup import StartupSettings

#: Celery's Django fix-up: its per-task close_pool() is declined (see
#: DatabaseWrapper.close_pool; tests/test_celery_asgi.py fails if it moves).
CELERY_FIXUP = "celery.fixups.django"

logger = logging.getLogger("django_pooled_pg")

checks.register(check_pool_options)


class _ErrorWrapper(DatabaseErrorWrapper):
    """Django's error wrapper, letting PoolExhausted through as itself.

    Django re-raises every psycopg error as a new plain Django exception;
    PoolExhausted already is a ``django.db.OperationalError`` and carries the
    pool's state, which the copy would lose.
    """

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if exc_type is None:  # every query: nothing more to check
            return
        if issubclass(exc_type, PoolExhausted):
            self.wrapper.errors_occurred = True  # type: ignore[attr-defined]
            return
        if issubclass(exc_type, psycopg.errors.ReadOnlySqlTransaction):
            # SQLSTATE 25006: on an alias that needs a primary, the pool
            # discards the connection when it comes back (pool._return_connection).
            conn = self.wrapper.connection  # type: ignore[attr-defined]
            if isinstance(conn, PooledConnection):
                conn._dpp_read_only_error = True
        if issubclass(exc_type, psycopg.errors.InvalidCursorName) and "_django_curs_" in str(
            exc_value
        ):
            logger.warning(
                "database alias %r: a server-side cursor of a chunked read vanished "
                "between two statements, as it does behind PgBouncer in transaction mode: "
                "set DATABASES[%r]['OPTIONS']['pool']['pgbouncer'] = 'transaction' "
                "(see docs/scaling-out.md).",
                self.wrapper.alias,  # type: ignore[attr-defined]
                self.wrapper.alias,  # type: ignore[attr-defined]
            )
        super().__exit__(exc_type, exc_value, traceback)


def _without_pool_keys(params: dict[str, Any]) -> dict[str, Any]:
    """Connection parameters without flat ``pool_<option>`` keys (pool options, not libpq's)."""
    for key in [k for k in params if isinstance(k, str) and k.startswith(FLAT_PREFIX)]:
        del params[key]
    return params


class DatabaseWrapper(PostgreSQLDatabaseWrapper):
    creation_class = DatabaseCreation
    #: OPTIONS keys a subclass takes out itself (in get_connection_params),
    #: which are then not refused as unknown to libpq.
    non_libpq_options: frozenset[str] = frozenset()

    def __init__(self, settings_dict: dict[str, Any], alias: str = "default") -> None:
        options = settings_dict.setdefault("OPTIONS", {})
        if "pool" in options:  # ?pool=false in a DATABASE_URL arrives as a string
            options["pool"] = pool_switch(options["pool"])
        # Choosing the engine turns pooling on. Writing it into OPTIONS makes
        # every part of Django that reads OPTIONS["pool"] (feature flags,
        # test skips) see what the engine really does.
        if "pool" not in options or options["pool"] == {}:
            options["pool"] = True
        super().__init__(settings_dict, alias)
        self._dpp_generation = 0
        self._dpp_pool_cache: tuple[tuple[Any, ...], DjangoPool] | None = None

    @cached_property
    def wrap_database_errors(self) -> DatabaseErrorWrapper:  # type: ignore[override]
        # Cached as in Django: it is entered around every query.
        return _ErrorWrapper(self)

    # -- which pool --------------------------------------------------------

    @property
    def pooled(self) -> bool:
        """Whether this connection checks out from a pool (False: connect/close)."""
        return self.alias != NO_DB_ALIAS and self.settings_dict["OPTIONS"].get("pool") is not False

    @property
    def pool(self) -> DjangoPool | None:  # type: ignore[override]
        """This alias's pool for the current settings, created on first use.

        One per alias and connection parameters per process; a changed NAME,
        TIME_ZONE or option gives a new pool, never the old one.
        """
        if not self.pooled:
            return None
        # Every checkout asks: compare the settings the pool was chosen for
        # (a C-level comparison) instead of building the registry key again.
        s = self.settings_dict
        seen = (
            s["NAME"], s["USER"], s["PASSWORD"], s["HOST"], s["PORT"], s["OPTIONS"],
            self.timezone_name, settings.USE_TZ,
        )  # fmt: skip
        cached = self._dpp_pool_cache
        if cached is not None and cached[0] == seen and not cached[1].closed:
            return cached[1]
        pool = registry.get_or_create(self._pool_key(), self.alias, self._create_pool)
        # A copy of OPTIONS: a change made in place must not match the cache.
        try:
            self._dpp_pool_cache = ((*seen[:5], copy.deepcopy(seen[5]), *seen[6:]), pool)
        except Exception:  # an option value that cannot be copied: no cache
            self._dpp_pool_cache = None
        return pool

    def _pool_key(self) -> tuple[Any, ...]:
        s = self.settings_dict
        password = s["PASSWORD"]
        return (
            self.alias,
            s["NAME"],
            s["USER"],
            id(password) if callable(password) else password,
            s["HOST"],
            s["PORT"],
            repr(sorted(s["OPTIONS"].items(), key=lambda kv: kv[0])),
            self.timezone_name,
            settings.USE_TZ,
        )

    def pool_options(self) -> PoolOptions:
        """The validated pool options; ImproperlyConfigured names a bad one."""
        try:
            options = self.settings_dict["OPTIONS"]
            # No "pool" key (OPTIONS replaced after __init__) is pooling on, as in pooled.
            return parse(
                self.alias,
                options.get("pool", True),
                db_options=options,
                also_known=self.non_libpq_options,
            )
        except OptionError as exc:
            raise ImproperlyConfigured(str(exc)) from None

    def _pool_connection_params(self, opts: PoolOptions) -> dict[str, Any]:
        """libpq parameters of the pool's connections (a password may be a callable)."""
        params = _without_pool_keys(PostgreSQLDatabaseWrapper.get_connection_params(self))
        params["autocommit"] = True  # Django sets its own at checkout
        params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT)
        for key, value in DEFAULT_TCP_SETTINGS.items():
            params.setdefault(key, value)
        # Which process and alias each session serves, for pg_stat_activity
        # and poolstats; the user's own name stays in front.
        params["application_name"] = application_name(
            params.get("application_name"), HOSTNAME, os.getpid(), self.alias
        )
        if (
            "," in str(params.get("host") or "")
            and roles.role_for(opts.server_role, self.settings_dict["OPTIONS"]) == roles.PRIMARY
            and not opts.pgbouncer
        ):
            # Several hosts and no target_session_attrs: libpq would stay on
            # the first that answers, standby or not; ask it for a writable one.
            params.setdefault("target_session_attrs", "read-write")
        password = self.settings_dict["PASSWORD"]
        provider = opts.password_provider or (password if callable(password) else None)
        if provider is not None:
            params["password"] = provider
        return params

    def _startup_settings(self, params: dict[str, Any]) -> StartupSettings:
        """Time zone and role for the startup packet, and the user's own
        ``options``, taken out of *params*: as session defaults they cost no
        statement and DISCARD ALL restores them; where a pooler refuses
        them, they are set by SQL (startup.py)."""
        engine = {"TimeZone": self.timezone_name}
        if role := self.settings_dict["OPTIONS"].get("assume_role"):
            engine["role"] = role
        return StartupSettings(self.alias, engine, params.pop("options", None) or "")

    def direct_connection(self, **overrides: Any) -> Connection[Any]:
        """A connection outside the pool, with the pool's parameters.

        poolstats reads pg_stat_activity with it, so that looking does not
        take a connection from the pool it looks at.
        """
        params = self._pool_connection_params(self.pool_options())
        if callable(params.get("password")):
            params["password"] = params["password"]()
        params.update(overrides)
        return Connection.connect(**params)

    def pooler_admin_connection(self) -> Connection[Any] | None:
        """A connection to PgBouncer's admin console (pool option pgbouncer_admin), or None.

        This alias's parameters (its password resolved as for the pool) on
        database ``pgbouncer``, overridden by the option's dict; no startup
        ``options``, which the console refuses. Rows come as dicts.
        """
        admin = self.pool_options().pgbouncer_admin
        if admin is None:
            return None
        overrides = {
            "dbname": "pgbouncer",
            "options": "",
            "application_name": "django_pooled_pg poolstats",
            "autocommit": True,
            "row_factory": dict_row,
        }
        return self.direct_connection(**overrides, **(admin if isinstance(admin, dict) else {}))

    def _create_pool(self) -> DjangoPool:
        if self.settings_dict.get("CONN_MAX_AGE", 0) != 0:
            raise ImproperlyConfigured(PERSISTENT_CONNECTIONS_MESSAGE)
        opts = self.pool_options()
        params = self._pool_connection_params(opts)
        startup = self._startup_settings(params)
        kwargs: dict[str, Any] | Any
        if callable(provider := params.get("password")):
            del params["password"]

            def kwargs() -> dict[str, Any]:
                return {**params, "password": provider()}
        else:
            kwargs = params

        if opts.check_given:
            check = opts.check
        elif self.settings_dict["CONN_HEALTH_CHECKS"]:
            check = ConnectionPool.check_connection
        else:
            check = None
        s = self.settings_dict
        return DjangoPool(
            alias=self.alias,
            options=opts,
            kwargs=kwargs,
            check=check,
            database=(s["HOST"], str(s["PORT"]), s["NAME"]),
            user=s["USER"],
            startup=startup,
            role=roles.role_for(opts.server_role, s["OPTIONS"]),
        )

    def close_pool(self) -> None:
        """Close this alias's pools in this process; never creates one.

        Except when Celery's Django fix-up asks: since Celery 5.6 it calls
        close_pool() around every task of a prefork worker, because Django's
        own pool is not fork-safe (celery/celery#10554). Ours is (a forked
        child lets go of what it inherited, registry.py), so closing would
        only make every task connect anew: the task's connection is returned
        by the close() it calls just before, and the pool stays.
        """
        caller = inspect.currentframe()
        caller = caller.f_back if caller is not None else None
        if caller is not None and caller.f_globals.get("__name__") == CELERY_FIXUP:
            return
        if self.connection is not None and isinstance(self.connection, PooledConnection):
            self.close()
        registry.close_matching(lambda p: p.alias == self.alias)

    # -- connect and close ---------------------------------------------------

    def get_connection_params(self) -> dict[str, Any]:
        """Django's parameters for this alias, a callable password resolved.

        Third-party code opens connections of its own from these (task
        queues, test helpers needing a second session), so they are what
        Django's backend gives, without the pool's startup ``options``, which
        server-side poolers refuse. A checkout does not call this: the pool
        was given its parameters once (_create_pool).
        """
        params: dict[str, Any] = _without_pool_keys(super().get_connection_params())
        if callable(password := params.get("password")):
            params["password"] = password()
        elif (
            "password" not in params
            and self.pooled
            and (provider := self.pool_options().password_provider) is not None
        ):
            params["password"] = provider()
        return params

    @async_unsafe
    def connect(self) -> None:
        """Django's connect(), minus what a checkout does not need.

        BaseDatabaseWrapper.connect() (the same from Django 5.2 to 6.1) runs
        at every checkout: it builds connection parameters the pool already
        has, and sets autocommit through set_autocommit(), whose checks and
        nested ensure_connection() find nothing to do on a pooled connection
        (it comes back in autocommit). Everything else is kept as it is,
        ``connection_created`` included, which Django's pool also sends at
        every checkout. test_checkout proves the wrapper ends in the state
        Django's connect() leaves.
        """
        if not self.pooled:
            super().connect()
            return
        self.check_settings()
        # In case the previous connection was closed while in an atomic block
        self.in_atomic_block = False
        self.savepoint_ids = []
        self.atomic_blocks = []
        self.needs_rollback = False
        s = self.settings_dict
        self.health_check_enabled = s["CONN_HEALTH_CHECKS"]
        max_age = s["CONN_MAX_AGE"]
        self.close_at = None if max_age is None else monotonic() + max_age
        self.closed_in_transaction = False
        self.errors_occurred = False
        self.health_check_done = True
        if type(self).get_new_connection is DatabaseWrapper.get_new_connection:
            conn = self._checkout()
        else:  # a subclass's own, called as Django's connect() calls it
            conn = self.get_new_connection(self.get_connection_params())
        self.connection = conn
        if s["AUTOCOMMIT"] and conn.autocommit and not self.run_commit_hooks_on_set_autocommit_on:
            self.autocommit = True  # what set_autocommit(True) would leave
        else:
            self.set_autocommit(s["AUTOCOMMIT"])
        self.init_connection_state()
        connection_created.send(sender=self.__class__, connection=self)
        self.run_on_commit = []

    @async_unsafe
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self.pooled:
            return super().get_new_connection(conn_params)
        return self._checkout()

    def _checkout(self) -> PooledConnection:
        pool = self.pool
        assert pool is not None
        # As Django: the isolation level is validated before connecting, and
        # set on the connection object (client-side) at every checkout.
        options = self.settings_dict["OPTIONS"]
        if "isolation_level" in options:
            try:
                level = IsolationLevel(options["isolation_level"])
            except ValueError:
                raise ImproperlyConfigured(
                    f"Invalid transaction isolation level {options['isolation_level']} "
                    "specified. Use one of the psycopg.IsolationLevel values."
                ) from None
        else:
            level = IsolationLevel.READ_COMMITTED
        self.isolation_level = level  # type: ignore[assignment]
        if pool._closed:  # not opened yet (open() is idempotent but not free)
            registry.open_pool(pool)
        conn = pool.getconn()
        conn._dpp_owner = weakref.ref(self)
        self._dpp_generation = conn._dpp_generation
        if "isolation_level" in options:
            conn.isolation_level = level  # type: ignore[assignment]
        return conn

    def init_connection_state(self) -> None:
        # Django's own skips the time zone and role when self.pool is set,
        # but reads self.pool (about 0.8 us here) at every checkout.
        if isinstance(self.connection, PooledConnection):
            # The version check only: time zone and role came with the
            # connection (see _create_pool).
            BaseDatabaseWrapper.init_connection_state(self)
        else:
            super().init_connection_state()

    def _close(self) -> None:
        conn = self.connection
        if not isinstance(conn, PooledConnection):
            return super()._close()  # type: ignore[misc,no-any-return]
        self.connection = None
        with self.wrap_database_errors:
            registry.give_back(conn, self._dpp_generation)

    def _set_autocommit(self, autocommit: bool) -> None:
        # Django sets autocommit at every connect; a pooled connection comes
        # back in autocommit, and psycopg's setter costs a call into its
        # I/O loop even when nothing changes.
        if (
            isinstance(self.connection, PooledConnection)
            and self.connection.autocommit == autocommit
        ):
            return
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    def chunked_cursor(self) -> Any:
        """Django's server-side cursor, except outside a transaction behind transaction pooling.

        There a cursor declared WITH HOLD stays on the server connection that
        declared it, and the next FETCH goes to another one ("cursor ... does
        not exist"): a client-side cursor reads the rows instead. Inside a
        transaction the server connection is the same throughout.
        """
        if self.get_autocommit():  # connects
            pool = getattr(self.connection, "_dpp_pool", None)
            if pool is not None and pool.options.pgbouncer == "transaction":
                return self.cursor()
        return super().chunked_cursor()

    def close_if_health_check_failed(self) -> None:
        # As Django's, which reads self.pool (about 0.8 us) at every cursor.
        if self.pooled:
            return  # the pool checks at every checkout
        super().close_if_health_check_failed()

    def ensure_timezone(self) -> bool:
        # The time zone is part of the pool's key: the next checkout uses a
        # pool for the new one. The connection in hand is switched now.
        if self.connection is None:
            return False
        return bool(self._configure_timezone(self.connection))  # type: ignore[attr-defined]
