"""Async views: Django's async ORM and sync_to_async code on pooled connections."""

import os

from asgiref.sync import sync_to_async
from django.db import connection
from django.db.models import F
from django.http import JsonResponse

from .models import Counter


async def ahit(request):
    """Django's async ORM calls (each runs in Django's thread for sync code)."""
    name = request.GET.get("name", "async")
    counter, _ = await Counter.objects.aget_or_create(name=name)
    await Counter.objects.filter(pk=counter.pk).aupdate(hits=F("hits") + 1)
    total = await Counter.objects.acount()
    names = [c.name async for c in Counter.objects.filter(name=name)]
    return JsonResponse({"name": names[0], "total": total, "pid": os.getpid()})


def _backend_pid():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.01)")
        return cursor.fetchone()[0]


async def athread(request):
    """Sync ORM code called through sync_to_async, as Django documents it."""
    backend_pid = await sync_to_async(_backend_pid)()
    return JsonResponse({"backend_pid": backend_pid, "pid": os.getpid()})
