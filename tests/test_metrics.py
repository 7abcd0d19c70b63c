"""Prometheus: the collector in the default registry, and the protected view."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from django.db import connection
from django.test import RequestFactory
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from django_pooled_pg.observability.prometheus import metrics_view
from django_pooled_pg.observability.records import HOSTNAME


def use_default() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    connection.close()


def samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


def test_the_default_registry_shows_the_pools(transactional_db: None) -> None:
    """An existing /metrics (prometheus_client's default registry, as
    django-prometheus serves it) includes the pools once the app is ready."""
    use_default()
    text = generate_latest(REGISTRY).decode()
    (checkouts,) = [
        s
        for s in samples(text, "django_pooled_pg_checkouts_total")
        if s.labels["alias"] == "default"
    ]
    assert checkouts.labels == {"alias": "default", "host": HOSTNAME, "pid": str(os.getpid())}
    assert checkouts.value >= 1
    buckets = samples(text, "django_pooled_pg_checkout_wait_seconds_bucket")
    assert any(s.labels["le"] == "+Inf" and s.value >= 1 for s in buckets)


def test_the_view_is_not_world_readable(transactional_db: None, settings: Any) -> None:
    use_default()
    factory = RequestFactory()
    anonymous = factory.get("/metrics/")
    anonymous.user = SimpleNamespace(is_staff=False, is_active=True)
    assert metrics_view(anonymous).status_code == 403

    staff = factory.get("/metrics/")
    staff.user = SimpleNamespace(is_staff=True, is_active=True)
    response = metrics_view(staff)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert samples(response.content.decode(), "django_pooled_pg_checkouts_total")

    settings.POOLED_PG_METRICS_TOKEN = "s3cret-token"
    wrong = factory.get("/metrics/", HTTP_AUTHORIZATION="Bearer nope")
    assert metrics_view(wrong).status_code == 403
    right = factory.get("/metrics/", HTTP_AUTHORIZATION="Bearer s3cret-token")
    body = metrics_view(right).content.decode()
    assert samples(body, "django_pooled_pg_connections_in_use")
    assert connection.settings_dict["PASSWORD"] not in body
