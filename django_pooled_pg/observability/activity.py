"""The server's view: naming our sessions, and reading pg_stat_activity.

Every pooled connection carries ``application_name`` =
``"<user's name> dpp:<host>:<pid>:<alias>"``, so the server (and poolstats)
can tell which process and alias a session belongs to. PostgreSQL keeps 63
bytes of it: the user's part is shortened first, then the host is replaced
by ``#`` and 8 hex digits of its SHA-1, so pid and alias always survive.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

MARK = "dpp:"
#: PostgreSQL's NAMEDATALEN - 1: longer application names are cut.
MAX_BYTES = 63
_PATTERN = re.compile(r"(?:^|\s)dpp:(?P<host>[^:\s]*):(?P<pid>\d+):(?P<alias>\S+)$")


def host_hash(host: str) -> str:
    return "#" + hashlib.sha1(host.encode()).hexdigest()[:8]


def _cut(text: str, max_bytes: int) -> str:
    """*text* cut to at most *max_bytes* of UTF-8, never inside a character."""
    return text.encode()[:max_bytes].decode(errors="ignore")


def application_name(user_name: str | None, host: str, pid: int, alias: str) -> str:
    """The application_name of a pooled session (see the module doc)."""
    alias = alias.replace(" ", "_")
    tail = f"{MARK}{host}:{pid}:{alias}"
    if len(tail.encode()) > MAX_BYTES:
        tail = f"{MARK}{host_hash(host)}:{pid}:{alias}"
    tail = _cut(tail, MAX_BYTES)
    prefix = (user_name or "").strip()
    room = MAX_BYTES - len(tail.encode()) - 1
    if prefix and room > 0:
        return f"{_cut(prefix, room).rstrip()} {tail}"
    return tail


def parse_application_name(name: str) -> tuple[str, int, str] | None:
    """(host or its hash, pid, alias) of one of our sessions, or None."""
    if not name or MARK not in name:
        return None
    m = _PATTERN.search(name)
    if m is None:
        return None
    return m["host"], int(m["pid"]), m["alias"]


@dataclass
class ProcessSessions:
    """One process's sessions for one alias, as the server sees them."""

    host: str
    pid: int
    alias: str
    active: int = 0
    idle: int = 0
    idle_in_transaction: int = 0
    other: int = 0  # fastpath, disabled, starting
    oldest_transaction: float = 0.0  # seconds since the oldest open transaction began

    @property
    def total(self) -> int:
        return self.active + self.idle + self.idle_in_transaction + self.other


@dataclass
class ServerView:
    """pg_stat_activity, grouped: ours by process, everyone else counted."""

    max_connections: int
    reserved: int  # superuser_reserved_connections
    client_sessions: int  # every client backend on the server
    ours: list[ProcessSessions] = field(default_factory=list)
    others: int = 0  # client sessions not from a django_pooled_pg pool
    others_by_application: dict[str, int] = field(default_factory=dict)
    role: str = "primary"  # or "standby" (in recovery)
    #: A standby's replay lag in seconds: 0 when it streams and has replayed
    #: all it received, else the age of the last transaction it replayed
    #: (None: a primary, or nothing replayed yet).
    replay_lag: float | None = None
    #: reserved_connections (PostgreSQL 16+: for roles with pg_use_reserved_connections).
    reserved_connections: int = 0

    @property
    def client_limit(self) -> int:
        """Sessions the server takes from ordinary clients."""
        return self.max_connections - self.reserved - self.reserved_connections


_QUERY = """
SELECT application_name, state,
       EXTRACT(EPOCH FROM (now() - xact_start))::float8
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
"""


# Replay lag as monitoring tools compute it: a standby that streams and has
# replayed all it received has no lag, even when the primary has written
# nothing for a while; one that does not stream (its primary gone, or the
# status not visible to this user) is as old as its last replayed transaction.
_SETTINGS_AND_ROLE = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int,
       pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()
                 AND EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')
            THEN 0
            ELSE EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp()))::float8
       END
"""


def read_server_view(cursor: Any) -> ServerView:
    """Read and group pg_stat_activity with *cursor* (a DB-API cursor)."""
    cursor.execute(_SETTINGS_AND_ROLE)
    max_connections, reserved, reserved_connections, in_recovery, lag = cursor.fetchone()
    cursor.execute(_QUERY)
    rows = cursor.fetchall()
    view = ServerView(
        max_connections=max_connections,
        reserved=reserved,
        client_sessions=len(rows) + 1,
        role="standby" if in_recovery else "primary",
        replay_lag=None if lag is None else max(0.0, lag),
        reserved_connections=reserved_connections,
    )
    groups: dict[tuple[str, int, str], ProcessSessions] = {}
    view.others = 1  # the session reading this
    view.others_by_application["poolstats"] = 1
    for app, state, xact_age in rows:
        parsed = parse_application_name(app or "")
        if parsed is None:
            view.others += 1
            key = app or "(no application_name)"
            view.others_by_application[key] = view.others_by_application.get(key, 0) + 1
            continue
        g = groups.get(parsed)
        if g is None:
            g = groups[parsed] = ProcessSessions(*parsed)
        if state == "active":
            g.active += 1
        elif state == "idle":
            g.idle += 1
        elif state in ("idle in transaction", "idle in transaction (aborted)"):
            g.idle_in_transaction += 1
        else:
            g.other += 1
        if xact_age is not None:
            g.oldest_transaction = max(g.oldest_transaction, xact_age)
    view.ours = sorted(groups.values(), key=lambda g: (g.alias, g.host, g.pid))
    return view
