"""Exceptions the engine raises to applications, and messages shared by several modules."""

from __future__ import annotations

from django.db.utils import OperationalError as DjangoOperationalError
from psycopg_pool import PoolTimeout

#: Said by the system check and when a pool is created.
PERSISTENT_CONNECTIONS_MESSAGE = (
    "Pooling doesn't support persistent connections. Set CONN_MAX_AGE to 0 "
    "(the default): a pooled connection goes back to the pool at the end of "
    "each request and stays open there. To bound a connection's age, set "
    "OPTIONS['pool']['max_lifetime'] (seconds) instead."
)


class PoolExhausted(PoolTimeout, DjangoOperationalError):
    """No connection could be had from the pool in time, or its queue is full.

    It is a ``psycopg_pool.PoolTimeout`` (what Django's own pool raises and its
    tests expect) and a ``django.db.OperationalError`` (what applications
    catch). The engine lets it through Django's error wrapper unchanged, so
    code receives this class itself, also through the ORM.
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "",
        max_size: int = 0,
        in_use: int = 0,
        waiting: int = 0,
        waited: float = 0.0,
    ) -> None:
        super().__init__(message)
        self.alias = alias
        self.max_size = max_size
        self.in_use = in_use
        self.waiting = waiting
        self.waited = waited


class ServerUnavailable(DjangoOperationalError):
    """The server cannot be reached: every recent connection attempt failed.

    Raised at once, while the pool holds no connection and keeps retrying
    in the background, when the pool's ``fail_fast`` option is on (the
    default). The message names the cause PostgreSQL or the network gave.
    """

    def __init__(
        self,
        message: str,
        *,
        alias: str = "",
        cause: str = "",
        failing_for: float = 0.0,
        server_role: str = "",
    ):
        super().__init__(message)
        #: The alias whose pool cannot connect, and the last attempt's error.
        self.alias = alias
        self.cause = cause
        #: Seconds since the first failed attempt of this outage.
        self.failing_for = failing_for
        #: The role the alias needs ("primary", "standby", "any"): a router
        #: may send reads elsewhere when a replica ("any", "standby") is down.
        self.server_role = server_role
