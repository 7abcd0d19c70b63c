"""What the pools are doing: counters, distributions and live state, per alias.

(Named ``measures`` so that ``django_pooled_pg.stats()`` can be the function.)

Each process keeps one ``AliasStats`` per alias. Pools record into it as
they work (plain attribute increments and a bucket count: well under a
microsecond per checkout); ``snapshot()`` turns it into ``PoolStats``, plain
dataclasses that ``django_pooled_pg.stats()``, ``manage.py poolstats`` and
the Prometheus collector all read. The record outlives a pool replaced for
new settings (the test runner renaming the database), so counters cover the
alias's whole life in the process.
"""

from __future__ import annotations

import os
import socket
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, overload

if TYPE_CHECKING:
    from .options import PoolOptions
    from .pool import DjangoPool

#: Upper bounds (seconds) of the histogram buckets, shared by every
#: distribution and by the Prometheus histograms; the last bucket is +Inf.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

#: Why a pool closed or dropped a connection.
CLOSE_REASONS: tuple[str, ...] = (
    "lifetime",  # older than max_lifetime, or drained by pool.drain()
    "idle",  # above min_size and unused for max_idle
    "broken",  # found closed by the server or network while idle, or a failed check
    "reset_failed",  # the session reset (or a user's reset callback) failed
    "fork",  # inherited by a forked child, which lets it go without I/O
    "shutdown",  # the pool was closed (exit, settings changed, test database dropped)
)


class Histogram:
    """Observations in fixed buckets: bounded memory, percentiles estimated."""

    __slots__ = ("counts", "total", "max")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.max = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def summary(self) -> Distribution:
        counts = list(self.counts)
        n = sum(counts)
        return Distribution(
            count=n,
            sum=self.total,
            mean=self.total / n if n else 0.0,
            p50=self._quantile(counts, n, 0.50),
            p95=self._quantile(counts, n, 0.95),
            p99=self._quantile(counts, n, 0.99),
            max=self.max,
            buckets=counts,
        )

    def _quantile(self, counts: list[int], n: int, q: float) -> float:
        # Linear within the bucket that holds the rank, as Prometheus's
        # histogram_quantile(); never above the largest value seen.
        if not n:
            return 0.0
        rank = q * n
        seen = 0
        for i, c in enumerate(counts):
            if c and seen + c >= rank:
                low = BUCKETS[i - 1] if i else 0.0
                high = BUCKETS[i] if i < len(BUCKETS) else self.max
                value = low + (high - low) * (rank - seen) / c
                return min(value, self.max)
            seen += c
        return self.max


@dataclass
class Distribution:
    """Seconds: count, sum, mean, estimated percentiles, exact max.

    ``buckets[i]`` counts observations <= ``BUCKETS[i]`` and above the bound
    before it; the last counts those above every bound.
    """

    count: int
    sum: float
    mean: float
    p50: float
    p95: float
    p99: float
    max: float
    buckets: list[int] = field(repr=False)


@dataclass
class Config:
    """The pool's options that shape what the numbers mean (no credentials)."""

    database: str  # host:port/name
    user: str
    min_size: int
    max_size: int
    timeout: float
    max_waiting: int
    max_lifetime: float
    max_idle: float
    reset_session: bool
    fail_fast: bool
    leak_timeout: float | None


@dataclass
class Live:
    """The pool at the moment of the snapshot."""

    open: bool  # a pool exists in this process (it is created on first use)
    size: int  # connections open or being opened
    idle: int
    in_use: int
    waiting: int  # checkouts queued for a connection
    oldest_checkout: float  # seconds the longest-held connection has been out
    longest_wait: float  # seconds the longest-waiting checkout has waited
    failing_for: float  # seconds since every connection attempt started failing (0: not)
    last_failure: str


@dataclass
class Counters:
    """Since the alias's pool was first used in this process."""

    checkouts: int = 0
    checkouts_waited: int = 0  # found no idle connection and queued
    timeouts: int = 0  # PoolExhausted: no connection within timeout
    rejected: int = 0  # PoolExhausted: the queue was full (max_waiting)
    errors: int = 0  # other failed checkouts (ServerUnavailable, a closed pool)
    opened: int = 0
    connect_errors: int = 0  # failed connection attempts
    closed: int = 0  # the sum of closed_by_reason
    lost: int = 0  # came back from a request already closed (ended while in use)
    reclaimed: int = 0  # given back for a thread that ended without closing
    resets: int = 0  # session resets sent (DISCARD ALL)
    leaks: int = 0  # checkouts held longer than leak_timeout


