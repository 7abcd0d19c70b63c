"""Django Channels consumers (testproject.asgi_channels): ORM work through
``database_sync_to_async``, which closes old connections before and after
each call, so the connection goes back to the pool in between."""

import json
import os

from channels.db import database_sync_to_async
from channels.generic.http import AsyncHttpConsumer
from django.db import connection, transaction
from django.db.models import F

import django_pooled_pg

from .models import Counter


def _in_use() -> int:
    return django_pooled_pg.stats("default").live.in_use


@database_sync_to_async
def _bump(name: str) -> dict:
    with transaction.atomic():
        counter, _ = Counter.objects.get_or_create(name=name)
        Counter.objects.filter(pk=counter.pk).update(hits=F("hits") + 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(0.01)")
        backend_pid = cursor.fetchone()[0]
    return {"backend_pid": backend_pid, "pid": os.getpid(), "in_use": _in_use()}


class _JsonConsumer(AsyncHttpConsumer):
    async def answer(self, data: dict) -> None:
        await self.send_response(
            200, json.dumps(data).encode(), headers=[(b"Content-Type", b"application/json")]
        )


class BumpConsumer(_JsonConsumer):
    """A counter bumped through the ORM; the session that did it, and the
    connections out of the pool during and after the call."""

    async def handle(self, body: bytes) -> None:
        name = self.scope["query_string"].decode().partition("name=")[2] or "channels"
        done = await _bump(name)
        # Back on the event loop: the call's connection is in the pool again.
        await self.answer({**done, "in_use_after": _in_use()})


class PoolConsumer(_JsonConsumer):
    """This process's pool, read on the event loop without using the database."""

    async def handle(self, body: bytes) -> None:
        await self.answer({"pid": os.getpid(), "in_use": _in_use()})
