"""The poolstats report: gathered from every process, merged, rendered.

``build_report()`` collects this process's stats, the other processes'
(from the publisher's cache), and the server's view; ``render_table`` and
``render_json`` turn it into the table or the JSON document (Prometheus
text is ``prometheus.render_prometheus``).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..holders import UNKNOWN
from .activity import ServerView, read_server_view
from .api import snapshot
from .pooler import PoolerView, read_pooler_view
from .publisher import Deployment, publish_settings, read_deployment
from .records import (
    CLOSE_REASONS,
    HOSTNAME,
    OTHER,
    Counters,
    Distribution,
    Histogram,
    HolderStats,
    PoolConfig,
    PoolStats,
)

FORMATS = ("table", "json", "prometheus")
#: Version of the ``poolstats --json`` document; bumped on incompatible change.
JSON_SCHEMA = 1


@dataclass
class Totals:
    """Every process of one alias together."""

    processes: int
    size: int
    idle: int
    in_use: int
    waiting: int
    oldest_checkout: float
    longest_wait: float
    counters: Counters
    closed_by_reason: dict[str, int]
    wait: Distribution
    hold: Distribution
    connect: Distribution
    holders: list[HolderStats] = field(default_factory=list)  # merged, most hold time first


@dataclass
class AliasReport:
    alias: str
    config: PoolConfig
    processes: list[PoolStats]  # this process first (if its pool is open)
    totals: Totals
    server: ServerView | None = None
    server_error: str | None = None
    pooler: PoolerView | None = None  # PgBouncer's view (pool option pgbouncer_admin)
    pooler_error: str | None = None


@dataclass
class Report:
    time: float
    host: str
    pid: int
    transport: dict[str, Any]  # cache, shared, error, note
    aliases: list[AliasReport] = field(default_factory=list)


def merge_distributions(parts: list[Distribution]) -> Distribution:
    h = Histogram()
    for d in parts:
        if len(d.buckets) == len(h.counts):
            for i, c in enumerate(d.buckets):
                h.counts[i] += c
        h.total += d.sum
        h.max = max(h.max, d.max)
    return h.summary()


def totals(processes: list[PoolStats]) -> Totals:
    counters = Counters()
    closed = dict.fromkeys(CLOSE_REASONS, 0)
    for p in processes:
        for name, value in asdict(p.counters).items():
            setattr(counters, name, getattr(counters, name) + value)
        for reason, n in p.closed_by_reason.items():
            closed[reason] = closed.get(reason, 0) + n
    return Totals(
        processes=len(processes),
        size=sum(p.live.size for p in processes),
        idle=sum(p.live.idle for p in processes),
        in_use=sum(p.live.in_use for p in processes),
        waiting=sum(p.live.waiting for p in processes),
        oldest_checkout=max((p.live.oldest_checkout for p in processes), default=0.0),
        longest_wait=max((p.live.longest_wait for p in processes), default=0.0),
        counters=counters,
        closed_by_reason=closed,
        wait=merge_distributions([p.wait for p in processes]),
        hold=merge_distributions([p.hold for p in processes]),
        connect=merge_distributions([p.connect for p in processes]),
        holders=merge_holders(processes),
    )


def merge_holders(processes: list[PoolStats]) -> list[HolderStats]:
    """Every process's holders summed by name, most hold time first."""
    parts: dict[str, list[HolderStats]] = {}
    for p in processes:
        for h in p.holders:
            parts.setdefault(h.holder, []).append(h)
    merged = [_summed(name, hs) for name, hs in parts.items()]
    return sorted(merged, key=lambda h: h.hold.sum, reverse=True)


def _summed(name: str, parts: list[HolderStats]) -> HolderStats:
    return HolderStats(
        holder=name,
        checkouts=sum(h.checkouts for h in parts),
        hold=merge_distributions([h.hold for h in parts]),
        wait_caused=sum(h.wait_caused for h in parts),
        leaks=sum(h.leaks for h in parts),
    )


#: poolstats --holders --sort: what each key orders by (largest first).
HOLDER_SORTS: dict[str, Any] = {
    "hold": lambda h: h.hold.sum,
    "wait": lambda h: h.wait_caused,
    "checkouts": lambda h: h.checkouts,
    "p99": lambda h: h.hold.p99,
    "leaks": lambda h: h.leaks,
}


