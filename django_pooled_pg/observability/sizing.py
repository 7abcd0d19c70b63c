"""How big the pools should be: ``poolstats --advise``, and the limit check at first connection.

The advice is Little's law on what the pools recorded. A process that checks
out ``λ`` connections a second and holds each ``W`` seconds on average has
``L = λ·W`` connections in use on average, and ``λ·Wq`` checkouts waiting
(``Wq``: the mean wait). Demand comes in bursts, so the advice adds three
standard deviations of a Poisson count (``3·√L``) to the mean: ``max_size =
ceil(L + 3·√L)``, at least 1. Waiting checkouts (``Lq``) are a sign the pool
was too small for the bursts, not more demand: at the same throughput a
bigger pool has the same ``L`` in use, and the waits go. ``λ`` is the process's checkouts
since its pool started, over that time: a lifetime average, so a process
that was idle most of its life understates its peak (the printed reasoning
says so; measure under representative load).

The limit is what the server takes from ordinary clients:
``max_connections - superuser_reserved_connections - reserved_connections``
(the last on PostgreSQL 16+); behind PgBouncer, its ``max_client_conn``
(read through the pool option ``pgbouncer_admin``). The deployment fits if
every process's ``max_size`` together, plus the other clients seen on the
server, stays under it.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .publisher import publish_settings, read_deployment
from .report import AliasReport, Report

if TYPE_CHECKING:
    from ..pool import DjangoPool
    from ..session import PooledConnection

logger = logging.getLogger("django_pooled_pg")

#: Headroom above the mean, in standard deviations of a Poisson count.
SIGMAS = 3


@dataclass
class Advice:
    """The advice for one alias, with the reasoning that led to it."""

    alias: str
    processes: int  # publishing stats now (or POOLED_PG_PROCESSES)
    max_size: int  # configured
    recommended_max_size: int | None  # None: nothing measured yet
    checkouts_per_second: float  # of the busiest process
    hold_mean: float
    wait_mean: float
    in_use_mean: float  # L = λ·W, busiest process
    waiting_mean: float  # Lq = λ·Wq, busiest process
    limit: int | None  # client sessions the server (or PgBouncer) takes
    limit_source: str  # what *limit* is
    other_clients: int  # sessions on the server not from this alias's pools
    processes_that_fit: int | None  # at the recommended max_size
    deployment_needs: int  # processes x configured max_size
    over_limit: bool
    reasoning: list[str] = field(default_factory=list)


def process_count(alias_report: AliasReport) -> tuple[int, str]:
    """How many processes the deployment runs: POOLED_PG_PROCESSES, else those seen."""
    from django.conf import settings

    configured = getattr(settings, "POOLED_PG_PROCESSES", None)
    if configured is not None:
        return int(configured), "POOLED_PG_PROCESSES"
    return max(alias_report.totals.processes, 1), "processes publishing stats"


def advise(a: AliasReport) -> Advice:
    """Little's law on *a*'s recorded hold and wait times and checkout rates."""
    processes, counted_from = process_count(a)
    max_size = a.config.max_size
    why: list[str] = []
    # The busiest process by mean connections in use.
    best: tuple[float, float, float, float] | None = None  # L, λ, W, Wq
    for p in a.processes:
        elapsed = p.time - p.since
        if p.since <= 0 or elapsed <= 0 or not p.counters.checkouts:
            continue
        rate = p.counters.checkouts / elapsed
        in_use = rate * p.hold.mean
        if best is None or in_use > best[0]:
            best = (in_use, rate, p.hold.mean, p.wait.mean)
    recommended: int | None = None
    rate = hold = wait = in_use = waiting = 0.0
    if best is None:
        why.append("No process has returned a connection yet: nothing to measure.")
    else:
        in_use, rate, hold, wait = best
        waiting = rate * wait
        recommended = max(1, math.ceil(in_use + SIGMAS * math.sqrt(in_use)))
        why.append(
            f"Busiest process: {rate:.1f} checkouts/s (its lifetime average), each held "
            f"{hold * 1e3:.1f} ms on average: L = λ·W = {in_use:.2f} connections in use "
            f"on average (Little's law)."
        )
        why.append(
            f"max_size = ceil(L + {SIGMAS}·√L) = ceil({in_use:.2f} + "
            f"{SIGMAS}·{math.sqrt(in_use):.2f}) = {recommended} (bursts above the mean, "
            "as Poisson arrivals have them). A process never uses more connections per "
            "alias than it runs threads: a sync worker needs 1."
        )
        if waiting > 0.005:
            why.append(
                f"Checkouts waited {wait * 1e3:.1f} ms on average (new connections opening "
                f"included): Lq = λ·Wq = {waiting:.2f} waiting on average. If that persists "
                f"with max_size >= {recommended}, the bursts are larger than Poisson's: raise "
                "max_size until the waits go."
            )
    limit, source, others = _limit(a, why)
    needs = processes * max_size
    counted = counted_from if processes != 1 else counted_from.replace("processes", "process")
    why.append(f"{processes} {counted} x max_size {max_size} = {needs} connections at most.")
    fits: int | None = None
    over = False
    if limit is not None:
        room = limit - others
        if recommended is not None:
            fits = max(room, 0) // recommended
            why.append(
                f"Room for this alias: {limit} - {others} other client sessions = {room}: "
                f"{fits} processes at max_size {recommended}."
            )
        over = needs > room
        if over:
            why.append(
                f"WARNING: {needs} > {room}: under full load the server refuses "
                '"too many clients". Lower max_size, run fewer processes, or put '
                "PgBouncer in front."
            )
    return Advice(
        alias=a.alias,
        processes=processes,
        max_size=max_size,
        recommended_max_size=recommended,
        checkouts_per_second=rate,
        hold_mean=hold,
        wait_mean=wait,
        in_use_mean=in_use,
        waiting_mean=waiting,
        limit=limit,
        limit_source=source,
        other_clients=others,
        processes_that_fit=fits,
        deployment_needs=needs,
        over_limit=over,
        reasoning=why,
    )


def _limit(a: AliasReport, why: list[str]) -> tuple[int | None, str, int]:
    """(the client sessions the server or pooler takes, what it is, other clients)."""
    if a.config.pgbouncer is not None or a.pooler is not None:
        if a.pooler is not None and a.pooler.max_client_conn is not None:
            clients = sum(p.clients_active + p.clients_waiting for p in a.pooler.pools)
            ours = a.totals.size
            others = max(clients - ours, 0)
            why.append(f"Behind PgBouncer: max_client_conn {a.pooler.max_client_conn}.")
            return a.pooler.max_client_conn, "pgbouncer max_client_conn", others
        why.append(
            "Behind PgBouncer: its max_client_conn is the limit; set the pool option "
            "pgbouncer_admin to read it."
        )
        return None, "unknown (PgBouncer without pgbouncer_admin)", 0
    v = a.server
    if v is None:
        why.append(f"The server's limit is unknown: {a.server_error or 'not read'}.")
        return None, "unknown", 0
    mine = sum(g.total for g in v.ours if g.alias == a.alias)
    others = v.client_sessions - mine - 1  # not counting poolstats' own session
    reserved = f"{v.reserved} reserved for superusers"
    if v.reserved_connections:
        reserved += f" and {v.reserved_connections} for pg_use_reserved_connections"
    why.append(
        f"Server: max_connections {v.max_connections} - {reserved} = {v.client_limit} "
        "client sessions."
    )
    return v.client_limit, "server max_connections", max(others, 0)


def advise_report(report: Report) -> list[Advice]:
    return [advise(a) for a in report.aliases]


def render_advice_table(advice: list[Advice]) -> str:
    lines: list[str] = []
    for adv in advice:
        if lines:
            lines.append("")
        rec = adv.recommended_max_size
        lines.append(
            f"{adv.alias}  recommended max_size per process: "
            f"{rec if rec is not None else 'unknown'} (now {adv.max_size})"
            + (
                f"; the server takes {adv.processes_that_fit} such processes"
                if adv.processes_that_fit is not None
                else ""
            )
        )
        lines.extend(f"  {line}" for line in adv.reasoning)
    return "\n".join(lines) + "\n"


def render_advice_json(advice: list[Advice]) -> dict[str, Any]:
    return {"schema": 1, "aliases": {adv.alias: asdict(adv) for adv in advice}}


# -- at the first connection ------------------------------------------------------

_LIMITS = """
SELECT current_setting('max_connections')::int,
       current_setting('superuser_reserved_connections')::int,
       coalesce(current_setting('reserved_connections', true), '0')::int
