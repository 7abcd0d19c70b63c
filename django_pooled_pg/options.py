"""Pool options: names, defaults, validation.

This module is the one place that knows the options of
``DATABASES[alias]["OPTIONS"]["pool"]``: each is a field of ``PoolOptions``
whose metadata says everything about it (type, default, accepted values,
meaning, the psycopg_pool argument it becomes, whether poolstats shows it).
Validation, the psycopg_pool arguments, the configuration poolstats shows,
the system check and both option tables (``docs/configuration.md``,
``README.md``, made by ``docs/gen_options.py``) all derive from it.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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
    """One pool option: everything about it, in one place."""

    name: str
    default: Any
    accepted: str  # said in error messages and in the docs
    doc: str  # docs/configuration.md
    summary: str  # the README's option table
    kind: str  # "int", "number", "bool", "str", "callable", "choice", "conninfo"
    bad_example: Any  # a value the docs show being refused
    default_text: str = ""  # how the docs show the default, if not the value itself
    minimum: float | None = None
    allow_none: bool = False
    #: The psycopg_pool ConnectionPool argument it is passed as, as it is;
    #: None: the engine acts on it itself (DjangoPool, the wrapper).
    psycopg_pool: str | None = None
    #: Part of the password-free configuration poolstats shows (PoolConfig).
    shown: bool = False
    #: The values a "choice" option accepts.
    choices: tuple[Any, ...] = ()

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.default is None:
            return "none"
        if isinstance(self.default, float):
            return f"`{self.default:g}` s"
        return f"`{self.default!r}`"


def _option(**spec: Any) -> Any:
    """A PoolOptions field described by an Option (its name is the field's)."""
    return field(metadata={"option": spec})


@dataclass(frozen=True)
class PoolOptions:
    """Validated options of one pool, defaults filled in, callables resolved.

    Each field is one option of ``DATABASES[alias]["OPTIONS"]["pool"]``, with
    its description (``OPTIONS``) beside it.
    """

    min_size: int = _option(
        default=1,
        default_text="`1` (at most `max_size`)",
        accepted="an integer >= 0 (and <= max_size)",
        doc="Connections kept open even when idle. One warm connection per process "
        "serves the first request after a quiet spell without a connect; "
        "psycopg_pool's default of 4 multiplies by every worker process.",
        summary="connections kept open when idle",
        kind="int",
        bad_example=-1,
        minimum=0,
        psycopg_pool="min_size",
        shown=True,
    )
    max_size: int = _option(
        default=10,
        accepted="an integer >= 1 (and >= min_size)",
        doc="Most connections this process opens for the alias. Multiply by the "
        "number of worker processes to stay under the server's max_connections.",
        summary="most connections per process for this alias",
        kind="int",
        bad_example=0,
        minimum=1,
        psycopg_pool="max_size",
        shown=True,
    )
    timeout: float = _option(
        default=10.0,
        accepted="a number of seconds > 0",
        doc="How long a checkout waits for a free connection before raising "
        "PoolExhausted. Shorter than gunicorn's 30 s worker timeout, so a "
        "starved worker reports the cause instead of being killed.",
        summary="how long a checkout waits before `PoolExhausted`",
        kind="number",
        bad_example=-1,
        minimum=0,
        psycopg_pool="timeout",
        shown=True,
    )
    max_waiting: int = _option(
        default=0,
        default_text="`0` (no limit)",
        accepted="an integer >= 0 (0: no limit)",
        doc="Requests allowed to queue for a connection; one more is rejected at "
        "once with PoolExhausted.",
        summary="requests allowed to queue; one more is rejected at once",
        kind="int",
        bad_example=-1,
        minimum=0,
        psycopg_pool="max_waiting",
        shown=True,
    )
    max_lifetime: float = _option(
        default=3600.0,
        accepted="a number of seconds > 0",
        doc="A connection older than this is closed when returned and replaced. "
        "This is the pooled equivalent of CONN_MAX_AGE.",
        summary="a connection older than this is replaced when returned",
        kind="number",
        bad_example=0,
        minimum=0,
        psycopg_pool="max_lifetime",
        shown=True,
    )
    max_idle: float = _option(
        default=600.0,
        accepted="a number of seconds > 0",
        doc="Connections above min_size unused for this long are closed.",
        summary="idle connections above `min_size` are closed after this",
        kind="number",
        bad_example=0,
        minimum=0,
        psycopg_pool="max_idle",
        shown=True,
    )
    reconnect_timeout: float = _option(
        default=300.0,
        accepted="a number of seconds > 0",
        doc="How long the pool keeps retrying, with backoff, to open a connection "
        "that failed before it gives up on that slot.",
        summary="how long a failed connection slot keeps retrying",
        kind="number",
        bad_example=0,
        minimum=0,
        psycopg_pool="reconnect_timeout",
    )
    num_workers: int = _option(
        default=2,
        accepted="an integer >= 1",
        doc="Background threads that open and close connections for the pool.",
        summary="background threads that open and close connections",
        kind="int",
        bad_example=0,
        minimum=1,
        psycopg_pool="num_workers",
    )
    name: str | None = _option(
        default=None,
        default_text="the alias",
        accepted="a string",
        doc="The pool's name in logs and thread names (default: the alias).",
        summary="the pool's name in logs",
        kind="str",
        bad_example="",
        allow_none=True,
    )
    check: Callable[[Any], None] | None = _option(
        default=None,
        default_text="psycopg_pool's check if `CONN_HEALTH_CHECKS`, else none",
        accepted="a callable taking a psycopg connection, or its dotted path",
        doc="Run on every checkout (a round trip). Default: psycopg_pool's "
        "check_connection when CONN_HEALTH_CHECKS is on, else none. The engine "
        "always detects connections the server closed, without a round trip.",
        summary="run at every checkout",
        kind="callable",
        bad_example="myapp.nowhere.check",
        allow_none=True,
    )
    configure: Callable[[Any], None] | None = _option(
        default=None,
        accepted="a callable taking a psycopg connection, or its dotted path",
        doc="Run on every new connection and again after each session reset, so "
        "what it sets survives resets. It must use only the connection it is "
        "given and leave it idle.",
        summary="run on each new connection and after each session reset",
        kind="callable",
        bad_example=42,
        allow_none=True,
    )
    reset: Callable[[Any], None] | None = _option(
        default=None,
        accepted="a callable taking a psycopg connection, or its dotted path",
        doc="Run when a connection is returned, in the returning thread, before "
        "the session reset (never queued behind connection attempts).",
        summary="run on each returned connection, before the session reset",
        kind="callable",
        bad_example=42,
        allow_none=True,
        psycopg_pool="reset",
    )
    reset_session: bool | str = _option(
        default="auto",
        accepted="'auto', True or False",
        doc="Reset the session (DISCARD ALL) when a connection is returned, so no "
        "SET, SET ROLE, temporary table, advisory lock, LISTEN, held cursor or "
        "prepared statement leaks into the next request. 'auto': only when the "
        "request may have changed the session (what it sees and what it cannot: "
        "docs/configuration.md, 'The session reset'); a request that only read "
        "and wrote rows costs nothing. "
        "True: after every request. False: never, and one request's session state "
        "reaches the next one.",
        summary="`DISCARD ALL` between requests: `'auto'` only after a request that "
        "may have changed the session",
        kind="choice",
        bad_example="yes",
        shown=True,
        choices=("auto", True, False),
    )
    fail_fast: bool = _option(
        default=True,
        accepted="True or False",
        doc="While every connection attempt since the last success has failed and "
        "the pool holds no connection, checkouts fail at once with "
        "ServerUnavailable naming the cause (as Django without a pool fails at "
        "once), instead of each waiting the full timeout; the pool keeps "
        "retrying in the background. False: checkouts wait up to timeout.",
        summary="while the server is unreachable and the pool holds no connection, "
        "checkouts fail at once with `ServerUnavailable` naming the cause, instead "
        "of waiting `timeout`",
        kind="bool",
        bad_example="yes",
        shown=True,
    )
    password_provider: Callable[[], str] | None = _option(
        default=None,
        accepted="a callable returning the password, or its dotted path",
        doc="Called for each new physical connection, for credentials that expire "
        "(cloud IAM tokens). Alternative to a callable PASSWORD.",
        summary="callable (or dotted path) returning the password, per new connection",
        kind="callable",
        bad_example="myapp.nowhere.token",
        allow_none=True,
    )
    stats: bool = _option(
        default=True,
        accepted="True or False",
        doc="Count checkouts, waits, errors and connection closes and keep the "
        "wait, hold and connect time distributions that django_pooled_pg.stats(), "
        "manage.py poolstats and the metrics show. False records only the live "
        "state (sizes, in use, waiting).",
        summary="count checkouts, waits, errors, closes and keep wait/hold/connect "
        "time distributions",
        kind="bool",
        bad_example="on",
    )
    leak_timeout: float | None = _option(
        default=None,
        default_text="none (off)",
        accepted="a number of seconds > 0, or None (off)",
        doc="A connection held longer than this is logged once at WARNING with the "
        "stack that checked it out, and again at INFO when it comes back. "
        "Recording the stack costs each checkout some microseconds.",
        summary="a checkout held longer than this is logged at WARNING with the stack that took it",
        kind="number",
        bad_example=0,
        minimum=0,
        allow_none=True,
        shown=True,
    )
    holders: bool | str = _option(
        default=True,
        accepted="True, 'stack' or False",
        doc="Charge each checkout to its holder, for manage.py poolstats --holders, "
        "the leak report and PoolExhausted: the resolved view (with "
        "django_pooled_pg.middleware.HolderMiddleware), the Celery task, the "
        "management command or a holders.holding() block; other checkouts to "
        "'(unknown)'. 'stack': those to the first caller outside Django and this "
        "package, found by walking the stack at each of them (microseconds: not "
        "the default). False: off. See docs/observability.md, 'Who holds the pool'.",
        summary="charge each checkout to its view, Celery task or command "
        "(`poolstats --holders`; `'stack'`: the caller of the others too)",
        kind="choice",
        bad_example="yes",
        shown=True,
        choices=(True, "stack", False),
    )
    log_waits_over: float | None = _option(
        default=1.0,
        accepted="a number of seconds > 0, or None (off)",
        doc="A checkout that waited longer than this for a connection is logged at "
        "WARNING on the django_pooled_pg logger, with the pool's state.",
        summary="a checkout that waited longer than this is logged at WARNING with "
        "the pool's state",
        kind="number",
        bad_example=-1,
        minimum=0,
        allow_none=True,
    )
    pgbouncer: str | None = _option(
        default=None,
        default_text="none (a server, or a pooler in session mode)",
        accepted="None, 'session' or 'transaction'",
        doc="The pool mode of a PgBouncer (or a managed pooler) between the engine "
        "and PostgreSQL. 'transaction': nothing relies on session state between "
        "transactions (no session reset is sent, chunked reads outside a transaction "
        "use client-side cursors, prepared statements stay off unless "
        "pgbouncer_prepared_statements), and settings that cannot be kept safe there "
        "(assume_role, reset_session=True, startup options PgBouncer does not track) "
        "are refused. 'session': everything works as on a server. See "
        "docs/scaling-out.md.",
        summary="the pool mode of a PgBouncer in front of the server: `'transaction'` "
        "makes the engine safe there",
        kind="choice",
        bad_example="statement",
        allow_none=True,
        shown=True,
        choices=("session", "transaction"),
    )
    pgbouncer_prepared_statements: bool = _option(
        default=False,
        accepted="True or False",
        doc="With pgbouncer='transaction': the pooler keeps prepared statements per "
        "client (PgBouncer 1.21+ with max_prepared_statements > 0, on by default "
        "from 1.24), so OPTIONS['prepare_threshold'] may turn them on.",
        summary="with `pgbouncer='transaction'`: the pooler supports prepared statements",
        kind="bool",
        bad_example="yes",
    )
    pgbouncer_admin: bool | dict[str, Any] | None = _option(
        default=None,
        default_text="none (off)",
        accepted="True (this alias's HOST, PORT, USER and PASSWORD, database "
        "'pgbouncer'), a dict of libpq parameters that override those, or None",
        doc="An admin connection to the PgBouncer in front of the server: "
        "manage.py poolstats then shows PgBouncer's own view of this alias's "
        "database (SHOW POOLS: clients active and waiting, server connections, "
        "longest wait; SHOW STATS: transactions and queries per second, average "
        "wait) in the table, JSON and Prometheus formats. The user must be in "
        "PgBouncer's admin_users or stats_users.",
        summary="an admin connection to PgBouncer: poolstats shows its pools and stats",
        kind="conninfo",
        bad_example="pgbouncer",
        allow_none=True,
    )
    server_role: str | None = _option(
        default=None,
        default_text="from `target_session_attrs` (none: `'primary'`)",
        accepted="None, 'primary', 'standby' or 'any'",
        doc="What server the alias's sessions must be on. 'primary': one that accepts "
        "writes; a session on a hot standby or a read-only server "
        "(default_transaction_read_only) is never served: a new one is refused as a "
        "failed connection attempt, one that turned read-only is discarded at checkout "
        "or return (read from what the server reported, no round trip) or at its first "
        "SQLSTATE 25006. 'standby': a hot standby; a promoted one is discarded. 'any': "
        "no check (a replica alias). Default: from OPTIONS['target_session_attrs'] "
        "('read-write' and 'primary': 'primary'; 'standby': 'standby'; 'read-only', "
        "'prefer-standby' and 'any': 'any'), 'primary' without it (a replica alias "
        "sets target_session_attrs). Not judged behind a pooler. See "
        "docs/scaling-out.md.",
        summary="what server the sessions must be on: `'primary'`, `'standby'` or "
        "`'any'`; by default from `target_session_attrs`",
        kind="choice",
        bad_example="replica",
        allow_none=True,
        shown=True,
        choices=("primary", "standby", "any"),
    )
    drain_on_role_change: bool = _option(
        default=True,
        accepted="True or False",
        doc="When one session finds its server's role changed (a primary turned "
        "standby or read-only, a standby promoted), close every connection opened "
        "before, idle ones at once and those in use when returned, instead of "
        "finding each one out by an error; the pool opens new ones (libpq's "
        "multi-host HOST and target_session_attrs choose the server). False: each "
        "is found out on its own, and max_lifetime bounds how long one lives.",
        summary="when one session sees the server's role change, replace every "
        "connection opened before",
        kind="bool",
        bad_example="yes",
        shown=True,
    )
    #: Not an option: a user's "check" (even None) overrides CONN_HEALTH_CHECKS.
    check_given: bool = False

    def psycopg_pool_kwargs(self) -> dict[str, Any]:
        """The options handed to psycopg_pool's ConnectionPool as they are."""
        return {o.psycopg_pool: getattr(self, o.name) for o in OPTIONS if o.psycopg_pool}

    def shown(self) -> dict[str, Any]:
        """The options poolstats shows (no credentials), by name."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if o.shown}


#: Every option, in the order of the docs.
OPTIONS: tuple[Option, ...] = tuple(
    Option(name=f.name, **f.metadata["option"]) for f in fields(PoolOptions) if f.metadata
)

BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, BY_NAME, n=1)
    if close:
        return f" Did you mean '{close[0]}'?"
    return ""


#: Where a pool option is given: OPTIONS["pool"][name], or a flat
#: OPTIONS["pool_<name>"] key (what DATABASE_URL parsers produce).
FLAT_PREFIX = "pool_"


def _path(alias: str, name: str, flat: bool) -> str:
    if flat:
        return f"DATABASES[{alias!r}]['OPTIONS']['{FLAT_PREFIX}{name}']"
    return f"DATABASES[{alias!r}]['OPTIONS']['pool']['{name}']"


def _value_error(alias: str, opt: Option, value: Any, flat: bool = False) -> OptionError:
    return OptionError(
        opt.name,
        f"{_path(alias, opt.name, flat)} is {value!r}; it must be {opt.accepted}.",
    )


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_INT = re.compile(r"[+-]?\d+")


def from_url(opt: Option, value: Any) -> Any:
    """A flat key's value as a URL parser left it, in the option's type.

    dj-database-url turns digit-only strings into ints and true/false into
    bools; django-environ only the digits: floats, negatives, booleans and
    ``none`` arrive as strings (and 0/1 as ints). Anything else is left for
    the option's own check to refuse.
    """
    takes_bool = opt.kind in ("bool", "conninfo") or (opt.kind == "choice" and True in opt.choices)
    if takes_bool and type(value) is int and value in (0, 1):
        value = bool(value)
    if opt.kind == "conninfo" and value is False:
        return None  # off
    if opt.kind == "str" and isinstance(value, (int, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if opt.allow_none and text == "none":
        return None
    if takes_bool:
        if text in _TRUE:
            return True
        if text in _FALSE:
            return None if opt.kind == "conninfo" else False
    if opt.kind == "int" and _INT.fullmatch(text):
        return int(text)
    if opt.kind == "number":
        try:
            return float(text)
        except ValueError:
            return value
    return value


def _coerce(alias: str, opt: Option, value: Any, flat: bool = False) -> Any:
    try:
        return _coerce_value(alias, opt, value)
    except OptionError as exc:
        if not flat:
            raise
        # The same message, naming the key the user wrote.
        raise OptionError(
            opt.name, str(exc).replace(_path(alias, opt.name, False), _path(alias, opt.name, True))
        ) from None


def _coerce_value(alias: str, opt: Option, value: Any) -> Any:
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
    if opt.kind == "choice":
        # By type too: 1 == True, but 1 is not a choice of reset_session.
        if any(type(value) is type(c) and value == c for c in opt.choices):
            return value
        raise _value_error(alias, opt, value)
    if opt.kind == "conninfo":
        if value is True:
            return value
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
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


def pool_switch(value: Any) -> Any:
    """``OPTIONS["pool"]`` as a URL parser may give it (``?pool=false``): the
    strings ``'false'``/``'true'`` (any case) and 0/1 are the bools; anything
    else as it is, for parse() to refuse."""
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def collect_errors(
    alias: str, raw: Any, db_options: Mapping[str, Any] | None = None
) -> list[OptionError]:
    """Every problem with ``OPTIONS["pool"]`` of *alias*, in a stable order."""
    errors: list[OptionError] = []
    with contextlib.suppress(OptionError):
        parse(alias, raw, collect=errors, db_options=db_options)
    return errors


def parse(
    alias: str,
    raw: Any,
    collect: list[OptionError] | None = None,
    db_options: Mapping[str, Any] | None = None,
    also_known: frozenset[str] = frozenset(),
) -> PoolOptions:
    """Validate ``OPTIONS["pool"]`` (absent, True or a dict) into PoolOptions.

    *db_options* is the alias's whole ``OPTIONS``, for what the pool options
    forbid there (``pgbouncer='transaction'``). Raises the first OptionError,
    or with *collect* records them all and raises the first at the end. The
    user's dict is never mutated.
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

    db_options = db_options or {}
    flat_given = {
        key[len(FLAT_PREFIX) :]: value
        for key, value in db_options.items()
        if isinstance(key, str) and key.startswith(FLAT_PREFIX)
    }
    for name in flat_given:
        if name not in BY_NAME:
            close = difflib.get_close_matches(name, BY_NAME, n=1)
            suggest = f" Did you mean '{FLAT_PREFIX}{close[0]}'?" if close else ""
            errors.append(
                OptionError(
                    FLAT_PREFIX + name,
                    f"DATABASES[{alias!r}]['OPTIONS'] has an unknown pool option "
                    f"'{FLAT_PREFIX}{name}'.{suggest} Flat 'pool_<option>' keys are pool "
                    f"options; valid options: {', '.join(sorted(BY_NAME))}.",
                )
            )
        elif name in given:
            errors.append(
                OptionError(
                    name,
                    f"{_path(alias, name, True)} and {_path(alias, name, False)} both set "
                    f"the pool option {name!r}; give it once.",
                )
            )
    errors.extend(libpq_errors(alias, db_options, also_known))

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
        flat = opt.name in flat_given and opt.name not in given
        if opt.name in given or flat:
            value = from_url(opt, flat_given[opt.name]) if flat else given[opt.name]
            try:
                values[opt.name] = _coerce(alias, opt, value, flat)
            except OptionError as exc:
                errors.append(exc)
                values[opt.name] = opt.default
        else:
            values[opt.name] = opt.default
    flat_names = {name for name in flat_given if name in BY_NAME and name not in given}
    given = {**{name: flat_given[name] for name in flat_names}, **given}

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
                f"{_path(alias, 'max_size', 'max_size' in flat_names)} is "
                f"{values['max_size']!r}, smaller than min_size "
                f"({values['min_size']!r}); max_size must be >= min_size.",
            )
        )
    target = db_options.get("target_session_attrs")
    role = values["server_role"]
    if role in _CONTRADICTS and target in _CONTRADICTS[role]:
        errors.append(
            OptionError(
                "server_role",
                f"{_path(alias, 'server_role', 'server_role' in flat_names)} is {role!r}, but "
                f"DATABASES[{alias!r}]['OPTIONS']['target_session_attrs'] is {target!r}: "
                "libpq would connect only to servers the pool then refuses. Remove "
                "server_role (it follows target_session_attrs) or make them agree.",
            )
        )
    if values["pgbouncer"] == "transaction":
        if "reset_session" not in given:
            values["reset_session"] = False  # it would reset another client's server session
        errors.extend(_transaction_pooling_errors(alias, values, db_options, flat_names))
    if errors:
        raise errors[0]
    return PoolOptions(check_given="check" in given, **values)


