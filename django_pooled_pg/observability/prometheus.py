"""Prometheus metrics of the pools (the optional ``[prometheus]`` extra).

``PoolCollector`` reports every process of the deployment, each with
``host`` and ``pid`` labels, read through the stats publisher (see
``publisher``): under a multi-worker server a scrape reaches one random
worker, and that worker reports them all. prometheus_client's multiprocess
mode is not used: it runs no custom collector.

The collector joins prometheus_client's default registry when the app is
ready (so an existing ``/metrics`` shows the pools); ``metrics_view`` serves
them on its own, to staff users or to a request bearing
``settings.POOLED_PG_METRICS_TOKEN``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .api import pooled_aliases
from .records import BUCKETS, Distribution, HolderStats, PoolStats
from .report import Report, build_report, top_holders

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponse

PREFIX = "django_pooled_pg_"
LABELS = ("alias", "host", "pid")

_GAUGES: tuple[tuple[str, str, Callable[[PoolStats], float]], ...] = (
    ("pool_min_size", "min_size option of the pool.", lambda s: s.config.min_size),
    ("pool_max_size", "max_size option of the pool.", lambda s: s.config.max_size),
    ("pool_size", "Connections open or being opened.", lambda s: s.live.size),
    ("connections_idle", "Connections idle in the pool.", lambda s: s.live.idle),
    ("connections_in_use", "Connections checked out.", lambda s: s.live.in_use),
    ("requests_waiting", "Checkouts queued for a connection.", lambda s: s.live.waiting),
    (
        "oldest_checkout_seconds",
        "How long the longest-held connection has been checked out.",
        lambda s: s.live.oldest_checkout,
    ),
    (
        "longest_wait_seconds",
        "How long the longest-waiting checkout has waited.",
        lambda s: s.live.longest_wait,
    ),
)

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("checkouts", "checkouts", "Connections checked out."),
    ("checkouts_waited", "checkouts_waited", "Checkouts that found no idle connection."),
    ("checkout_timeouts", "timeouts", "Checkouts that timed out (PoolExhausted)."),
    ("checkouts_rejected", "rejected", "Checkouts rejected: the queue was full."),
    ("checkout_errors", "errors", "Checkouts failed otherwise (ServerUnavailable)."),
    ("connections_opened", "opened", "Connections opened."),
    ("connection_errors", "connect_errors", "Failed connection attempts."),
    ("connections_lost", "lost", "Connections found closed when returned."),
    ("connections_reclaimed", "reclaimed", "Connections reclaimed from ended threads."),
    ("session_resets", "resets", "Session resets (DISCARD ALL) sent."),
    (
        "session_resets_skipped",
        "resets_skipped",
        "Returned connections that needed no reset (reset_session='auto').",
    ),
    ("leaks", "leaks", "Checkouts held longer than leak_timeout."),
)

_HISTOGRAMS: tuple[tuple[str, str, Callable[[PoolStats], Distribution]], ...] = (
    ("checkout_wait_seconds", "Time from asking for a connection to holding it.", lambda s: s.wait),
    ("connection_hold_seconds", "Time a connection was checked out.", lambda s: s.hold),
    ("connection_open_seconds", "Time to open a new connection.", lambda s: s.connect),
)


def families(processes: list[PoolStats]) -> Iterator[Metric]:
    """Metric families for *processes* (one PoolStats per process and alias)."""

    def labels(s: PoolStats) -> list[str]:
        return [s.alias, s.host, str(s.pid)]

    for name, doc, get in _GAUGES:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=LABELS)
        for s in processes:
            gauge.add_metric(labels(s), float(get(s)))
        yield gauge
    for name, attr, doc in _COUNTERS:
        counter = CounterMetricFamily(PREFIX + name, doc, labels=LABELS)
        for s in processes:
            counter.add_metric(labels(s), float(getattr(s.counters, attr)))
        yield counter
    closed = CounterMetricFamily(
        PREFIX + "connections_closed", "Connections closed, by reason.", labels=(*LABELS, "reason")
    )
    for s in processes:
        for reason, n in s.closed_by_reason.items():
            closed.add_metric([*labels(s), reason], float(n))
    yield closed
    for name, doc, dist in _HISTOGRAMS:
        hist = HistogramMetricFamily(PREFIX + name, doc, labels=LABELS)
        for s in processes:
            d = dist(s)
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for bound, count in zip((*BUCKETS, float("inf")), d.buckets, strict=False):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            hist.add_metric(labels(s), buckets, sum_value=d.sum)
        yield hist


_POOLER_GAUGES: tuple[tuple[str, str, str], ...] = (
    (
        "pgbouncer_clients_active",
        "clients_active",
        "PgBouncer: clients linked to a server connection or idle.",
    ),
    (
        "pgbouncer_clients_waiting",
        "clients_waiting",
        "PgBouncer: clients waiting for a server connection.",
    ),
    (
        "pgbouncer_servers_active",
        "servers_active",
        "PgBouncer: server connections linked to a client.",
    ),
    ("pgbouncer_servers_idle", "servers_idle", "PgBouncer: server connections ready for a client."),
    (
        "pgbouncer_max_wait_seconds",
        "max_wait",
        "PgBouncer: how long the oldest waiting client has waited.",
    ),
)
_POOLER_RATES: tuple[tuple[str, str, str], ...] = (
    (
        "pgbouncer_transactions_per_second",
        "transactions_per_second",
        "PgBouncer: transactions per second (last stats period).",
    ),
    (
        "pgbouncer_queries_per_second",
        "queries_per_second",
        "PgBouncer: queries per second (last stats period).",
    ),
    (
        "pgbouncer_avg_wait_seconds",
        "avg_wait_time",
        "PgBouncer: average wait for a server connection (last stats period).",
    ),
)


def pooler_families(report: Report) -> Iterator[Metric]:
    """PgBouncer's view of each alias that has one (pool option pgbouncer_admin)."""
    views = [(a.alias, a.pooler) for a in report.aliases if a.pooler is not None]
    if not views:
        return
    for name, attr, doc in _POOLER_GAUGES:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=("alias", "database", "user"))
        for alias, view in views:
            for p in view.pools:
                gauge.add_metric([alias, p.database, p.user], getattr(p, attr))
        yield gauge
    for name, attr, doc in _POOLER_RATES:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=("alias", "database"))
        for alias, view in views:
            for st in view.stats:
                gauge.add_metric([alias, st.database], getattr(st, attr))
        yield gauge


