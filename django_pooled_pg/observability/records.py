"""What the pools are doing: counters, distributions and live state, per alias.

The leaf of the observability package: plain records and snapshots, no
imports from the rest of django_pooled_pg.

Each process keeps one ``AliasRecord`` per alias. A pool calls its
``Recorder`` at fixed points (checkout, return, open, close, ...): plain
attribute increments and a bucket count, well under a microsecond per
checkout, and nothing at all with the ``stats`` option off (the base
``Recorder`` does nothing). ``AliasRecord.snapshot()`` turns the record into
``PoolStats``, plain dataclasses that ``django_pooled_pg.stats()``,
``manage.py poolstats`` and the Prometheus collector all read. The record
outlives a pool replaced for new settings (the test runner renaming the
database), so counters cover the alias's whole life in the process.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

#: Upper bounds (seconds) of the histogram buckets, shared by every
#: distribution and by the Prometheus histograms; the last bucket is +Inf.
BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class Named(Protocol):
    """A holder as the pool passes it (holders.Holder): its name is read when tallied."""

    @property
    def name(self) -> str: ...


#: Why a pool closed or dropped a connection.
CLOSE_REASONS: tuple[str, ...] = (
    "lifetime",  # older than max_lifetime, or drained by pool.drain()
    "idle",  # above min_size and unused for max_idle
    "broken",  # found closed by the server or network while idle, or a failed check
    "reset_failed",  # the session reset (or a user's reset callback) failed
    "role_change",  # its server is no longer of the alias's role (server_role), or drained for it
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
class PoolConfig:
    """The pool's options that shape what the numbers mean (no credentials).

    Its fields after ``user`` are the options marked ``shown`` in
    ``django_pooled_pg.options`` (a test keeps the two equal); the class is
    spelled out because it is part of the ``poolstats --json`` schema.
    """

    database: str  # host:port/name
    user: str
    min_size: int
    max_size: int
    timeout: float
    max_waiting: int
    max_lifetime: float
    max_idle: float
    reset_session: bool | str
    fail_fast: bool
    leak_timeout: float | None
    holders: bool | str = True  # (absent from processes of older versions)
    pgbouncer: str | None = None  # (absent from processes of older versions)
    server_role: str | None = None  # the role enforced (resolved from target_session_attrs)
    drain_on_role_change: bool = True

    @classmethod
    def build(cls, database: tuple[str, str, str], user: str, shown: dict[str, Any]) -> PoolConfig:
        """From (host, port, name), the user and the shown options."""
        host, port, name = database
        return cls(
            database=f"{host or 'localhost'}:{port or 5432}/{name}", user=user or "", **shown
        )


@dataclass
class LiveState:
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
    resets_skipped: int = 0  # reset_session="auto": the request changed nothing
    leaks: int = 0  # checkouts held longer than leak_timeout


@dataclass
class HolderStats:
    """One holder (a view, task, command or caller) of one alias's connections."""

    holder: str
    checkouts: int
    hold: Distribution  # from checkout to return, of its returned checkouts
    wait_caused: float  # seconds others waited while it held connections (shared out)
    leaks: int  # its checkouts held longer than leak_timeout

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HolderStats:
        return cls(**{**data, "hold": Distribution(**data["hold"])})


@dataclass
class PoolStats:
    """One alias in one process: ``django_pooled_pg.stats()`` returns these."""

    alias: str
    host: str
    pid: int
    time: float  # time.time() of the snapshot
    config: PoolConfig
    live: LiveState
    counters: Counters
    closed_by_reason: dict[str, int]
    wait: Distribution  # checkout: from asking to holding a connection
    hold: Distribution  # from checkout to return
    connect: Distribution  # opening a connection (successful attempts)
    #: Who held the connections (pool option ``holders``), most hold time first.
    holders: list[HolderStats] = field(default_factory=list)
    #: time.time() when the counters started (0: a process of an older version).
    since: float = 0.0

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
            config=PoolConfig(**data["config"]),
            live=LiveState(**data["live"]),
            counters=Counters(**data["counters"]),
            closed_by_reason=dict(data["closed_by_reason"]),
            wait=Distribution(**data["wait"]),
            hold=Distribution(**data["hold"]),
            connect=Distribution(**data["connect"]),
            holders=[HolderStats.from_dict(h) for h in data.get("holders", ())],
            since=data.get("since", 0.0),
        )


