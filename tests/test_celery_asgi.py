"""Celery workers (prefork, threads) and Daphne, with Django Channels, as real processes.

Each server is started here and stopped with SIGTERM. The sessions on the
server are told apart by process: a pooled session's application_name
carries the pid of the process whose pool opened it.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from celery import Celery
from django.db import connection

from django_pooled_pg.base import CELERY_FIXUP
from django_pooled_pg.observability.activity import parse_application_name
from dpp_devtools.servers import free_port, get, start_server, stop_server, wait_serving
from testproject.celery_app import settings_for
from tests.helpers import wait_until

MAX_SIZE = 4


def sessions_by_process(admin: psycopg.Connection[Any], dbname: str) -> dict[int, dict[int, str]]:
    """{process pid: {backend pid: state}} of the pooled sessions on *dbname*."""
    found: dict[int, dict[int, str]] = defaultdict(dict)
    rows = admin.execute(
        "SELECT pid, application_name, state FROM pg_stat_activity WHERE datname = %s",
        [dbname],
    ).fetchall()
    for backend, name, state in rows:
        if parsed := parse_application_name(name):
            found[parsed[1]][backend] = state
    return found


def running(pid: int) -> bool:
    """Whether process *pid* exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class CeleryWorker:
    """A ``celery worker`` of testproject.celery_app and a client sending it tasks."""

    def __init__(self, proc: subprocess.Popen[str], data_dir: Path, report: Path) -> None:
        self.proc = proc
        self.report = report
        self.client = Celery("tests", set_as_current=False, fixups=[])
        self.client.conf.update(settings_for(data_dir))
        self.stderr = ""

    def send(self, task: str, *args: Any) -> Any:
        return self.client.send_task(f"demoapp.tasks.{task}", args=args)

    def call(self, task: str, *args: Any) -> Any:
        return self.send(task, *args).get(timeout=30, interval=0.02)

    def main_process(self) -> tuple[int, int]:
        """(pid, backend pid) of the worker's main process, from worker_init."""
        text = wait_until(
            lambda: self.report.exists() and self.report.read_text(),
            timeout=30,
            message=lambda: f"the worker's worker_init; stderr: {self._stderr_if_exited()}",
        )
        pid, backend = map(int, text.split())
        return pid, backend

    def _stderr_if_exited(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read() if self.proc.stderr else ""


@contextmanager
def celery_worker(tmp_path: Path, *options: str) -> Iterator[CeleryWorker]:
    data_dir = tmp_path / "celery"
    data_dir.mkdir()
    report = tmp_path / "worker_init.txt"
    proc = start_server(
        [
            "celery", "-A", "testproject.celery_app", "worker", "--loglevel", "warning",
            "--without-gossip", "--without-mingle", "--without-heartbeat", *options,
        ],
        PGDATABASE=connection.settings_dict["NAME"],  # the migrated test database
        POOL_MAX_SIZE=str(MAX_SIZE),
        CELERY_DATA_DIR=str(data_dir),
        CELERY_REPORT=str(report),
    )  # fmt: skip
    worker = CeleryWorker(proc, data_dir, report)
    try:
        yield worker
    except BaseException:
        if proc.poll() is None:
            worker.stderr = stop_server(proc)
        # In the report of the failing test: what the worker said.
        print(f"celery worker stderr:\n{worker.stderr[-5000:]}")
        raise
    finally:
        if proc.poll() is None:
            worker.stderr = stop_server(proc)  # SIGTERM: Celery's warm shutdown


def peak_while_running(
    admin: psycopg.Connection[Any], dbname: str, results: list[Any]
) -> dict[int, int]:
    """The most sessions each process had while *results* were pending."""
    peak: dict[int, int] = defaultdict(int)

    def done() -> bool:
        for pid, sessions in sessions_by_process(admin, dbname).items():
            peak[pid] = max(peak[pid], len(sessions))
        return all(r.ready() for r in results)

    wait_until(done, timeout=60, interval=0.02, message="the tasks to finish")
    return peak


@pytest.mark.slow
def test_celery_prefork_children_have_their_own_pools_and_leave_nothing_behind(
    transactional_db: None, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    dbname = connection.settings_dict["NAME"]
    with celery_worker(
        tmp_path, "--pool", "prefork", "--concurrency", "2", "--max-tasks-per-child", "5"
    ) as worker:
        main_pid, main_backend = worker.main_process()
        assert main_pid == worker.proc.pid

        pending = [worker.send("bump", f"n{i % 3}", 0.05) for i in range(24)]
        peak = peak_while_running(admin, dbname, pending)
        answers = [r.get(timeout=30) for r in pending]

        children = {a["pid"] for a in answers}
        assert main_pid not in children
        # --max-tasks-per-child 5: 24 tasks on 2 processes take at least 5 children.
        assert len(children) >= 5, children
        by_child: dict[int, set[int]] = defaultdict(set)
        for a in answers:
            by_child[a["pid"]].add(a["backend_pid"])
            assert a["in_use"] == 1  # the task's own connection only
            assert a["size"] <= MAX_SIZE
            # What the child inherited from the main process (worker_init's
            # connection at least), let go without I/O.
            assert a["closed"]["fork"] >= 1
        # No session passes from the main process to a child, or between children.
        assert main_backend not in set().union(*by_child.values())
        assert sum(map(len, by_child.values())) == len(set().union(*by_child.values()))
        assert all(n <= MAX_SIZE for n in peak.values()), peak
        # Celery's Django fix-up (5.6 and later) calls close_pool() at every
        # task boundary of a prefork child (celery/celery#10554); the engine
        # declines it (base.CELERY_FIXUP), so a child's tasks share its pool.
        tasks_per_child = Counter(a["pid"] for a in answers)
        for pid, n in tasks_per_child.items():
            if n >= 3:
                assert len(by_child[pid]) < n, (
                    f"child {pid} connected anew for each of its {n} tasks: Celery's fix-up "
                    f"closed its pool (has {CELERY_FIXUP} moved?)"
                )
        # Each task's checkouts are charged to it (poolstats --holders; a
        # hold is recorded at return, so a task sees its child's earlier ones).
        assert all(set(a["holders"]) <= {"task demoapp.tasks.bump"} for a in answers)
        assert max(a["holders"].get("task demoapp.tasks.bump", 0) for a in answers) >= 2

        # Between tasks the children hold no connection: Celery's Django
        # fixup closes the task's connection (task_postrun), which gives it back.
        for state in [worker.call("pool_state") for _ in range(4)]:
            assert state["in_use"] == 0, state

        # Children retire after 5 tasks, and their sessions close with them;
        # the main process's session was never used by a child and is still
        # there. (Two children at a time, so at most two end short of 5.)
        retired = {pid for pid, n in tasks_per_child.items() if n == 5}
        assert len(retired) >= 4, tasks_per_child
        wait_until(
            lambda: not any(map(running, retired)),
            timeout=10,
            interval=0.05,
            message="the children that ran 5 tasks to exit",
        )
        wait_until(
            lambda: not set(sessions_by_process(admin, dbname)) & retired,
            timeout=10,
            interval=0.05,
            message=lambda: f"no session of a retired child; {sessions_by_process(admin, dbname)}",
        )
        now = sessions_by_process(admin, dbname)
        assert main_backend in now[main_pid]
        assert all(state == "idle" for s in now.values() for state in s.values()), now

        worker.stderr = stop_server(worker.proc)
    assert worker.proc.returncode == 0, worker.stderr[-2000:]
    assert "Traceback" not in worker.stderr, worker.stderr[-2000:]
    # After the warm shutdown no session of the worker's processes is left.
    gone = {main_pid, *children}
    wait_until(
        lambda: not set(sessions_by_process(admin, dbname)) & gone,
        timeout=5,
        interval=0.05,
        message=lambda: f"the worker's sessions closed; {sessions_by_process(admin, dbname)}",
    )


@pytest.mark.slow
def test_celery_threads_share_one_pool_and_give_connections_back_between_tasks(
    transactional_db: None, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    dbname = connection.settings_dict["NAME"]
    with celery_worker(tmp_path, "--pool", "threads", "--concurrency", "4") as worker:
        main_pid, main_backend = worker.main_process()

        pending = [worker.send("bump", f"n{i % 3}", 0.05) for i in range(40)]
        peak = peak_while_running(admin, dbname, pending)
        answers = [r.get(timeout=30) for r in pending]

        assert {a["pid"] for a in answers} == {main_pid}  # one process, one pool
        assert len({a["thread"] for a in answers}) >= 2
        backends = {a["backend_pid"] for a in answers}
        # The main thread keeps the connection it took in worker_init; the
        # 4 task threads share the other MAX_SIZE - 1, returned after each task.
        assert main_backend not in backends
        assert len(backends) <= MAX_SIZE - 1, backends
        assert peak[main_pid] <= MAX_SIZE, peak
        assert all(a["opened"] <= MAX_SIZE for a in answers)

        # Quiet again: only worker_init's connection is out; the task threads
        # gave theirs back at task_postrun (sent just after a task's result
        # is stored, so a thread may still be about to).
        state = wait_until(
            lambda: (now := worker.call("pool_state"))["in_use"] == 1 and now,
            timeout=10,
            interval=0.05,
            message="the task threads' connections back in the pool",
        )
        assert state["checkouts"] == 1 + len(answers), state
        now = sessions_by_process(admin, dbname)[main_pid]
        assert main_backend in now
        assert all(s == "idle" for s in now.values()), now

        worker.stderr = stop_server(worker.proc)
    assert worker.proc.returncode == 0, worker.stderr[-2000:]
    assert "Traceback" not in worker.stderr, worker.stderr[-2000:]
    wait_until(
        lambda: main_pid not in sessions_by_process(admin, dbname),
        timeout=5,
        interval=0.05,
        message=lambda: f"the worker's sessions closed; {sessions_by_process(admin, dbname)}",
    )


async def burst(urls: list[str], requests: int, concurrency: int) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> httpx.Response:
            async with limit:
                return await client.get(urls[i % len(urls)], params={"name": f"n{i % 5}"})

        return await asyncio.gather(*(one(i) for i in range(requests)))


@contextmanager
def daphne(application: str, dbname: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    proc = start_server(
        ["daphne", "-v", "0", "-b", "127.0.0.1", "-p", str(port), application],
        PGDATABASE=dbname,
        POOL_MAX_SIZE=str(MAX_SIZE),
        POOL_OPTIONS_JSON='{"timeout": 5}',
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_serving(base + "/ping/", proc)
        yield base, proc
    finally:
        if proc.poll() is None:
            stop_server(proc)


def served_and_stopped(
    admin: psycopg.Connection[Any], dbname: str, proc: subprocess.Popen[str], responses: list[Any]
) -> None:
    """Every response was a 200; then SIGTERM leaves no session and no traceback."""
    failed = [(r.status_code, r.text[:300]) for r in responses if r.status_code != 200]
    assert not failed, failed[:3]
    stderr = stop_server(proc)
    assert "Traceback" not in stderr, stderr[-2000:]
    # Closed by the code that used it, not reclaimed after its thread ended.
    assert "thread ended without closing" not in stderr, stderr[-2000:]
    wait_until(
        lambda: proc.pid not in sessions_by_process(admin, dbname),
        timeout=5,
        interval=0.05,
        message=lambda: f"daphne's sessions closed; {sessions_by_process(admin, dbname)}",
    )


@pytest.mark.slow
def test_daphne_serves_sync_and_async_views_from_one_pool(
    transactional_db: None, admin: psycopg.Connection[Any]
) -> None:
    dbname = connection.settings_dict["NAME"]
    with daphne("testproject.asgi:application", dbname) as (base, proc):
        urls = [f"{base}/{view}/" for view in ("hit", "ping", "ahit", "athread")]
        peak = 0
        responses: list[httpx.Response] = []
        for _ in range(2):
            # Many more requests than connections: they must be returned to be reused.
            responses += asyncio.run(burst(urls, requests=120, concurrency=16))
            peak = max(peak, len(sessions_by_process(admin, dbname)[proc.pid]))
        assert 1 <= peak <= MAX_SIZE
        backends = {r.json()["backend_pid"] for r in responses if "backend_pid" in r.json()}
        assert {r.json()["pid"] for r in responses if r.status_code == 200} == {proc.pid}
        assert backends <= set(sessions_by_process(admin, dbname)[proc.pid])
        assert len(backends) <= MAX_SIZE
        now = sessions_by_process(admin, dbname)[proc.pid]
        assert all(state == "idle" for state in now.values()), now
        served_and_stopped(admin, dbname, proc, responses)


@pytest.mark.slow
def test_channels_consumers_run_orm_calls_on_pooled_connections_and_return_them(
    transactional_db: None, admin: psycopg.Connection[Any]
) -> None:
    dbname = connection.settings_dict["NAME"]
    with daphne("testproject.asgi_channels:application", dbname) as (base, proc):
        responses = asyncio.run(burst([f"{base}/channels/bump/"], requests=80, concurrency=16))
        bumps = [r.json() for r in responses]
        assert {b["pid"] for b in bumps} == {proc.pid}
        assert all(b["in_use"] >= 1 for b in bumps)
        backends = {b["backend_pid"] for b in bumps}
        sessions = sessions_by_process(admin, dbname)[proc.pid]
        assert backends <= set(sessions)
        assert len(sessions) <= MAX_SIZE
        # database_sync_to_async closed each call's connection afterwards
        # (close_old_connections), which gave it back: none is out now.
        assert get(f"{base}/channels/pool/") == {"pid": proc.pid, "in_use": 0}
        assert all(state == "idle" for state in sessions.values()), sessions
        # One at a time: the connection is back as soon as the call returns,
        # before the consumer answers.
        for _ in range(3):
            alone = get(f"{base}/channels/bump/")
            assert (alone["in_use"], alone["in_use_after"]) == (1, 0), alone
            assert alone["backend_pid"] in sessions  # one of the pool's sessions, reused

        # Django's own views beside the consumers, on the same pool.
        mixed = [f"{base}/channels/bump/", f"{base}/ahit/", f"{base}/athread/"]
        responses += asyncio.run(burst(mixed, requests=60, concurrency=16))
        assert len(sessions_by_process(admin, dbname)[proc.pid]) <= MAX_SIZE
        assert get(f"{base}/channels/pool/") == {"pid": proc.pid, "in_use": 0}
        served_and_stopped(admin, dbname, proc, responses)


def _produce(data_dir: str, n: int) -> None:
    """In a process of its own: *n* messages into the test broker's queue."""
    from kombu import Connection

    with Connection(**broker(Path(data_dir))) as conn:
        queue = conn.SimpleQueue("race")
        for i in range(n):
            queue.put({"i": i})


def broker(data_dir: Path) -> dict[str, Any]:
    conf = settings_for(data_dir)
    return {
        "hostname": conf["broker_url"],
        "transport": conf["broker_transport"],
        "transport_options": conf["broker_transport_options"],
    }


def test_the_test_broker_loses_no_message_to_a_worker_polling_meanwhile(tmp_path: Path) -> None:
    # kombu's own filesystem transport lost 106 of 3,000 this way (its
    # worker took files before their bytes were in): the Celery tests'
    # tasks must all arrive, or a test waits for one that never runs.
    import multiprocessing

    from kombu import Connection
    from kombu.transport import filesystem

    # celery_transport.py overrides kombu's private Channel._put (kombu 5.7):
    # if kombu renames it, the override is dead code and the race is back.
    assert "_put" in vars(filesystem.Channel), "kombu's filesystem Channel._put has moved"
    n = 2000
    producer = multiprocessing.get_context("spawn").Process(
        target=_produce, args=(str(tmp_path), n)
    )
    producer.start()
    received: list[int] = []
    with Connection(**broker(tmp_path)) as conn:
        queue = conn.SimpleQueue("race")
        deadline = time.monotonic() + 60
        while len(received) < n and time.monotonic() < deadline:
            try:
                message = queue.get(block=False)
            except queue.Empty:
                continue
            message.ack()
            received.append(message.payload["i"])
    producer.join(10)
    assert producer.exitcode == 0
    assert sorted(received) == list(range(n))