def top_holders(holders: list[HolderStats], sort: str = "hold", top: int = 20) -> list[HolderStats]:
    """The *top* holders by *sort*, the rest summed as one OTHER row (bounded output)."""
    key = HOLDER_SORTS[sort]
    ranked = sorted(holders, key=key, reverse=True)
    if len(ranked) <= top:
        return ranked
    kept, rest = ranked[:top], ranked[top:]
    if any(h.holder == OTHER for h in kept):
        rest = rest + [h for h in kept if h.holder == OTHER]
        kept = [h for h in kept if h.holder != OTHER]
    kept.append(_summed(OTHER, rest))
    return kept


def _server_view(alias: str) -> ServerView:
    from django.db import connections

    wrapper = connections[alias]
    with (
        wrapper.direct_connection(application_name="django_pooled_pg poolstats") as conn,  # type: ignore[attr-defined]
        conn.cursor() as cursor,
    ):
        return read_server_view(cursor)


def _pooler_view(alias: str) -> PoolerView | None:
    from django.db import connections

    wrapper = connections[alias]
    conn = wrapper.pooler_admin_connection()  # type: ignore[attr-defined]
    if conn is None:
        return None
    with conn, conn.cursor() as cursor:
        return read_pooler_view(cursor, wrapper.settings_dict["NAME"])


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def build_report(
    aliases: list[str], deployment: bool = True, server: bool = True, pooler: bool = True
) -> Report:
    """Everything poolstats shows for *aliases* (validated by the caller)."""
    found = read_deployment() if deployment else Deployment([], None, "--local: this process")
    try:
        cache = publish_settings().cache
    except Exception:
        cache = None
    report = Report(
        time=time.time(),
        host=HOSTNAME,
        pid=os.getpid(),
        transport={
            "cache": cache,
            "shared": found.note is None,
            "error": found.error,
            "note": found.note,
        },
    )
    for alias in aliases:
        mine = snapshot(alias)
        others = sorted(
            (p for p in found.processes if p.alias == alias), key=lambda p: (p.host, p.pid)
        )
        processes = ([mine] if mine.live.open else []) + others
        entry = AliasReport(
            alias=alias,
            config=mine.config if mine.live.open or not others else others[0].config,
            processes=processes,
            totals=totals(processes),
        )
        if server:
            try:
                entry.server = _server_view(alias)
            except Exception as exc:  # the database is down: say so, show the rest
                entry.server_error = _one_line(exc)
        if pooler:
            try:
                entry.pooler = _pooler_view(alias)
            except Exception as exc:  # PgBouncer is down or refuses us: say so
                entry.pooler_error = _one_line(exc)
        report.aliases.append(entry)
    return report


# -- rates (--watch) ------------------------------------------------------

RATED = ("checkouts", "checkouts_waited", "timeouts", "rejected", "errors", "opened", "closed")


def rates(report: Report, previous: Report | None) -> dict[str, dict[str, float]]:
    """Per alias, per-second rates of the totals' counters since *previous*."""
    if previous is None:
        return {}
    dt = report.time - previous.time
    if dt <= 0:
        return {}
    before = {a.alias: a.totals.counters for a in previous.aliases}
    out: dict[str, dict[str, float]] = {}
    for a in report.aliases:
        if (old := before.get(a.alias)) is None:
            continue
        out[a.alias] = {
            name: max(getattr(a.totals.counters, name) - getattr(old, name), 0) / dt
            for name in RATED
        }
    return out


# -- JSON -------------------------------------------------------------------


def render_json(report: Report, previous: Report | None = None) -> dict[str, Any]:
    """The ``--json`` document (see docs/observability.md for the schema)."""
    doc = asdict(report)
    doc["schema"] = JSON_SCHEMA
    per_second = rates(report, previous)
    aliases = {}
    for data in doc["aliases"]:
        alias = data.pop("alias")
        data["rates"] = per_second.get(alias)
        aliases[alias] = data
    doc["aliases"] = aliases
    return doc


# -- table ------------------------------------------------------------------


def fmt_seconds(s: float) -> str:
    if s <= 0:
        return "0"
    if s < 0.001:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _onoff(value: bool | str) -> str:
    if isinstance(value, str):
        return value  # reset_session="auto"
    return "on" if value else "off"


def _config_line(c: PoolConfig) -> str:
    return (
        f"{c.database} as {c.user or '(default user)'}: min_size {c.min_size}, "
        f"max_size {c.max_size}, timeout {c.timeout:g} s, "
        f"max_waiting {c.max_waiting or 'unlimited'}, max_lifetime {c.max_lifetime:g} s, "
        f"max_idle {c.max_idle:g} s, reset_session {_onoff(c.reset_session)}, "
        f"fail_fast {_onoff(c.fail_fast)}, "
        f"leak_timeout {'off' if c.leak_timeout is None else f'{c.leak_timeout:g} s'}"
        + (f", behind PgBouncer in {c.pgbouncer} mode" if c.pgbouncer else "")
        + (f", server_role {c.server_role}" if c.server_role else "")
    )


