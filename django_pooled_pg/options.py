"""Pool options: names, defaults, validation.

This module is the one place that knows the options of
``DATABASES[alias]["OPTIONS"]["pool"]``. The system check, the wrapper and
the configuration reference (``docs/configuration.md``) all read it.
"""

from __future__ import annotations

import contextlib
import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.utils.module_loading import import_string

#: libpq ``connect_timeout`` the engine sets when OPTIONS has none (seconds).
#: psycopg caps an unset timeout at 130 s; a server that never answers should
#: fail a connection attempt long before a web worker is killed.
DEFAULT_CONNECT_TIMEOUT = 5

#: libpq TCP settings the engine sets when OPTIONS has none of its own. A
#: peer that vanished (a dropped network, a host that died) is noticed after
#: about 90 s of silence on an idle connection (keepalives) and after 30 s of
#: unacknowledged data on a busy one (tcp_user_timeout), instead of the
#: kernel's defaults of hours and about 15 minutes. Neither ends a slow query
#: on a server that is alive: its TCP stack keeps acknowledging.
DEFAULT_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 60,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # milliseconds
}


class OptionError(ValueError):
    """One invalid pool option; the message names the option and what is accepted."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    accepted: str  # said in error messages and in the docs
    doc: str
    kind: str  # "int", "number", "bool", "str", "callable"
    minimum: float | None = None
    allow_none: bool = False
    psycopg: bool = True  # passed on to psycopg_pool's ConnectionPool


OPTIONS: tuple[Option, ...] = (
    Option(
        "min_size",
        1,
        "an integer >= 0 (and <= max_size)",
        "Connections kept open even when idle. One warm connection per process "
        "serves the first request after a quiet spell without a connect; "
        "psycopg_pool's default of 4 multiplies by every worker process.",
        "int",
        minimum=0,
    ),
    Option(
        "max_size",
        10,
        "an integer >= 1 (and >= min_size)",
        "Most connections this process opens for the alias. Multiply by the "
        "number of worker processes to stay under the server's max_connections.",
        "int",
        minimum=1,
    ),
    Option(
        "timeout",
        10.0,
        "a number of seconds > 0",
        "How long a checkout waits for a free connection before raising "
        "PoolExhausted. Shorter than gunicorn's 30 s worker timeout, so a "
        "starved worker reports the cause instead of being killed.",
        "number",
        minimum=0,
    ),
    Option(
        "max_waiting",
        0,
        "an integer >= 0 (0: no limit)",
        "Requests allowed to queue for a connection; one more is rejected at "
        "once with PoolExhausted.",
        "int",
        minimum=0,
    ),
    Option(
        "max_lifetime",
        3600.0,
        "a number of seconds > 0",
        "A connection older than this is closed when returned and replaced. "
        "This is the pooled equivalent of CONN_MAX_AGE.",
        "number",
        minimum=0,
    ),
    Option(
        "max_idle",
        600.0,
        "a number of seconds > 0",
        "Connections above min_size unused for this long are closed.",
        "number",
        minimum=0,
    ),
    Option(
        "reconnect_timeout",
        300.0,
        "a number of seconds > 0",
        "How long the pool keeps retrying, with backoff, to open a connection "
        "that failed before it gives up on that slot.",
        "number",
        minimum=0,
    ),
    Option(
        "num_workers",
        2,
        "an integer >= 1",
        "Background threads that open and close connections for the pool.",
        "int",
        minimum=1,
    ),
    Option(
        "name",
        None,
        "a string",
        "The pool's name in logs and thread names (default: the alias).",
        "str",
        allow_none=True,
    ),
    Option(
        "check",
        None,
        "a callable taking a psycopg connection, or its dotted path",
        "Run on every checkout (a round trip). Default: psycopg_pool's "
        "check_connection when CONN_HEALTH_CHECKS is on, else none. The engine "
        "always detects connections the server closed, without a round trip.",
        "callable",
        allow_none=True,
    ),
    Option(
        "configure",
        None,
        "a callable taking a psycopg connection, or its dotted path",
        "Run on every new connection and again after each session reset, so "
        "what it sets survives resets. It must use only the connection it is "
        "given and leave it idle.",
        "callable",
        allow_none=True,
    ),
    Option(
        "reset",
        None,
        "a callable taking a psycopg connection, or its dotted path",
        "Run when a connection is returned, in the returning thread, before "
        "the session reset (never queued behind connection attempts).",
        "callable",
        allow_none=True,
    ),
    Option(
        "reset_session",
        True,
        "True or False",
        "Reset the session (DISCARD ALL) when a connection is returned, so no "
        "SET, SET ROLE, temporary table, advisory lock, LISTEN or prepared "
        "statement leaks into the next request. False saves the reset's small "
        "cost but lets one request's session state reach the next one.",
        "bool",
        psycopg=False,
    ),
    Option(
        "fail_fast",
        True,
        "True or False",
        "While every connection attempt since the last success has failed and "
        "the pool holds no connection, checkouts fail at once with "
        "ServerUnavailable naming the cause (as Django without a pool fails at "
        "once), instead of each waiting the full timeout; the pool keeps "
        "retrying in the background. False: checkouts wait up to timeout.",
        "bool",
        psycopg=False,
    ),
    Option(
        "password_provider",
        None,
        "a callable returning the password, or its dotted path",
        "Called for each new physical connection, for credentials that expire "
        "(cloud IAM tokens). Alternative to a callable PASSWORD.",
        "callable",
        allow_none=True,
        psycopg=False,
    ),
    Option(
        "stats",
        True,
        "True or False",
        "Count checkouts, waits, errors and connection closes and keep the "
        "wait, hold and connect time distributions that django_pooled_pg.stats(), "
        "manage.py poolstats and the metrics show. False records only the live "
        "state (sizes, in use, waiting).",
        "bool",
        psycopg=False,
    ),
    Option(
        "leak_timeout",
        None,
        "a number of seconds > 0, or None (off)",
        "A connection held longer than this is logged once at WARNING with the "
        "stack that checked it out, and again at INFO when it comes back. "
        "Recording the stack costs each checkout some microseconds.",
        "number",
        minimum=0,
        allow_none=True,
        psycopg=False,
    ),
    Option(
        "log_waits_over",
        1.0,
        "a number of seconds > 0, or None (off)",
        "A checkout that waited longer than this for a connection is logged at "
        "WARNING on the django_pooled_pg logger, with the pool's state.",
        "number",
        minimum=0,
        allow_none=True,
        psycopg=False,
    ),
)

BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class PoolOptions:
    """Validated options of one pool, defaults filled in, callables resolved."""

    min_size: int
    max_size: int
    timeout: float
    max_waiting: int
    max_lifetime: float
    max_idle: float
    reconnect_timeout: float
    num_workers: int
    name: str | None
    check: Callable[[Any], None] | None
    configure: Callable[[Any], None] | None
    reset: Callable[[Any], None] | None
    reset_session: bool
    fail_fast: bool
    password_provider: Callable[[], str] | None
    stats: bool
    leak_timeout: float | None
    log_waits_over: float | None
    check_given: bool  # a user's "check" (even None) overrides CONN_HEALTH_CHECKS


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, BY_NAME, n=1)
    if close:
        return f" Did you mean '{close[0]}'?"
    return ""


def _value_error(alias: str, opt: Option, value: Any) -> OptionError:
    return OptionError(
        opt.name,
        f"DATABASES[{alias!r}]['OPTIONS']['pool']['{opt.name}'] is {value!r}; "
        f"it must be {opt.accepted}.",
    )


def _coerce(alias: str, opt: Option, value: Any) -> Any:
    if value is None and opt.allow_none:
        return None
    if opt.kind == "bool":
        if isinstance(value, bool):
            return value
        raise _value_error(alias, opt, value)
    if opt.kind == "str":
        if isinstance(value, str) and value:
            return value
        raise _value_error(alias, opt, value)
    if opt.kind == "callable":
        if isinstance(value, str):
            try:
                value = import_string(value)
            except ImportError as exc:
                raise OptionError(
                    opt.name,
                    f"DATABASES[{alias!r}]['OPTIONS']['pool']['{opt.name}'] names "
                    f"{value!r}, which cannot be imported ({exc}); it must be "
                    f"{opt.accepted}.",
                ) from None
        if callable(value):
            return value
        raise _value_error(alias, opt, value)
    # Numbers; bool is an int in Python but never a size or a timeout.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _value_error(alias, opt, value)
    if opt.kind == "int" and not isinstance(value, int):
        raise _value_error(alias, opt, value)
    if isinstance(value, float) and not math.isfinite(value):
        raise _value_error(alias, opt, value)
    if opt.minimum is not None:
        strict = opt.kind == "number"  # timeouts must be > 0, sizes >= minimum
        if value < opt.minimum or (strict and value <= opt.minimum):
            raise _value_error(alias, opt, value)
    return float(value) if opt.kind == "number" else value


def iter_errors(alias: str, raw: Any) -> list[OptionError]:
    """Every problem with ``OPTIONS["pool"]`` of *alias*, in a stable order."""
    errors: list[OptionError] = []
    with contextlib.suppress(OptionError):
        parse(alias, raw, collect=errors)
    return errors


def parse(alias: str, raw: Any, collect: list[OptionError] | None = None) -> PoolOptions:
    """Validate ``OPTIONS["pool"]`` (absent, True or a dict) into PoolOptions.

    Raises the first OptionError, or with *collect* records them all and raises
    the first at the end. The user's dict is never mutated.
    """
    errors: list[OptionError] = [] if collect is None else collect
    if raw is True:
        given: Mapping[str, Any] = {}
    elif isinstance(raw, Mapping):
        given = raw
    else:
        errors.append(
            OptionError(
                "pool",
                f"DATABASES[{alias!r}]['OPTIONS']['pool'] is {raw!r}; it must be "
                "True, False (no pooling) or a dict of pool options.",
            )
        )
        raise errors[0]

    values: dict[str, Any] = {}
    for key in given:
        if key not in BY_NAME:
            errors.append(
                OptionError(
                    str(key),
                    f"DATABASES[{alias!r}]['OPTIONS']['pool'] has an unknown option "
                    f"{key!r}.{_suggest(str(key))} Valid options: "
                    f"{', '.join(sorted(BY_NAME))}.",
                )
            )
    for opt in OPTIONS:
        if opt.name in given:
            try:
                values[opt.name] = _coerce(alias, opt, given[opt.name])
            except OptionError as exc:
                errors.append(exc)
                values[opt.name] = opt.default
        else:
            values[opt.name] = opt.default

    # min_size follows a small max_size: {"max_size": 1} alone must work.
    if "min_size" not in given and "max_size" in given:
        values["min_size"] = min(values["min_size"], values["max_size"])
    if "max_size" not in given and "min_size" in given:
        values["max_size"] = max(values["max_size"], values["min_size"])
    if values["max_size"] < values["min_size"] and not any(
        e.option in ("min_size", "max_size") for e in errors
    ):
        errors.append(
            OptionError(
                "max_size",
                f"DATABASES[{alias!r}]['OPTIONS']['pool']['max_size'] is "
                f"{values['max_size']!r}, smaller than min_size "
                f"({values['min_size']!r}); max_size must be >= min_size.",
            )
        )
    if errors:
        raise errors[0]
    return PoolOptions(check_given="check" in given, **values)


def psycopg_pool_kwargs(opts: PoolOptions) -> dict[str, Any]:
    """The options handed to psycopg_pool's ConnectionPool as they are."""
    return {
        o.name: getattr(opts, o.name)
        for o in OPTIONS
        if o.psycopg and o.name not in ("check", "configure", "reset", "name")
    }
