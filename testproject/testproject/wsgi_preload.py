"""WSGI entry for gunicorn --preload tests: the master uses the database first.

Many applications touch the database at import time (a settings lookup, a
cache warm-up). Under --preload that happens in the master, which then forks
the workers with a pool and a checked-out connection in hand.
"""

import os
import time

from django.db import connection

from .wsgi import application

with connection.cursor() as cursor:
    cursor.execute("SELECT pg_backend_pid()")
    MASTER_BACKEND_PID = cursor.fetchone()[0]
# Deliberately not closed: the master forks while holding it.

# Let the pool's threads finish what the first connection set going before
# a server that forks without Python's fork hooks (uWSGI's default) copies
# the process: a lock one of them held at that moment would stay held in
# the workers (tests/test_worker_models.py).
if settle := os.environ.get("PRELOAD_SETTLE"):
    time.sleep(float(settle))

if path := os.environ.get("PRELOAD_REPORT"):
    with open(path, "w") as f:
        f.write(f"{os.getpid()} {MASTER_BACKEND_PID}\n")

__all__ = ["application"]
