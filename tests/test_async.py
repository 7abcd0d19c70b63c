"""Async views under a real ASGI server (uvicorn) with concurrent requests."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import psycopg
import pytest
from django.db import connection

from dpp_devtools.servers import free_port, start_server, stop_server, wait_serving
from tests.helpers import backend_pids, wait_until

MAX_SIZE = 4


async def burst(url: str, requests: int, concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> httpx.Response:
            async with limit:
                return await client.get(url, params={"name": f"n{i % 5}"})

        return await asyncio.gather(*(one(i) for i in range(requests)))


@pytest.mark.slow
def test_async_views_under_uvicorn_use_and_return_pooled_connections(
    transactional_db: None, admin: psycopg.Connection[Any]
) -> None:
    dbname = connection.settings_dict["NAME"]
    ours = backend_pids(admin, dbname)  # this process's own sessions
    port = free_port()
    proc = start_server(
        ["uvicorn", "testproject.asgi:application", "--port", str(port), "--log-level", "warning"],
        PGDATABASE=dbname,
        POOL_MAX_SIZE=str(MAX_SIZE),
        POOL_OPTIONS_JSON='{"timeout": 5}',
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_serving(base + "/ping/", proc)
        peak = 0
        for path in ("/ahit/", "/athread/"):
            # Many more requests than connections: they must be returned to be reused.
            responses = asyncio.run(burst(base + path, requests=120, concurrency=16))
            failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
            assert not failed, failed[:3]
            peak = max(peak, len(backend_pids(admin, dbname) - ours))
        assert 1 <= peak <= MAX_SIZE  # uvicorn's sessions: one pool of MAX_SIZE

        def sessions() -> list[tuple[int, str]]:
            rows = admin.execute(
                "SELECT pid, state FROM pg_stat_activity WHERE datname = %s", [dbname]
            ).fetchall()
            return [(pid, state) for pid, state in rows if pid not in ours]

        # Afterwards nothing is left checked out or in a transaction (a
        # request thread that ended is reclaimed within 1 s).
        wait_until(
            lambda: (now := sessions()) and all(state == "idle" for _, state in now),
            timeout=1.5,
            interval=0.05,
            message=lambda: f"uvicorn's sessions all idle; now {sessions()}",
        )
        assert proc.poll() is None
        # A second burst after the first still finds free connections at once.
        responses = asyncio.run(burst(base + "/ahit/", requests=40, concurrency=8))
        assert all(r.status_code == 200 for r in responses)
        assert all(r.elapsed.total_seconds() < 4 for r in responses)
    finally:
        stderr = stop_server(proc)
    assert "thread ended without closing" not in stderr, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
