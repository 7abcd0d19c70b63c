"""The app: ``manage.py poolstats``, publishing stats, and the Prometheus collector."""

from __future__ import annotations

import contextlib
import sys
import threading
from contextvars import Token
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import request_started

from . import holders


class PooledPgConfig(AppConfig):
    name = "django_pooled_pg"
    verbose_name = "django-pooled-pg"

    def ready(self) -> None:
        from . import registry
        from .observability.publisher import ensure_publishing

        # Each process with an open pool publishes its stats for poolstats
        # (when POOLED_PG_STATS names a shared cache).
        registry.on_pool_opened(ensure_publishing)
        # A worker forked in C (uWSGI without its fork hooks) lets the
        # master's pools go at its first request.
        request_started.connect(registry.check_fork, dispatch_uid="django_pooled_pg.fork")
        # Who holds the connections (pool option holders): this process's
        # management command, and in a Celery worker each task.
        if command := holders.command_from_argv(sys.argv):
            # The main thread's context, for good (servers excluded: their
            # tasks would all inherit the one name; the stack tells better).
            holders.enter(command)
        if "celery" in sys.modules:
            _charge_celery_tasks()
        # One warning at a pool's first connection if the deployment's pools
        # together can exceed the server's max_connections.
        from .observability.sizing import check_at_first_connection, prepare
        from .pool import FIRST_CONNECTION_HOOKS

        prepare()
        if check_at_first_connection not in FIRST_CONNECTION_HOOKS:
            FIRST_CONNECTION_HOOKS.append(check_at_first_connection)
        # OpenTelemetry: opt in (POOLED_PG_OPENTELEMETRY = True), [otel] extra.
        if getattr(settings, "POOLED_PG_OPENTELEMETRY", False):
            try:
                from .observability.otel import instrument
            except ImportError:
                raise ImproperlyConfigured(
                    "POOLED_PG_OPENTELEMETRY is on but opentelemetry-api is not installed: "
                    "pip install 'django-pooled-pg[otel]'."
                ) from None
            instrument()
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


# By task id and thread: the same id can run twice at once (a redelivery).
_task_tokens: dict[tuple[str, int], Token[holders.Holder | None]] = {}


def _charge_celery_tasks() -> None:
    """Charge each Celery task's checkouts to ``task <name>`` (a worker has celery loaded)."""
    try:
        from celery import signals
    except ImportError:
        return

    def prerun(task_id: str = "", task: Any = None, **_: Any) -> None:
        _task_tokens[task_id, threading.get_ident()] = holders.task_started(task)

    def postrun(task_id: str = "", **_: Any) -> None:
        if (token := _task_tokens.pop((task_id, threading.get_ident()), None)) is not None:
            # ValueError: set in another context (an executor we do not know).
            with contextlib.suppress(ValueError):
                holders.leave(token)

    signals.task_prerun.connect(prerun, weak=False, dispatch_uid="django_pooled_pg.holders")
    signals.task_postrun.connect(postrun, weak=False, dispatch_uid="django_pooled_pg.holders")
