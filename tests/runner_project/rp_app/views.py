from django.db import connection
from django.http import JsonResponse

from .models import Note


def notes(request):
    """The committed notes, read through the ORM, and the session that read them."""
    texts = list(Note.objects.order_by("text").values_list("text", flat=True))
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_database()")
        pid, dbname = cursor.fetchone()
    return JsonResponse(
        {"texts": texts, "backend_pid": pid, "db": dbname, "pooled": connection.pool is not None}
    )
