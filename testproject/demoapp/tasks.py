"""Celery tasks (testproject.celery_app): ORM work on pooled connections.

Each answers with the process, thread and server session it ran on and its
process's pool as ``django_pooled_pg.stats()`` shows it.
"""

import os
import threading

from celery import shared_task
from django.db import connection, transaction
from django.db.models import F

import django_pooled_pg

from .models import Counter


def _pool() -> dict:
    stats = django_pooled_pg.stats("default")
    return {
        "pid": os.getpid(),
        "thread": threading.get_ident(),
        "open": stats.live.open,
        "size": stats.live.size,
        "in_use": stats.live.in_use,
        "opened": stats.counters.opened,
        "checkouts": stats.counters.checkouts,
        "checkout_wait_mean": stats.wait.mean,
        "closed": stats.closed_by_reason,
        # Who held this process's connections (poolstats --holders).
        "holders": {h.holder: h.checkouts for h in stats.holders},
    }


@shared_task
def bump(name: str, hold: float = 0.0) -> dict:
    """Read and write a counter, then hold the session *hold* seconds."""
    with transaction.atomic():
        counter, _ = Counter.objects.get_or_create(name=name)
        Counter.objects.filter(pk=counter.pk).update(hits=F("hits") + 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [hold])
        backend_pid = cursor.fetchone()[0]
    return {**_pool(), "backend_pid": backend_pid}


@shared_task
def pool_state() -> dict:
    """This process's pool, without using the database."""
    return _pool()
