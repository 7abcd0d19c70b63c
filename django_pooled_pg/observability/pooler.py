"""PgBouncer's own view, read from its admin console (``SHOW POOLS``, ``SHOW STATS``).

Shown by poolstats beside the client pools when the alias's pool option
``pgbouncer_admin`` names an admin connection: per database and user, the
clients PgBouncer serves and makes wait, its server connections, the
longest wait, and the per-second averages of its last stats period.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PoolerPool:
    """One PgBouncer pool (database, user): ``SHOW POOLS``."""

    database: str
    user: str
    mode: str
    clients_active: int  # cl_active: linked to a server connection, or idle
    clients_waiting: int  # cl_waiting: waiting for a server connection
    servers_active: int  # sv_active: linked to a client
    servers_idle: int  # sv_idle: ready for a client
    servers_other: int  # sv_used + sv_tested + sv_login
    max_wait: float  # seconds the oldest waiting client has waited


@dataclass
class PoolerStats:
    """Per-second averages of PgBouncer's last stats period: ``SHOW STATS``."""

    database: str
    transactions_per_second: float
    queries_per_second: float
    avg_transaction_time: float  # seconds
    avg_query_time: float  # seconds
    avg_wait_time: float  # seconds a client waited for a server connection


@dataclass
class PoolerView:
    version: str
    pools: list[PoolerPool] = field(default_factory=list)
    stats: list[PoolerStats] = field(default_factory=list)
    max_client_conn: int | None = None  # SHOW CONFIG: the clients PgBouncer accepts


def read_pooler_view(cursor: Any, dbname: str) -> PoolerView:
    """Read PgBouncer's view of *dbname* with a cursor on its admin console (rows as dicts)."""
    cursor.execute("SHOW VERSION")
    version = str(next(iter(cursor.fetchone().values())))
    view = PoolerView(version=version)
    cursor.execute("SHOW POOLS")
    for row in cursor.fetchall():
        if row["database"] != dbname:
            continue
        view.pools.append(
            PoolerPool(
                database=row["database"],
                user=row["user"],
                mode=row.get("pool_mode") or "",
                clients_active=int(row["cl_active"]),
                clients_waiting=int(row["cl_waiting"]),
                servers_active=int(row["sv_active"]),
                servers_idle=int(row["sv_idle"]),
                servers_other=sum(
                    int(row.get(k) or 0) for k in ("sv_used", "sv_tested", "sv_login")
                ),
                max_wait=int(row["maxwait"]) + int(row.get("maxwait_us") or 0) / 1e6,
            )
        )
    cursor.execute("SHOW CONFIG")
    for row in cursor.fetchall():
        if row.get("key") == "max_client_conn":
            view.max_client_conn = int(row["value"])
    cursor.execute("SHOW STATS")
    for row in cursor.fetchall():
        if row["database"] != dbname:
            continue
        view.stats.append(
            PoolerStats(
                database=row["database"],
                transactions_per_second=float(row["avg_xact_count"]),
                queries_per_second=float(row["avg_query_count"]),
                avg_transaction_time=int(row["avg_xact_time"]) / 1e6,
                avg_query_time=int(row["avg_query_time"]) / 1e6,
                avg_wait_time=int(row["avg_wait_time"]) / 1e6,
            )
        )
    return view
