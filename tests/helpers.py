"""Helpers shared by the tests (plain functions; fixtures are in conftest)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
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