#: OPTIONS keys that are not libpq's: psycopg's connect() arguments and
#: Django's own (its postgresql backend takes them out before connecting).
NOT_LIBPQ = frozenset(
    {
        "autocommit",
        "prepare_threshold",
        "context",
        "row_factory",
        "cursor_factory",
        "pool",
        "assume_role",
        "isolation_level",
        "server_side_binding",
    }
)


def libpq_keywords() -> frozenset[str]:
    """The connection parameters the libpq psycopg runs on knows (PQconndefaults)."""
    global _libpq_keywords
    if _libpq_keywords is None:
        from psycopg import pq

        _libpq_keywords = frozenset(d.keyword.decode() for d in pq.Conninfo.get_defaults())
    return _libpq_keywords


_libpq_keywords: frozenset[str] | None = None


def libpq_errors(
    alias: str, db_options: Mapping[str, Any], also_known: frozenset[str] = frozenset()
) -> list[OptionError]:
    """OPTIONS keys nothing takes: libpq would refuse every connection attempt
    ("invalid connection option"), which the pool would report as an outage.

    A key set to None is left out of the connection string by psycopg, and
    *also_known* are keys a subclass of the wrapper takes itself
    (``DatabaseWrapper.non_libpq_options``).
    """
    known = libpq_keywords() | NOT_LIBPQ | also_known
    errors = []
    for key, value in db_options.items():
        if not isinstance(key, str) or key.startswith(FLAT_PREFIX) or key in known or value is None:
            continue
        close = difflib.get_close_matches(key, known | {FLAT_PREFIX + n for n in BY_NAME}, n=1)
        errors.append(
            OptionError(
                key,
                f"DATABASES[{alias!r}]['OPTIONS'] has {key!r}, which is not a connection "
                "parameter libpq knows, a psycopg or Django option, or a pool option"
                + (f". Did you mean {close[0]!r}?" if close else ".")
                + " Pool options go in OPTIONS['pool'] or as flat 'pool_<option>' keys.",
            )
        )
    return errors


