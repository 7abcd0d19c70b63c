"""Helpers shared by the tests (plain functions; fixtures are in conftest)."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from django.db import connection

import throwaway_pg


def db_settings(**overrides: Any) -> dict[str, Any]:
    """The test database's settings, deep-copied, with *overrides* applied."""
    settings = copy.deepcopy(connection.settings_dict)
    settings.update(overrides)
    return settings


def private_settings(server: throwaway_pg.ThrowawayServer, **overrides: Any) -> dict[str, Any]:
    """Settings for the private cluster's ``private`` database."""
    s = db_settings(
        NAME="private",
        HOST=server.host,
        PORT=str(server.port),
        USER=server.user,
        PASSWORD=server.password,
    )
    s["TEST"] = {**s["TEST"], "NAME": "private"}
    s.update(overrides)
    return s


def backend_pids(admin: psycopg.Connection[Any], dbname: str, state: str | None = None) -> set[int]:
    """Server-side pids of the sessions on *dbname* (other than *admin*)."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
    params: list[Any] = [dbname]
    if state:
        query += " AND state = %s"
        params.append(state)
    return {row[0] for row in admin.execute(query, params)}


def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Run *fn* in a new thread; return its result or raise its exception."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(60)
    if "error" in box:
        raise box["error"]
    return box.get("result")


def wsgi_get(path: str) -> Any:
    """One request through Django's real WSGI handler (request_started and
    request_finished fire, unlike with the test Client); the JSON body."""
    import json
    from wsgiref.util import setup_testing_defaults

    from django.core.handlers.wsgi import WSGIHandler

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = WSGIHandler()(environ, lambda s, h, exc_info=None: status.append(s))
    try:
        data = b"".join(body)
    finally:
        body.close()  # sends request_finished
    assert status[0].startswith("200"), (status, data[:500])
    return json.loads(data)


# -- the test project served by a real server process (gunicorn, uvicorn) ----

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> Any:
    """GET *url*; its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def start_server(argv: list[str], **env: str) -> subprocess.Popen[str]:
    """``python -m <argv>`` in the test project, with *env* added to ours."""
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=TESTPROJECT,
        env={
            **os.environ,
            "PYTHONPATH": str(TESTPROJECT),
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_serving(url: str, proc: subprocess.Popen[str], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            get(url)
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("the server did not start serving")


def stop_server(proc: subprocess.Popen[str]) -> str:
    """SIGTERM (a graceful stop), SIGKILL after 20 s; the server's stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, stderr = proc.communicate()
    return stderr or ""