class Recorder:
    """Where a pool reports what it does; this base records nothing (``stats`` off).

    The pool calls these at fixed points, so collecting stays off its
    mechanics (HikariCP's metrics tracker does the same).
    """

    __slots__ = ()

    def checked_out(self, waited: float) -> None:
        """A checkout got a connection after *waited* seconds."""

    def queued(self) -> None:
        """A checkout found no idle connection and waits in the queue."""

    def timed_out(self) -> None:
        """A checkout gave up after ``timeout`` (PoolExhausted)."""

    def rejected(self) -> None:
        """A checkout was refused: the queue was full (PoolExhausted)."""

    def failed(self) -> None:
        """A checkout failed otherwise (ServerUnavailable, a closed pool)."""

    def returned(self, held: float) -> None:
        """A connection came back after *held* seconds out."""

    def held_by(self, holder: Named, held: float) -> None:
        """*holder* (pool option ``holders``) held a connection for *held* seconds."""

    def caused_wait(self, holder: str, seconds: float) -> None:
        """Checkouts waited *seconds* (its share) while *holder* held a connection."""

    def reset_sent(self) -> None:
        """A session reset was sent on a returned connection."""

    def reset_skipped(self) -> None:
        """A returned connection needed no reset ("auto": its session was unchanged)."""

    def opened(self, seconds: float) -> None:
        """A connection was opened, taking *seconds*."""

    def connect_failed(self) -> None:
        """A connection attempt failed."""

    def closed(self, reason: str, n: int = 1) -> None:
        """The pool closed *n* connections for *reason* (see CLOSE_REASONS)."""

    def lost(self) -> None:
        """A connection came back already closed (it ended while in use)."""

    def reclaimed(self) -> None:
        """A connection was given back for a thread that ended holding it."""

    def leaked(self, holder: str | None = None) -> None:
        """A checkout (of *holder*, if known) has been held longer than ``leak_timeout``."""


class AliasRecord(Recorder):
    """The running record of one alias in this process (see the module doc)."""

    __slots__ = (
        "alias",
        "config",
        "counters",
        "closed_by_reason",
        "wait",
        "hold",
        "connect",
        "holders",
        "since",
        "_held",
        "_tally_lock",
    )

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.config: PoolConfig | None = None  # of the alias's latest pool
        self.counters = Counters()
        self.closed_by_reason = dict.fromkeys(CLOSE_REASONS, 0)
        self.wait = Histogram()
        self.hold = Histogram()
        self.connect = Histogram()
        #: Per holder name; read through snapshot(), which tallies _held first.
        self.holders: dict[str, HolderTally] = {}
        self.since = time.time()
        # Holds returned, not yet tallied: (holder, seconds). A return only
        # appends (thread-safe, no lookup); the tally is made in batches.
        self._held: deque[tuple[Named, float]] = deque()
        self._tally_lock = threading.Lock()

    def checked_out(self, waited: float) -> None:
        self.counters.checkouts += 1
        self.wait.observe(waited)

    def queued(self) -> None:
        self.counters.checkouts_waited += 1

    def timed_out(self) -> None:
        self.counters.timeouts += 1

    def rejected(self) -> None:
        self.counters.rejected += 1

    def failed(self) -> None:
        self.counters.errors += 1

    def returned(self, held: float) -> None:
        self.hold.observe(held)

    def held_by(self, holder: Named, held: float) -> None:
        held_ = self._held
        held_.append((holder, held))
        if len(held_) >= TALLY_EVERY:
            self.tally()

    def tally(self) -> None:
        """Charge the holds returned since the last tally to their holders.

        By name now, not at return: a request's holder is named once its
        view is known, which may be after an early checkout came back.
        """
        held_ = self._held
        with self._tally_lock:
            while True:
                try:
                    holder, held = held_.popleft()
                except IndexError:
                    return
                tally = self.holders.get(holder.name)
                if tally is None:
                    tally = self._new_holder(holder.name)
                tally.checkouts += 1
                tally.hold.observe(held)

    def caused_wait(self, holder: str, seconds: float) -> None:
        tally = self.holders.get(holder)
        if tally is None:
            tally = self._new_holder(holder)
        tally.wait_caused += seconds

    def _new_holder(self, holder: str) -> HolderTally:
        # Bounded: MAX_HOLDERS in all, OTHER included, which sums the newcomers.
        if len(self.holders) >= MAX_HOLDERS - 1:
            holder = OTHER
        return self.holders.setdefault(holder, HolderTally())

    def reset_sent(self) -> None:
        self.counters.resets += 1

    def reset_skipped(self) -> None:
        self.counters.resets_skipped += 1

    def opened(self, seconds: float) -> None:
        self.counters.opened += 1
        self.connect.observe(seconds)

    def connect_failed(self) -> None:
        self.counters.connect_errors += 1

    def closed(self, reason: str, n: int = 1) -> None:
        self.closed_by_reason[reason] = self.closed_by_reason.get(reason, 0) + n
        self.counters.closed += n

    def lost(self) -> None:
        self.counters.lost += 1

    def reclaimed(self) -> None:
        self.counters.reclaimed += 1

    def leaked(self, holder: str | None = None) -> None:
        self.counters.leaks += 1
        if holder is not None:
            tally = self.holders.get(holder)
            if tally is None:
                tally = self._new_holder(holder)
            tally.leaks += 1

    def snapshot(self, live: LiveState | None, config: PoolConfig) -> PoolStats:
        """The record as PoolStats; *live* None: no open pool in this process."""
        if live is None:
            live = LiveState(False, 0, 0, 0, 0, 0.0, 0.0, 0.0, "")
        self.tally()
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
            holders=sorted(
                (t.stats(name) for name, t in list(self.holders.items())),
                key=lambda h: h.hold.sum,
                reverse=True,
            ),
            since=self.since,
        )