#: target_session_attrs that contradict a server_role (libpq connects only
#: to servers of the other kind).
_CONTRADICTS = {
    "primary": ("standby", "read-only", "prefer-standby"),
    "standby": ("read-write", "primary"),
}

#: Parameters PgBouncer keeps per client and sets again on whichever server
#: connection it hands the client (its "tracked" parameters, 1.18 to 1.24).
PGBOUNCER_TRACKED = (
    "client_encoding",
    "DateStyle",
    "TimeZone",
    "standard_conforming_strings",
    "application_name",
)

_SETTING = re.compile(r"(?:-c\s*|--)([A-Za-z_][\w.]*)=")


def startup_settings_of(options: str) -> list[str]:
    """The names a libpq ``options`` string sets (``-c name=value``, ``--name=value``)."""
    return _SETTING.findall(options)


def _transaction_pooling_errors(
    alias: str,
    values: dict[str, Any],
    db_options: Mapping[str, Any],
    flat_names: set[str] | frozenset[str] = frozenset(),
) -> list[OptionError]:
    """What cannot be kept safe through PgBouncer in transaction mode, and what to do."""
    where = f"DATABASES[{alias!r}]['OPTIONS']"
    mode = f"{_path(alias, 'pgbouncer', 'pgbouncer' in flat_names)} is 'transaction'"
    errors = []
    if values["reset_session"]:
        errors.append(
            OptionError(
                "reset_session",
                f"{_path(alias, 'reset_session', 'reset_session' in flat_names)} is "
                f"{values['reset_session']!r}, but "
                f"{mode}: PgBouncer hands "
                "each transaction to any server connection, so a session reset would "
                "reset another client's server connection, not this one. Remove "
                "reset_session (no reset is sent in transaction mode), or run PgBouncer "
                "in session mode.",
            )
        )
    if role := db_options.get("assume_role"):
        errors.append(
            OptionError(
                "assume_role",
                f"{where}['assume_role'] is {role!r}, but {mode}: a SET ROLE stays on "
                "PgBouncer's server connection and reaches other clients' transactions. "
                f"Make it the login role's default instead (ALTER ROLE <login> SET role "
                f"= '{role}', which survives DISCARD ALL) and remove assume_role.",
            )
        )
    tracked = {name.lower() for name in PGBOUNCER_TRACKED}
    untracked = [
        name
        for name in startup_settings_of(str(db_options.get("options") or ""))
        if name.lower() not in tracked
    ]
    if untracked:
        errors.append(
            OptionError(
                "options",
                f"{where}['options'] sets {', '.join(untracked)}, but {mode}: PgBouncer "
                f"keeps only {', '.join(PGBOUNCER_TRACKED)} per client, so the setting "
                "would be lost or reach other clients' transactions. Set it on the server "
                f"(ALTER ROLE <login> SET {untracked[0]} = ..., or ALTER DATABASE ... SET) "
                "and remove it from OPTIONS['options'].",
            )
        )
    threshold = db_options.get("prepare_threshold")
    if threshold is not None and not values["pgbouncer_prepared_statements"]:
        errors.append(
            OptionError(
                "prepare_threshold",
                f"{where}['prepare_threshold'] is {threshold!r}, but {mode}: prepared "
                "statements through PgBouncer in transaction mode need PgBouncer 1.21 or "
                "newer with max_prepared_statements > 0 (on by default from 1.24). If "
                "yours has it, set OPTIONS['pool']['pgbouncer_prepared_statements'] = "
                "True; otherwise remove prepare_threshold.",
            )
        )
    return errors
