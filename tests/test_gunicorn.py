"""Real gunicorn workers forked from a master that already used the pool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def wait_serving(url: str, proc: subprocess.Popen[str], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("gunicorn did not start serving")


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
    env = {
        **os.environ,
        "PYTHONPATH": str(TESTPROJECT),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        "PGDATABASE": connection.settings_dict["NAME"],  # the migrated test database
        "PRELOAD_REPORT": str(report),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "-w",
            "2",
            "-k",
            "sync",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            "testproject.wsgi_preload:application",
        ],
        cwd=TESTPROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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
        deadline = time.monotonic() + 20
        new_workers: set[int] = set()
        while time.monotonic() < deadline and not (new_workers and not new_workers & workers):
            new_workers = {get(url)["pid"] for _ in range(6)}
        assert new_workers and not new_workers & workers
        for _ in range(10):
            assert get(url)["backend_pid"] != master_backend
        assert alive(admin, master_backend)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
    assert "Traceback" not in stderr, stderr
    # The master closed its pool and session at exit.
    deadline = time.monotonic() + 5
    while alive(admin, master_backend) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(admin, master_backend)