#: Distinct holders one process keeps per alias; the rest are summed as OTHER.
MAX_HOLDERS = 200
#: Returned holds kept before they are tallied (also at every snapshot).
TALLY_EVERY = 1024
#: The holder of the checkouts past MAX_HOLDERS (and past a listing's --top).
OTHER = "(other)"


class HolderTally:
    """The running record of one holder (see ``AliasRecord.held_by``)."""

    __slots__ = ("checkouts", "hold", "wait_caused", "leaks")

    def __init__(self) -> None:
        self.checkouts = 0
        self.hold = Histogram()
        self.wait_caused = 0.0
        self.leaks = 0

    def stats(self, name: str) -> HolderStats:
        return HolderStats(name, self.checkouts, self.hold.summary(), self.wait_caused, self.leaks)


#: The recorder of a pool whose ``stats`` option is off.
NOT_RECORDING = Recorder()


class FanOut(Recorder):
    """The alias's record, then every listener (OpenTelemetry's histograms).

    A listener that raises is logged and skipped: the pool calls recorders
    in the middle of a checkout or a return, which must not fail for it.
    """

    __slots__ = ("_record", "_listeners")

    def __init__(self, record: Recorder, *listeners: Recorder) -> None:
        self._record = record
        self._listeners = listeners


def _fan_out(name: str) -> Callable[..., None]:
    def method(self: FanOut, *args: Any, **kwargs: Any) -> None:
        getattr(self._record, name)(*args, **kwargs)
        for listener in self._listeners:
            try:
                getattr(listener, name)(*args, **kwargs)
            except Exception:
                logging.getLogger("django_pooled_pg").exception(
                    "a pool stats listener (%r) failed in %s()", listener, name
                )

    method.__name__ = method.__qualname__ = name
    return method


for _name in [n for n in vars(Recorder) if not n.startswith("_")]:
    setattr(FanOut, _name, _fan_out(_name))


#: Called with (alias, pool name) for each pool made with stats on: each
#: returns a Recorder that hears what the pool does, or None.
_listeners: list[Callable[[str, str], Recorder | None]] = []


def add_listener(factory: Callable[[str, str], Recorder | None]) -> None:
    """Have pools made from now on report to *factory*'s recorders too."""
    if factory not in _listeners:
        _listeners.append(factory)


def remove_listener(factory: Callable[[str, str], Recorder | None]) -> None:
    """Pools made from now on no longer report to *factory*'s recorders."""
    if factory in _listeners:
        _listeners.remove(factory)


def recorder_for(alias: str, pool_name: str, stats: bool) -> Recorder:
    """What a new pool of *alias* reports to: nothing (stats off), its record,
    or its record and the listeners' recorders."""
    if not stats:
        return NOT_RECORDING
    record = record_for(alias)
    extra = [r for f in list(_listeners) if (r := f(alias, pool_name)) is not None]
    return FanOut(record, *extra) if extra else record


HOSTNAME = socket.gethostname()

_records: dict[str, AliasRecord] = {}


def record_for(alias: str) -> AliasRecord:
    """This process's record for *alias*, created on first use."""
    record = _records.get(alias)
    if record is None:
        record = _records.setdefault(alias, AliasRecord(alias))
    return record


def existing_record(alias: str) -> AliasRecord | None:
    """This process's record for *alias*, if a pool of it was ever made."""
    return _records.get(alias)


def forget_all() -> None:
    """In a forked child: the parent's numbers are not this process's."""
    _records.clear()
