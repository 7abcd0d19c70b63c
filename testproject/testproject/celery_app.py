"""Celery app of the test project: ``celery -A testproject.celery_app worker``.

No broker service: kombu's filesystem transport (celery_transport.py mends
a race in it that loses messages) carries the messages and
Celery's file result backend keeps the results, both under the directory in
CELERY_DATA_DIR (tests/test_celery_asgi.py gives each worker its own).

The worker's main process uses the database before it forks its pool
(``worker_init``), as an application whose start-up reads a setting from the
database does, and keeps that connection checked out: every prefork child
starts from a process whose pool holds a connection. CELERY_REPORT names a
file where that process writes its pid and that session's backend pid.
"""

import os
from pathlib import Path
from typing import Any

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "testproject.settings")


def settings_for(data_dir: Path) -> dict[str, Any]:
    """Celery settings for a broker and result store in *data_dir* (which exists)."""
    for sub in ("queue", "control", "processed", "results"):
        (data_dir / sub).mkdir(exist_ok=True)
    return {
        "broker_url": "filesystem://",
        # kombu's, writing each message whole before it appears (see there).
        "broker_transport": "testproject.celery_transport:Transport",
        "broker_transport_options": {
            # One folder both ways: producers and the worker share the queue.
            "data_folder_in": str(data_dir / "queue"),
            "data_folder_out": str(data_dir / "queue"),
            "control_folder": str(data_dir / "control"),
            "store_processed": True,
            "processed_folder": str(data_dir / "processed"),
            "polling_interval": 0.05,
        },
        "broker_connection_retry_on_startup": True,
        "result_backend": f"file://{data_dir / 'results'}",
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "worker_prefetch_multiplier": 1,
        "worker_enable_remote_control": False,
        "worker_hijack_root_logger": False,
    }


app = Celery("testproject", include=["demoapp.tasks"])
# Read when the configuration is first used, not at import.
app.add_defaults(lambda: settings_for(Path(os.environ["CELERY_DATA_DIR"])))


@signals.worker_init.connect
def use_the_database_before_forking(**kwargs: Any) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (backend_pid,) = cursor.fetchone()
    # Deliberately not closed: the pool forks with this connection checked out.
    if report := os.environ.get("CELERY_REPORT"):
        Path(report).write_text(f"{os.getpid()} {backend_pid}\n")
