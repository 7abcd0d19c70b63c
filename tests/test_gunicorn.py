"""Real gunicorn workers forked from a master that already used the pool."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

from dpp_devtools.servers import free_port, get, start_server, stop_server, wait_serving
from tests.helpers import wait_until


def alive(admin: psycopg.Connection[Any], pid: int) -> bool:
    return (
        admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone() is not None
    )


@pytest.mark.slow
def test_preloaded_master_and_workers_keep_separate_sessions(
    transactional_db: None, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    port = free_port()
    report = tmp_path / "preload.txt"
    proc = start_server(
        [
            "gunicorn", "--preload", "-w", "2", "-k", "sync", "-b", f"127.0.0.1:{port}",
            "--graceful-timeout", "5", "testproject.wsgi_preload:application",
        ],
        PGDATABASE=connection.settings_dict["NAME"],  # the migrated test database
        PRELOAD_REPORT=str(report),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/ping/"
    try:
        wait_serving(url, proc)
        master_pid, master_backend = map(int, report.read_text().split())
        assert master_pid == proc.pid

        served = [get(url) for _ in range(40)]
        worker_backends = {r["backend_pid"] for r in served}
        workers = {r["pid"] for r in served}
        assert master_backend not in worker_backends  # each worker has its own pool
        assert master_pid not in workers
        assert len(worker_backends) <= 2 * 4  # at most max_size per worker
        assert alive(admin, master_backend)  # nothing was sent on the master's session

        # Replace the workers (HUP): the old ones exit, run atexit, are collected.
        proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: not {get(url)["pid"] for _ in range(6)} & workers,
            timeout=20,
            interval=0,
            message="only new workers serving",
        )
        for _ in range(10):
            assert get(url)["backend_pid"] != master_backend
        assert alive(admin, master_backend)
    finally:
        stderr = stop_server(proc)
    assert "Traceback" not in stderr, stderr
    # The master closed its pool and session at exit.
    wait_until(
        lambda: not alive(admin, master_backend),
        timeout=5,
        interval=0.05,
        message="the master's session closed",
    )