_COLUMNS = (
    ("process", "<"),
    ("size", ">"),
    ("idle", ">"),
    ("in use", ">"),
    ("waiting", ">"),
    ("oldest out", ">"),
    ("longest wait", ">"),
    ("checkouts", ">"),
    ("waited", ">"),
    ("timeouts", ">"),
    ("rejected", ">"),
    ("errors", ">"),
    ("opened", ">"),
    ("closed", ">"),
    ("lost", ">"),
    ("leaks", ">"),
)


def _grid(rows: list[list[str]], aligns: list[str], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(aligns))]
    out = []
    for r in rows:
        cells = [f"{v:{a}{w}}" for v, a, w in zip(r, aligns, widths, strict=True)]
        out.append(indent + "  ".join(cells).rstrip())
    return out


def _process_row(label: str, live: Any, c: Counters) -> list[str]:
    return [
        label,
        str(live.size),
        str(live.idle),
        str(live.in_use),
        str(live.waiting),
        fmt_seconds(live.oldest_checkout),
        fmt_seconds(live.longest_wait),
        str(c.checkouts),
        str(c.checkouts_waited),
        str(c.timeouts),
        str(c.rejected),
        str(c.errors),
        str(c.opened),
        str(c.closed),
        str(c.lost),
        str(c.leaks),
    ]


def render_table(report: Report, previous: Report | None = None, color: Any = None) -> str:
    def heading(text: str) -> str:
        return color.MIGRATE_HEADING(text) if color is not None else text

    lines = [
        f"django-pooled-pg pool stats at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(report.time))} "
        f"(read by {report.host}:{report.pid})"
    ]
    t = report.transport
    if t["error"]:
        lines.append(f"Other processes: unavailable, {t['error']}. Showing this process only.")
    elif t["note"]:
        lines.append(f"Other processes: not shown, {t['note']}.")
    else:
        lines.append(f"Other processes: read from cache {t['cache']!r}.")
    per_second = rates(report, previous)
    for a in report.aliases:
        lines.append("")
        lines.append(heading(f"{a.alias}  ") + _config_line(a.config))
        if not a.processes:
            lines.append("  No process has an open pool for this alias (yet).")
        else:
            rows = [[name for name, _ in _COLUMNS]]
            for p in a.processes:
                mark = " (this)" if p.pid == report.pid and p.host == report.host else ""
                rows.append(_process_row(f"{p.host}:{p.pid}{mark}", p.live, p.counters))
            tot = a.totals
            rows.append(
                _process_row(
                    f"total, {tot.processes} process{'es' if tot.processes != 1 else ''}",
                    tot,
                    tot.counters,
                )
            )
            lines.extend(_grid(rows, [al for _, al in _COLUMNS]))
            closed = ", ".join(f"{k} {v}" for k, v in tot.closed_by_reason.items())
            lines.append(f"  closed by reason: {closed}")
            c = tot.counters
            lines.append(f"  session resets: sent {c.resets}, skipped {c.resets_skipped}")
            dist_rows = [["time", "count", "mean", "p50", "p95", "p99", "max"]]
            for name, d in (
                ("checkout wait", tot.wait),
                ("held", tot.hold),
                ("connect", tot.connect),
            ):
                dist_rows.append(
                    [name, str(d.count)]
                    + [fmt_seconds(v) for v in (d.mean, d.p50, d.p95, d.p99, d.max)]
                )
            lines.extend(_grid(dist_rows, ["<", ">", ">", ">", ">", ">", ">"]))
        if (r := per_second.get(a.alias)) is not None:
            lines.append(
                "  per second: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in r.items())
            )
        lines.extend(_server_lines(a))
        lines.extend(_pooler_lines(a))
    return "\n".join(lines) + "\n"


def _pooler_lines(a: AliasReport) -> list[str]:
    if a.pooler_error is not None:
        return [f"  pgbouncer: unavailable: {a.pooler_error}"]
    v = a.pooler
    if v is None:
        return []
    lines = [f"  pgbouncer ({v.version}), database {a.config.database.rsplit('/', 1)[-1]}:"]
    rows = [["pool of", "mode", "cl_active", "cl_waiting", "sv_active", "sv_idle", "maxwait"]]
    for p in v.pools:
        rows.append(
            [
                p.user,
                p.mode,
                str(p.clients_active),
                str(p.clients_waiting),
                str(p.servers_active),
                str(p.servers_idle),
                fmt_seconds(p.max_wait),
            ]
        )
    if len(rows) > 1:
        lines.extend(_grid(rows, ["<", "<", ">", ">", ">", ">", ">"], indent="    "))
    for st in v.stats:
        lines.append(
            f"    per second: {st.transactions_per_second:g} transactions, "
            f"{st.queries_per_second:g} queries; average transaction "
            f"{fmt_seconds(st.avg_transaction_time)}, query {fmt_seconds(st.avg_query_time)}, "
            f"wait {fmt_seconds(st.avg_wait_time)}"
        )
    return lines