"""


#: Whether the stats cache is a database cache: found when the app loads
#: (prepare()), not in the hook, where importing could race a request
#: thread's import of the same module while it holds the first connection.
_stats_cache_is_database: bool | None = None


def prepare() -> None:
    """At app load, in the main thread: what the hook must not import later."""
    global _stats_cache_is_database
    try:
        _stats_cache_is_database = _stats_in_database()
    except Exception:  # a bad POOLED_PG_STATS: the system check names it
        _stats_cache_is_database = None


def _stats_in_database() -> bool:
    from django.conf import settings
    from django.core.cache.backends.db import DatabaseCache
    from django.utils.module_loading import import_string

    cache = publish_settings().cache
    if cache is None:
        return False
    try:
        backend = import_string(settings.CACHES[cache].get("BACKEND", ""))
    except ImportError:
        return False
    return isinstance(backend, type) and issubclass(backend, DatabaseCache)


def check_at_first_connection(pool: DjangoPool, conn: PooledConnection) -> None:
    """Warn once if max_size x processes can exceed what the server takes.

    Runs in psycopg_pool's configure hook, on the pool's first connection:
    only the server's limits are read here (one query on that connection).
    The processes are POOLED_PG_PROCESSES (0: no check), else those
    publishing stats for the alias, this one included, read by a thread of
    its own, so that a slow stats cache never holds the connection back.
    System checks run before any connection, so this is a log warning.
    """
    from django.conf import settings

    configured = getattr(settings, "POOLED_PG_PROCESSES", None)
    if configured is not None and int(configured) <= 0:
        return
    row = conn.execute(_LIMITS).fetchone()
    assert row is not None
    max_connections, superuser, reserved = row
    limit = max_connections - superuser - reserved
    if configured is not None:
        _warn_if_over(pool, int(configured), "POOLED_PG_PROCESSES", limit, row)
    elif _stats_cache_is_database is not False:
        # Reading it from here could wait on this very pool: only this process
        # (also when prepare() could not tell: nothing is imported here).
        _warn_if_over(pool, 1, "process (the stats cache is a database)", limit, row)
    else:
        try:
            threading.Thread(
                target=_count_then_warn,
                args=(pool, limit, row),
                name="django_pooled_pg-limit-check",
                daemon=True,
            ).start()
        except RuntimeError:
            # The interpreter is exiting (3.12+ refuses new threads then): a
            # first connection made that late has nobody to warn.
            return


def _count_then_warn(pool: DjangoPool, limit: int, row: tuple[int, int, int]) -> None:
    try:
        found = read_deployment().processes
    except Exception:  # the stats cache is down: count this process only
        found = []
    seen = {(p.host, p.pid) for p in found if p.alias == pool.alias}
    _warn_if_over(pool, len(seen | {("this", 0)}), "processes seen publishing stats", limit, row)


def _warn_if_over(
    pool: DjangoPool, processes: int, counted: str, limit: int, row: tuple[int, int, int]
) -> None:
    max_connections, superuser, reserved = row
    needs = processes * pool.max_size
    if needs > limit:
        logger.warning(
            "pool %r: max_size %d x %d %s = %d connections can exceed the %d client "
            "sessions the server takes (max_connections %d - %d reserved); under full "
            'load it will refuse "too many clients". See manage.py poolstats --advise.',
            pool.name,
            pool.max_size,
            processes,
            counted,
            needs,
            limit,
            max_connections,
            superuser + reserved,
        )
