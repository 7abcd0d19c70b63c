"""The session settings the engine itself needs, and how they reach the server.

Django's time zone (``TIME_ZONE``/``USE_TZ``) and ``assume_role`` are sent in
the startup packet's ``options`` (``-c TimeZone=UTC -c role=app``): there
they cost no statement, and as session defaults they survive ``DISCARD
ALL``. A server-side pooler may refuse them. PgBouncer before 1.20 refuses
the ``options`` parameter altogether ("unsupported startup parameter:
options"); from 1.20 it accepts the settings it tracks and refuses the
others ("unsupported startup parameter in options: role"), as Neon's proxy
does.

``StartupSettings`` learns from such a refusal: the refused settings leave
the startup packet and are set with SQL instead, once after connecting and
again in every session reset (the reset query then ends with the same
``SET`` statements, in the same round trip). What was learned holds for the
pool's life. The user's own ``OPTIONS["options"]`` cannot be moved (the
engine does not know what they are for): their refusal is a configuration
error that says so and names the fix.
"""

from __future__ import annotations

import logging
import re
import threading

logger = logging.getLogger("django_pooled_pg")

# PgBouncer < 1.20: "FATAL:  unsupported startup parameter: options";
# PgBouncer >= 1.20 and Neon's proxy: "unsupported startup parameter in options: role".
_REFUSED = re.compile(
    r"unsupported startup parameter(?P<in_options> in options)?:\s*(?P<name>[A-Za-z_][\w.]*)"
)


def libpq_options_escape(value: str) -> str:
    """A value for libpq's ``options``, where a backslash escapes a space or a backslash."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def sql_literal(value: str) -> str:
    """A string literal (standard_conforming_strings is on from PostgreSQL 9.1)."""
    return "'" + value.replace("'", "''") + "'"


class StartupOptionsRefused(Exception):
    """The server, or a pooler in front of it, refused the user's own startup options."""


class StartupSettings:
    """The engine's settings of one pool: in the startup packet, or set by SQL."""

    def __init__(self, alias: str, engine: dict[str, str], user_options: str = "") -> None:
        self.alias = alias
        #: Setting name (as PostgreSQL spells it) -> value: TimeZone, role.
        self.engine = dict(engine)
        self.user_options = user_options.strip()
        self._by_sql: set[str] = set()  # engine settings moved out of the startup packet
        self._lock = threading.Lock()
        #: ``SET`` statements the reset and a new connection run (b"": none);
        #: an attribute, read at every return.
        self.sql = b""
        self._restore_all = False  # restore every setting by SQL (behind a pooler)
        self._defaults: set[str] = set()  # moved settings the server has by default
        #: How many refusals were learned: an attempt made before the last
        #: one may have been refused for what is now set by SQL.
        self.learned = 0

    @property
    def by_sql(self) -> frozenset[str]:
        """The engine settings set with SQL after connecting (after a refusal)."""
        return frozenset(self._by_sql)

    def options(self) -> str:
        """The ``options`` connection parameter for the next attempt ("" for none)."""
        parts = [self.user_options] if self.user_options else []
        parts += [
            f"-c {name}={libpq_options_escape(value)}"
            for name, value in self.engine.items()
            if name not in self._by_sql
        ]
        return " ".join(parts)

    def restore_all_by_sql(self) -> None:
        """Also restore the settings still in the startup packet by SQL in every reset.

        Behind a pooler, ``DISCARD ALL`` returns a setting to the default of
        whichever server connection the pooler picked, not to this client's
        startup value, and PgBouncer then tracks that default as the client's.
        (Settings moved out of the packet that the server has by default need
        nothing: see server_default.)
        """
        with self._lock:
            self._restore_all = True
            self._update_sql()

    def server_default(self, name: str, value: str | None) -> None:
        """The server reported *value* for *name* on a connection made without it.

        A setting the server already has by default needs no SET, after
        connecting or after a reset (``RESET ALL`` returns to that default),
        as Django's own backend sets the time zone only when it differs.
        """
        with self._lock:
            if name not in self._by_sql or value != self.engine.get(name):
                return
            if name not in self._defaults:
                self._defaults.add(name)
                self._update_sql()

    def _update_sql(self) -> None:
        names = self._by_sql - self._defaults
        if self._restore_all:  # those still in the startup packet, too
            names |= set(self.engine) - self._by_sql
        self.sql = "; ".join(
            f"SET {n} TO {sql_literal(v)}" for n, v in self.engine.items() if n in names
        ).encode()

    def learn(self, exc: BaseException) -> bool:
        """Whether *exc* refused startup settings the engine can set with SQL instead.

        True: they are moved, and a new attempt will succeed where this one
        failed. Raises StartupOptionsRefused when what was refused is the
        user's own ``OPTIONS["options"]``.
        """
        m = _REFUSED.search(str(exc))
        if m is None:
            return False
        name = m["name"]
        with self._lock:
            if m["in_options"]:
                moved = [n for n in self.engine if n.lower() == name.lower()]
            elif name.lower() == "options":
                moved = list(self.engine)
            else:
                return False  # another parameter (not ours): an ordinary failure
            moved = [n for n in moved if n not in self._by_sql]
            if not moved:
                if self.user_options:
                    raise StartupOptionsRefused(self._user_options_refused(name))
                return False
            self._by_sql.update(moved)
            self.learned += 1
            self._update_sql()
        logger.warning(
            "database alias %r: the server or a pooler in front of it refused %s in the "
            "startup packet (%s); the engine sets %s after connecting and in each "
            "session reset instead",
            self.alias,
            "the options parameter" if not m["in_options"] else f"the setting {name}",
            " ".join(str(exc).split()),
            ", ".join(moved),
        )
        return True

    def _user_options_refused(self, name: str) -> str:
        what = "any startup options" if name.lower() == "options" else f"the setting {name} in them"
        return (
            f"DATABASES[{self.alias!r}]['OPTIONS']['options'] ({self.user_options!r}) was "
            f"refused: the server, or a pooler in front of it, does not accept {what} "
            "(PgBouncer before 1.20 accepts no startup options; from 1.20 only the "
            "settings it tracks, such as TimeZone). Remove it from OPTIONS and set "
            "these with ALTER ROLE ... SET or ALTER DATABASE ... SET on the server, or "
            "in a pool 'configure' callback."
        )
