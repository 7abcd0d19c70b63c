"""Helpers shared by the tests (plain functions; fixtures are in conftest).

Serving the test project with a real server (start_server, wait_serving,
stop_server, ...) is in ``dpp_devtools.servers``, shared with the benchmarks.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from django.db import connection

from dpp_devtools.throwaway import ThrowawayServer


def db_settings(**overrides: Any) -> dict[str, Any]:
    """The test database's settings, deep-copied, with *overrides* applied."""
    settings = copy.deepcopy(connection.settings_dict)
    settings.update(overrides)
    return settings


def private_settings(server: ThrowawayServer, **overrides: Any) -> dict[str, Any]:
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


class CheckedThread(threading.Thread):
    """A thread whose exception, a failed assertion included, fails the test:
    ``join()`` raises it in the joining thread (threads a test runs side by
    side; ``run_in_thread`` for one at a time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # handed to join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            error, self.error = self.error, None
            raise error


class Workers:
    """Threads running ``work(i)`` from ``with`` until the block ends; each
    thread's exception fails the test at the end of the block."""

    def __init__(self, threads: int) -> None:
        self.stopping = threading.Event()
        self._threads = [CheckedThread(target=self.work, args=(i,)) for i in range(threads)]

    def work(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self._threads:
            t.join(60)  # raises what the thread raised


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str | Callable[[], str] | None = None,
) -> Any:
    """Call *predicate* until it returns a truthy value; return that value.

    It is called at least once, and once more at the deadline, so what holds
    within *timeout* seconds is seen. Then an AssertionError says what was
    awaited (*message*; a callable is called then, to describe that moment)
    and the predicate's last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            what = message() if callable(message) else message
            raise AssertionError(
                f"timed out after {timeout} s waiting for "
                f"{what or getattr(predicate, '__qualname__', predicate)}; last value: {value!r}"
            )
        time.sleep(min(interval, left))


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


def children(pid: int) -> set[int]:
    """Live (not zombie) child processes of *pid*, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state not in ("Z", "X"):
            found.add(int(entry.name))
    return found


TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def run_poolstats(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``manage.py poolstats *args`` of the test project, run as an operator
    runs it (a separate process, with *env*); it must succeed."""
    result = subprocess.run(
        [sys.executable, "manage.py", "poolstats", *args],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result
