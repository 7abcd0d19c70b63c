import os

from django.db import connection, transaction
from django.db.models import F
from django.http import JsonResponse

from .models import Counter


def hit(request):
    """Read and write through the ORM, as a real view does."""
    name = request.GET.get("name", "demo")
    with transaction.atomic():
        counter, _ = Counter.objects.get_or_create(name=name)
        Counter.objects.filter(pk=counter.pk).update(hits=F("hits") + 1)
    counter.refresh_from_db()
    return JsonResponse({"name": name, "hits": counter.hits, "pid": os.getpid()})


def ping(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend_pid,) = cursor.fetchone()
    return JsonResponse({"backend_pid": backend_pid, "pid": os.getpid()})
