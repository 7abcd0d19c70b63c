"""OpenTelemetry: the pools as the semantic conventions' connection-pool metrics.

The SDK's in-memory reader collects what an exporter would send; names,
units, kinds and descriptions are checked against the conventions package
(``opentelemetry-semantic-conventions``, incubating ``db_metrics``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram, InMemoryMetricReader, Sum
from opentelemetry.semconv._incubating.attributes import db_attributes
from opentelemetry.semconv._incubating.metrics import db_metrics

from django_pooled_pg.errors import PoolExhausted
from django_pooled_pg.observability import otel
from tests.conftest import Make
from tests.helpers import CheckedThread


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel.instrument(provider)
    yield reader
    otel.uninstrument(provider)
    provider.shutdown()


def collected(reader: InMemoryMetricReader) -> dict[str, Any]:
    data = reader.get_metrics_data()
    assert data is not None
    out = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            assert sm.scope.name == "django_pooled_pg"
            assert sm.scope.schema_url == f"https://opentelemetry.io/schemas/{otel.SEMCONV_VERSION}"
            for m in sm.metrics:
                out[m.name] = m
    return out


def points(metric: Any, pool: str) -> list[Any]:
    return [
        p
        for p in metric.data.data_points
        if p.attributes.get(db_attributes.DB_CLIENT_CONNECTION_POOL_NAME) == pool
    ]


def test_every_instrument_is_named_and_shaped_as_the_conventions_say() -> None:
    """Each of ours against the conventions package: name, unit, kind, description."""
    provider = MeterProvider()
    meter = provider.get_meter("conventions")
    kinds = {"UpDownCounter": "updowncounter", "Counter": "counter", "Histogram": "histogram"}
    expected = {}
    for attr in dir(db_metrics):
        if attr.startswith("create_db_client_connection_"):
            made = getattr(db_metrics, attr)(meter)
            kind = next(k for cls, k in kinds.items() if cls in type(made).__name__)
            expected[made.name] = (kind, made.unit, made.description)
    # The nine, every one the conventions define for connection pools.
    assert set(otel.INSTRUMENTS) == set(expected), set(otel.INSTRUMENTS) ^ set(expected)
    for name, (kind, unit, description) in otel.INSTRUMENTS.items():
        want_kind, want_unit, want_description = expected[name]
        assert (kind, unit) == (want_kind, want_unit), name
        # The conventions quote the attribute name in backticks; ours do not.
        assert description == want_description.replace("`", ""), name
    assert otel.POOL_NAME == db_attributes.DB_CLIENT_CONNECTION_POOL_NAME
    assert otel.STATE == db_attributes.DB_CLIENT_CONNECTION_STATE
    provider.shutdown()


def test_the_pool_is_reported_with_states_limits_and_times(
    reader: InMemoryMetricReader, make_wrapper: Make
) -> None:
    w = make_wrapper(pool={"min_size": 1, "max_size": 3, "name": "otel-pool"})
    for _ in range(4):
        w.ensure_connection()
        with w.cursor() as cursor:
            cursor.execute("SELECT 1")
        w.close()
    w.ensure_connection()  # one in use while collecting
    try:
        metrics = collected(reader)
    finally:
        w.close()

    count = metrics["db.client.connection.count"]
    assert isinstance(count.data, Sum) and not count.data.is_monotonic
    assert count.unit == "{connection}"
    by_state = {p.attributes[otel.STATE]: p.value for p in points(count, "otel-pool")}
    assert by_state["used"] == 1 and by_state["idle"] >= 0
    for name, value in (
        ("db.client.connection.max", 3),
        ("db.client.connection.idle.max", 3),
        ("db.client.connection.idle.min", 1),
        ("db.client.connection.pending_requests", 0),
    ):
        m = metrics[name]
        assert isinstance(m.data, Sum) and not m.data.is_monotonic, name
        assert [p.value for p in points(m, "otel-pool")] == [value], name
    timeouts = metrics["db.client.connection.timeouts"]
    assert isinstance(timeouts.data, Sum) and timeouts.data.is_monotonic
    assert [p.value for p in points(timeouts, "otel-pool")] == [0]

    for name, n in (
        ("db.client.connection.wait_time", 5),
        ("db.client.connection.use_time", 4),
        ("db.client.connection.create_time", 1),
    ):
        m = metrics[name]
        assert isinstance(m.data, Histogram) and m.unit == "s", name
        (p,) = points(m, "otel-pool")
        assert p.count >= n and p.sum > 0, (name, p)
        assert p.explicit_bounds[0] < 0.001  # our buckets, not the SDK's 0, 5, 10, ...


def test_a_timeout_and_a_waiting_checkout_are_counted(
    reader: InMemoryMetricReader, make_wrapper: Make
) -> None:
    w = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.3})
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        other = w.copy()
        other.ensure_connection()
        holding.set()
        done.wait(10)
        other.close()

    t = CheckedThread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with pytest.raises(PoolExhausted):
            w.ensure_connection()
        metrics = collected(reader)
    finally:
        done.set()
        t.join(10)
    assert [p.value for p in points(metrics["db.client.connection.timeouts"], w.alias)] == [1]
    used = {
        p.attributes[otel.STATE]: p.value
        for p in points(metrics["db.client.connection.count"], w.alias)
    }
    assert used["used"] == 1


SCRIPT = """
import json, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

reader = InMemoryMetricReader()
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

import django
from django.conf import settings

db = json.loads(sys.argv[1])
settings.configure(
    DATABASES={"default": db}, INSTALLED_APPS=["django_pooled_pg"], USE_TZ=True,
    POOLED_PG_OPENTELEMETRY=True,
)
django.setup()
from django.db import connection

with connection.cursor() as cursor:
    cursor.execute("SELECT 1")
connection.close()
names = sorted(
    m.name
    for rm in reader.get_metrics_data().resource_metrics
    for sm in rm.scope_metrics
    for m in sm.metrics
)
print(json.dumps(names))
"""


def test_the_setting_reports_through_the_applications_provider(transactional_db: None) -> None:
    """POOLED_PG_OPENTELEMETRY = True: the app instruments the global provider it finds."""
    import json
    import subprocess
    import sys

    from django.db import connection

    s = connection.settings_dict
    db = {
        "ENGINE": "django_pooled_pg",
        "NAME": s["NAME"],
        "USER": s["USER"],
        "PASSWORD": s["PASSWORD"],
        "HOST": s["HOST"],
        "PORT": str(s["PORT"]),
        "OPTIONS": {"pool": {"max_size": 2}},
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == sorted(otel.INSTRUMENTS)


def test_a_second_provider_replaces_the_first_so_nothing_is_recorded_twice(
    make_wrapper: Make,
) -> None:
    first, second = InMemoryMetricReader(), InMemoryMetricReader()
    providers = [MeterProvider(metric_readers=[r]) for r in (first, second)]
    otel.instrument(providers[0])  # the setting's call at app load, say
    otel.instrument(providers[1])  # then the application's own
    try:
        w = make_wrapper(pool={"max_size": 2, "name": "two-providers"})
        w.ensure_connection()
        w.close()
        (p,) = points(collected(second)["db.client.connection.use_time"], "two-providers")
        assert p.count == 1
        assert "db.client.connection.use_time" not in collected(first)
    finally:
        otel.uninstrument(providers[1])
        for provider in providers:
            provider.shutdown()
