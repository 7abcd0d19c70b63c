"""The app: ``manage.py poolstats``, and the pools' Prometheus collector."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "django-pooled-pg"

    def ready(self) -> None:
        # With prometheus_client installed, an existing /metrics (the default
        # registry's) shows the pools; POOLED_PG_PROMETHEUS = False opts out.
        if not getattr(settings, "POOLED_PG_PROMETHEUS", True):
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            return
        from .metrics import register_default

        register_default()
