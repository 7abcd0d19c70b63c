from django.db import connection
from django.http import JsonResponse

from .models import Note


def notes(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    texts = list(Note.objects.order_by("text").values_list("text", flat=True))
    return JsonResponse({"texts": texts, "backend_pid": pid, "pooled": connection.pool is not None})