@dataclass
class PoolStats:
    """One alias in one process: ``django_pooled_pg.stats()`` returns these."""

    alias: str
    host: str
    pid: int
    time: float  # time.time() of the snapshot
    config: Config
    live: Live
    counters: Counters
    closed_by_reason: dict[str, int]
    wait: Distribution  # checkout: from asking to holding a connection
    hold: Distribution  # from checkout to return
    connect: Distribution  # opening a connection (successful attempts)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (the ``poolstats --json`` schema)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolStats:
        return cls(
            alias=data["alias"],
            host=data["host"],
            pid=data["pid"],
            time=data["time"],
            config=Config(**data["config"]),
            live=Live(**data["live"]),
            counters=Counters(**data["counters"]),
            closed_by_reason=dict(data["closed_by_reason"]),
            wait=Distribution(**data["wait"]),
            hold=Distribution(**data["hold"]),
            connect=Distribution(**data["connect"]),
        )


class AliasStats:
    """The running record of one alias in this process (see the module doc)."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.config: Config | None = None  # of the alias's latest pool
        self.counters = Counters()
        self.closed_by_reason = dict.fromkeys(CLOSE_REASONS, 0)
        self.wait = Histogram()
        self.hold = Histogram()
        self.connect = Histogram()

    def closed(self, reason: str, n: int = 1) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + n
        self.counters.closed += n

    def snapshot(self, pool: DjangoPool | None, config: Config) -> PoolStats:
        now = time.monotonic()
        if pool is not None and not pool.closed:
            live = pool.live_state(now)
        else:
            live = Live(False, 0, 0, 0, 0, 0.0, 0.0, 0.0, "")
        return PoolStats(
            alias=self.alias,
            host=HOSTNAME,
            pid=os.getpid(),
            time=time.time(),
            config=config,
            live=live,
            counters=Counters(**asdict(self.counters)),
            closed_by_reason=dict(self.closed_by_reason),
            wait=self.wait.summary(),
            hold=self.hold.summary(),
            connect=self.connect.summary(),
        )


HOSTNAME = socket.gethostname()

_records: dict[str, AliasStats] = {}


def record_for(alias: str) -> AliasStats:
    """This process's record for *alias*, created on first use."""
    record = _records.get(alias)
    if record is None:
        record = _records.setdefault(alias, AliasStats(alias))
    return record


def forget_all() -> None:
    """In a forked child: the parent's numbers are not this process's."""
    _records.clear()


def config_of(options: PoolOptions, database: tuple[str, str, str], user: str) -> Config:
    host, port, name = database
    return Config(
        database=f"{host or 'localhost'}:{port or 5432}/{name}",
        user=user or "",
        min_size=options.min_size,
        max_size=options.max_size,
        timeout=options.timeout,
        max_waiting=options.max_waiting,
        max_lifetime=options.max_lifetime,
        max_idle=options.max_idle,
        reset_session=options.reset_session,
        fail_fast=options.fail_fast,
        leak_timeout=options.leak_timeout,
    )


def pooled_aliases() -> list[str]:
    """The configured aliases that use this engine with pooling on."""
    from django.db import connections

    from .base import DatabaseWrapper

    found = []
    for alias in connections:
        wrapper = connections[alias]
        if isinstance(wrapper, DatabaseWrapper) and wrapper.pooled:
            found.append(alias)
    return found


def snapshot(alias: str) -> PoolStats:
    """This process's stats for one alias: ValueError if it is not pooled here."""
    from django.db import connections

    from . import pool as pools
    from .base import DatabaseWrapper

    live = [p for p in pools.pools(alias) if not p.closed]
    pool = live[-1] if live else None
    record = _records.get(alias)
    if pool is not None:
        config = config_of(pool.options, pool.database, pool.user)
    elif record is not None and record.config is not None:
        config = record.config  # its pool was closed
    else:
        if alias not in connections:
            raise ValueError(f"no database alias {alias!r}; configured: {', '.join(connections)}")
        wrapper = connections[alias]
        if not isinstance(wrapper, DatabaseWrapper) or not wrapper.pooled:
            raise ValueError(
                f"database alias {alias!r} does not use a django_pooled_pg pool "
                f"(ENGINE {wrapper.settings_dict['ENGINE']!r})"
            )
        s = wrapper.settings_dict
        config = config_of(
            wrapper.pool_options(), (s["HOST"], str(s["PORT"]), s["NAME"]), s["USER"]
        )
    return record_for(alias).snapshot(pool, config)


@overload
def stats(alias: str) -> PoolStats: ...
@overload
def stats(alias: None = None) -> dict[str, PoolStats]: ...
def stats(alias: str | None = None) -> PoolStats | dict[str, PoolStats]:
    """What this process's pools are doing.

    ``stats("default")`` gives one alias (ValueError if it is not a pooled
    alias); ``stats()`` gives every pooled alias, configured or used in this
    process, by alias. Counters and distributions are zero and ``live.open``
    is False for an alias whose pool was not used yet.
    """
    if alias is not None:
        return snapshot(alias)
    from . import pool as pools

    aliases = dict.fromkeys(pooled_aliases())
    aliases.update(dict.fromkeys(p.alias for p in pools.pools()))
    return {a: snapshot(a) for a in aliases}
