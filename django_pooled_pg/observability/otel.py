"""OpenTelemetry metrics of the pools (the optional ``[otel]`` extra).

The instruments are the semantic conventions' connection-pool metrics,
``db.client.connection.*``, as of semantic conventions 1.44.0
(``opentelemetry-semantic-conventions`` 0.66b2). They are still
experimental (incubating): names or units may change in a later release of
the conventions, and ``SEMCONV_VERSION`` says which one this follows.

* State comes from the pools at each collection (observable instruments, no
  cost between collections): ``count`` by ``state`` idle/used, ``idle.max``,
  ``idle.min``, ``max``, ``pending_requests``, and ``timeouts`` (a
  cumulative counter read from the alias's record).
* Times are recorded as they happen, through the pool's recorder (the pool
  option ``stats`` on): ``create_time``, ``wait_time``, ``use_time``.

Every point carries ``db.client.connection.pool.name``: the pool's ``name``
option, else its alias. Only this process's pools are reported: each
process exports its own, as OpenTelemetry SDKs do.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from .. import registry
from .records import BUCKETS, Recorder, add_listener, existing_record, remove_listener

if TYPE_CHECKING:
    from ..pool import DjangoPool

SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"

#: name: (instrument kind, unit, description), as the conventions give them.
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "db.client.connection.count": (
        "updowncounter",
        "{connection}",
        "The number of connections that are currently in state described by the state attribute.",
    ),
    "db.client.connection.idle.max": (
        "updowncounter",
        "{connection}",
        "The maximum number of idle open connections allowed.",
    ),
    "db.client.connection.idle.min": (
        "updowncounter",
        "{connection}",
        "The minimum number of idle open connections allowed.",
    ),
    "db.client.connection.max": (
        "updowncounter",
        "{connection}",
        "The maximum number of open connections allowed.",
    ),
    "db.client.connection.pending_requests": (
        "updowncounter",
        "{request}",
        "The number of current pending requests for an open connection.",
    ),
    "db.client.connection.timeouts": (
        "counter",
        "{timeout}",
        "The number of connection timeouts that have occurred trying to obtain a "
        "connection from the pool.",
    ),
    "db.client.connection.create_time": (
        "histogram",
        "s",
        "The time it took to create a new connection.",
    ),
    "db.client.connection.wait_time": (
        "histogram",
        "s",
        "The time it took to obtain an open connection from the pool.",
    ),
    "db.client.connection.use_time": (
        "histogram",
        "s",
        "The time between borrowing a connection and returning it to the pool.",
    ),
}


def _pools() -> Iterator[DjangoPool]:
    for pool in registry.find():
        if not pool.closed:
            yield pool


def _observe(get: Any) -> Any:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        return [obs for pool in _pools() for obs in get(pool)]

    return callback


def _count(pool: DjangoPool) -> list[Observation]:
    live = pool.live_state()
    return [
        Observation(live.idle, {POOL_NAME: pool.name, STATE: "idle"}),
        Observation(live.in_use, {POOL_NAME: pool.name, STATE: "used"}),
    ]


def _timeouts(pool: DjangoPool) -> list[Observation]:
    record = existing_record(pool.alias)
    n = record.counters.timeouts if record is not None else 0
    return [Observation(n, {POOL_NAME: pool.name})]


_OBSERVED: dict[str, Any] = {
    "db.client.connection.count": _count,
    # psycopg_pool keeps up to max_size idle (and min_size open at least).
    "db.client.connection.idle.max": lambda p: [Observation(p.max_size, {POOL_NAME: p.name})],
    "db.client.connection.idle.min": lambda p: [Observation(p.min_size, {POOL_NAME: p.name})],
    "db.client.connection.max": lambda p: [Observation(p.max_size, {POOL_NAME: p.name})],
    "db.client.connection.pending_requests": lambda p: [
        Observation(p.live_state().waiting, {POOL_NAME: p.name})
    ],
    "db.client.connection.timeouts": _timeouts,
}


class _TimesRecorder(Recorder):
    """Records one pool's create, wait and use times into the histograms."""

    __slots__ = ("_attributes", "_create", "_wait", "_use")

    def __init__(self, pool_name: str, create: Any, wait: Any, use: Any) -> None:
        self._attributes = {POOL_NAME: pool_name}
        self._create = create
        self._wait = wait
        self._use = use

    def checked_out(self, waited: float) -> None:
        self._wait.record(waited, self._attributes)

    def returned(self, held: float) -> None:
        self._use.record(held, self._attributes)

    def opened(self, seconds: float) -> None:
        self._create.record(seconds, self._attributes)


_instrumented: dict[int, Any] = {}


def instrument(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report the pools through *meter_provider* (default: the global one).

    Pools made afterwards record their times; call it before the first
    request (``POOLED_PG_OPENTELEMETRY = True`` in settings does, when the
    app loads). Calling it again with the same provider does nothing; with
    another, times go to that one only.
    """
    provider = meter_provider or metrics.get_meter_provider()
    if id(provider) in _instrumented:
        return
    # One provider at a time: the last call wins (the setting's call at app
    # load, then the application's own with its SDK provider, say), so that
    # no time is recorded twice.
    for other in list(_instrumented):
        remove_listener(_instrumented.pop(other)[1])
    from .. import __version__

    meter = provider.get_meter("django_pooled_pg", __version__, schema_url=SCHEMA_URL)
    made: dict[str, Any] = {}
    for name, (kind, unit, description) in INSTRUMENTS.items():
        if kind == "histogram":
            made[name] = meter.create_histogram(
                name,
                unit=unit,
                description=description,
                # OpenTelemetry's default buckets start at 5 (seconds): too coarse.
                explicit_bucket_boundaries_advisory=list(BUCKETS),
            )
        elif kind == "counter":
            made[name] = meter.create_observable_counter(
                name, [_observe(_OBSERVED[name])], unit=unit, description=description
            )
        else:
            made[name] = meter.create_observable_up_down_counter(
                name, [_observe(_OBSERVED[name])], unit=unit, description=description
            )

    def listener(alias: str, pool_name: str) -> Recorder:
        return _TimesRecorder(
            pool_name,
            made["db.client.connection.create_time"],
            made["db.client.connection.wait_time"],
            made["db.client.connection.use_time"],
        )

    _instrumented[id(provider)] = (provider, listener)
    add_listener(listener)


def uninstrument(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Pools made from now on no longer record their times into *meter_provider*.

    (Its observable instruments stay registered with the provider: an
    OpenTelemetry meter cannot drop an instrument; shut the provider down.)
    """
    provider = meter_provider or metrics.get_meter_provider()
    entry = _instrumented.pop(id(provider), None)
    if entry is not None:
        remove_listener(entry[1])


__all__ = ["INSTRUMENTS", "SEMCONV_VERSION", "instrument", "uninstrument"]
