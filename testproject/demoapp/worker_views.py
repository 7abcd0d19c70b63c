"""A view for the worker-model tests (tests/test_worker_models.py).

``/sleep/?seconds=S`` checks a connection out of the pool, then holds it
while the server sleeps (``pg_sleep``): requests that overlap in one worker
show whether that worker's green threads (gevent) really run side by side
while they wait on PostgreSQL, and that they never hold more than the pool's
``max_size`` connections at once.
"""

import os
import time

from django.db import connection
from django.http import HttpRequest, JsonResponse
from psycopg import waiting


def sleep(request: HttpRequest) -> JsonResponse:
    seconds = float(request.GET.get("seconds", "0.5"))
    connection.ensure_connection()  # the checkout (it may wait for the pool)
    held_from = time.monotonic()  # one clock for the whole worker process
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [seconds])
        (backend_pid, _) = cursor.fetchone()
    return JsonResponse(
        {
            "pid": os.getpid(),
            "backend_pid": backend_pid,
            "held_from": held_from,
            "held_until": time.monotonic(),
            # How psycopg waits on the socket: wait_c blocks the whole process
            # (chosen when psycopg is imported before gevent patches select).
            "wait": getattr(waiting.wait, "__name__", repr(waiting.wait)),
        }
    )