def server_families(report: Report) -> Iterator[Metric]:
    """The server each alias reaches (poolstats reads it; a scrape does not query servers)."""
    views = [(a.alias, a.server) for a in report.aliases if a.server is not None]
    if not views:
        return
    standby = GaugeMetricFamily(
        PREFIX + "server_standby",
        "1 if the alias's server is a standby (in recovery), 0 if a primary.",
        labels=("alias",),
    )
    lag = GaugeMetricFamily(
        PREFIX + "server_replay_lag_seconds",
        "A standby's replay lag (0: it has replayed all it received).",
        labels=("alias",),
    )
    for alias, view in views:
        standby.add_metric([alias], 1 if view.role == "standby" else 0)
        if view.replay_lag is not None:
            lag.add_metric([alias], view.replay_lag)
    yield standby
    yield lag


#: Holders labelled per alias (by hold time; the rest are one "(other)" series).
HOLDER_LABELS = 20

# Gauges, not counters: each sums the processes running now, so it drops when
# one exits (and a holder can move into "(other)"); a counter must never drop.
_HOLDER_GAUGES: tuple[tuple[str, str, Callable[[HolderStats], float]], ...] = (
    (
        "holder_checkouts",
        "Checkouts by holder, the processes running now together.",
        lambda h: h.checkouts,
    ),
    (
        "holder_hold_seconds",
        "Seconds connections were held, by holder, the processes running now together.",
        lambda h: h.hold.sum,
    ),
    (
        "holder_wait_caused_seconds",
        "Seconds checkouts queued while the holder held connections of a full pool (its share).",
        lambda h: h.wait_caused,
    ),
    ("holder_leaks", "Checkouts held longer than leak_timeout, by holder.", lambda h: h.leaks),
)


def holder_families(report: Report) -> Iterator[Metric]:
    """Per alias and holder (every process together), bounded to HOLDER_LABELS + 1 series."""
    ranked = [
        (a.alias, top_holders(a.totals.holders, "hold", HOLDER_LABELS)) for a in report.aliases
    ]
    for name, doc, get in _HOLDER_GAUGES:
        gauge = GaugeMetricFamily(PREFIX + name, doc, labels=("alias", "holder"))
        for alias, holders in ranked:
            for h in holders:
                gauge.add_metric([alias, h.holder], float(get(h)))
        yield gauge


class ReportCollector(Collector):
    """The processes of a poolstats report (what ``--format prometheus`` prints)."""

    def __init__(self, get_report: Callable[[], Report]) -> None:
        self.get_report = get_report

    def collect(self) -> Iterator[Metric]:
        report = self.get_report()
        yield from families([p for a in report.aliases for p in a.processes])
        yield from holder_families(report)
        yield from pooler_families(report)
        yield from server_families(report)


class PoolCollector(Collector):
    """Every process's pools, read through the stats publisher at each scrape."""

    def collect(self) -> Iterator[Metric]:
        report = build_report(pooled_aliases(), deployment=True, server=False)
        yield from families([p for a in report.aliases for p in a.processes])
        yield from holder_families(report)
        yield from pooler_families(report)

    def describe(self) -> Iterator[Metric]:
        return iter(())  # no collect() at registration: settings may not be ready


_registered: PoolCollector | None = None


def register_default() -> PoolCollector:
    """Add the collector to prometheus_client's default registry (once)."""
    global _registered
    from prometheus_client import REGISTRY

    if _registered is None:
        _registered = PoolCollector()
        REGISTRY.register(_registered)
    return _registered


def render_prometheus(report: Report) -> str:
    """Prometheus text exposition of the report's processes (``poolstats --format prometheus``)."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(ReportCollector(lambda: report))
    return str(generate_latest(registry).decode())


def _allowed(request: HttpRequest) -> bool:
    from django.conf import settings

    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_staff", False) and user.is_active:
        return True
    token = getattr(settings, "POOLED_PG_METRICS_TOKEN", None)
    given = request.headers.get("Authorization", "")
    return bool(token) and hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The pools' metrics in Prometheus text format (staff or bearer token only)."""
    from django.http import HttpResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    if not _allowed(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    registry = CollectorRegistry()
    registry.register(PoolCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


__all__ = ["PoolCollector", "families", "metrics_view", "register_default", "render_prometheus"]