def _server_lines(a: AliasReport) -> list[str]:
    if a.server_error is not None:
        return [f"  server: unavailable: {a.server_error}"]
    v = a.server
    if v is None:
        return []
    used = v.client_sessions
    role = v.role
    if v.role == "standby":
        lag = "unknown" if v.replay_lag is None else fmt_seconds(v.replay_lag)
        role = f"standby, replay lag {lag}"
    lines = [
        f"  server ({a.config.database}): {role}; {used} client sessions of max_connections "
        f"{v.max_connections} ({v.reserved} reserved for superusers)"
    ]
    mine = [g for g in v.ours if g.alias == a.alias]
    if mine:
        rows = [["sessions of", "active", "idle", "idle in tx", "oldest tx"]]
        for g in mine:
            rows.append(
                [
                    f"{g.host}:{g.pid}",
                    str(g.active),
                    str(g.idle),
                    str(g.idle_in_transaction),
                    fmt_seconds(g.oldest_transaction) if g.oldest_transaction else "-",
                ]
            )
        lines.extend(_grid(rows, ["<", ">", ">", ">", ">"], indent="    "))
    other_pools = sum(g.total for g in v.ours if g.alias != a.alias)
    others = ", ".join(f"{k} {n}" for k, n in sorted(v.others_by_application.items()))
    lines.append(
        f"    other aliases' pools: {other_pools}; other clients: {v.others}"
        + (f" ({others})" if others else "")
    )
    return lines


# -- holders (poolstats --holders) -----------------------------------------------


def render_holders_json(report: Report, sort: str = "hold", top: int = 20) -> dict[str, Any]:
    """Per alias, the top holders of every process together (``poolstats --holders --json``)."""
    return {
        "schema": JSON_SCHEMA,
        "time": report.time,
        "sort": sort,
        "aliases": {
            a.alias: [asdict(h) for h in top_holders(a.totals.holders, sort, top)]
            for a in report.aliases
        },
    }


def render_holders_table(report: Report, sort: str = "hold", top: int = 20) -> str:
    lines = [
        f"django-pooled-pg pool holders at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(report.time))}, "
        f"by {sort} (read by {report.host}:{report.pid})"
    ]
    for a in report.aliases:
        tot = a.totals
        lines.append("")
        lines.append(
            f"{a.alias}  {tot.processes} process{'es' if tot.processes != 1 else ''}, "
            f"{tot.counters.checkouts} checkouts, held {fmt_seconds(tot.hold.sum)} in all, "
            f"waited {fmt_seconds(tot.wait.sum)} in all"
        )
        if a.config.holders is False:
            lines.append("  holders=False: checkouts are not charged to holders.")
            continue
        if not tot.holders:
            lines.append("  No checkout has been returned yet.")
            continue
        rows = [["holder", "checkouts", "held", "share", "p50", "p99", "wait caused", "leaks"]]
        all_held = sum(h.hold.sum for h in tot.holders) or 1.0
        for h in top_holders(tot.holders, sort, top):
            rows.append(
                [
                    h.holder,
                    str(h.checkouts),
                    fmt_seconds(h.hold.sum),
                    f"{100 * h.hold.sum / all_held:.0f}%",
                    fmt_seconds(h.hold.p50),
                    fmt_seconds(h.hold.p99),
                    fmt_seconds(h.wait_caused),
                    str(h.leaks),
                ]
            )
        lines.extend(_grid(rows, ["<", ">", ">", ">", ">", ">", ">", ">"]))
        if any(h.holder == UNKNOWN for h in tot.holders) and a.config.holders is True:
            lines.append(
                f"  {UNKNOWN}: checkouts outside a request (with HolderMiddleware), a Celery "
                "task, a command or holding(); holders='stack' names their callers."
            )
    return "\n".join(lines) + "\n"


__all__ = [
    "HOLDER_SORTS",
    "FORMATS",
    "AliasReport",
    "Report",
    "Totals",
    "build_report",
    "render_holders_json",
    "render_holders_table",
    "render_json",
    "render_table",
    "top_holders",
]
