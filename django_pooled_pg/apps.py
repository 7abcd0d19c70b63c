"""The app: ``manage.py poolstats``, publishing stats, and the Prometheus collector."""

from __future__ import annotations

from django.apps import AppConfig
from django.conf import settings


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "django-pooled-pg"

    def ready(self) -> None:
        from . import registry
        from .observability.publisher import ensure_publishing

        # Each process with an open pool publishes its stats for poolstats
        # (when POOLED_PG_STATS names a shared cache).
        registry.on_pool_opened(ensure_publishing)
        # With prometheus_client installed, an existing /metrics (the default
        # registry's) shows the pools; POOLED_PG_PROMETHEUS = False opts out.
        if not getattr(settings, "POOLED_PG_PROMETHEUS", True):
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            return
        from .observability.prometheus import register_default

        register_default()
