"""WSGI worker models served for real: gunicorn sync and gevent, uWSGI.

Each test starts the server on the test project, sends concurrent requests
that go through the ORM, and checks from outside what each process did:

- the server's ``pg_stat_activity`` tells whose each session is (the pool
  puts ``dpp:<host>:<pid>:<alias>`` in ``application_name``): no worker holds
  more than ``max_size`` sessions, and the master's session, when the master
  loaded the app and used the database before forking, stays the master's;
- ``manage.py poolstats --json``, run as a separate process and reading the
  workers through a shared file cache, shows nothing left in use, nobody
  waiting, no timeout or error;
- after a graceful stop every session of those processes is gone from the
  server and the server's stderr holds no traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

from dpp_devtools.servers import free_port, project_dir, start_server, wait_serving
from tests.helpers import children, run_poolstats, wait_until

pytestmark = pytest.mark.slow

ALIAS = "default"
INTERVAL = 0.5  # seconds between two publications of a process's stats
#: The pool's tail of application_name: dpp:<host or its hash>:<pid>:<alias>.
OWNER = re.compile(r"dpp:[^:]*:(\d+):([^:]+)$")


def sessions_by_process(admin: psycopg.Connection[Any], dbname: str) -> dict[int, set[int]]:
    """The pooled sessions of ALIAS on *dbname*: backend pids by client process pid."""
    found: dict[int, set[int]] = defaultdict(set)
    for backend, name in admin.execute(
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = %s", [dbname]
    ):
        if (m := OWNER.search(name or "")) and m[2] == ALIAS:
            found[int(m[1])].add(backend)
    return dict(found)


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals that are open at one moment."""
    return max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)


@dataclass
class Served:
    """A server process on the test project, with the environment it was given."""

    proc: subprocess.Popen[str]
    port: int
    env: dict[str, str]  # the server's whole environment, for manage.py
    stderr: str = ""
    timeout: float = 30  # seconds a request may take
    responses: list[dict[str, Any]] = field(default_factory=list)

    def get(self, path: str) -> dict[str, Any]:
        """GET *path*; its JSON (a status other than 200 raises)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=self.timeout) as resp:
            assert resp.status == 200
            body: dict[str, Any] = json.load(resp)
        self.responses.append(body)
        return body

    def load(self, paths: list[str], threads: int) -> list[dict[str, Any]]:
        """GET each of *paths* from *threads* client threads at once."""
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self.get, paths))

    def poolstats(self) -> dict[int, dict[str, Any]]:
        """``manage.py poolstats --json`` from a separate process: ALIAS's
        processes (all on this host), by pid."""
        doc = json.loads(run_poolstats(self.env, "--json", "--database", ALIAS).stdout)
        assert doc["transport"]["shared"], doc["transport"]
        return {p["pid"]: p for p in doc["aliases"][ALIAS]["processes"]}

    def stop(self, sig: int = signal.SIGTERM) -> str:
        """Stop gracefully with *sig*; the stderr (SIGKILL after 30 s fails)."""
        self.proc.send_signal(sig)
        try:
            _, self.stderr = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, self.stderr = self.proc.communicate()
            raise AssertionError(f"the server did not stop on {sig!r}: {self.stderr}") from None
        return self.stderr


def project_env(tmp_path: Path, max_size: int, **extra: str) -> dict[str, str]:
    """What the server and manage.py are given: the migrated test database,
    a pool of *max_size*, stats published to a file cache they share."""
    s = connection.settings_dict
    return {
        "PGHOST": s["HOST"],
        "PGPORT": str(s["PORT"]),
        "PGUSER": s["USER"],
        "PGPASSWORD": s["PASSWORD"],
        "PGDATABASE": s["NAME"],
        "DATABASE_URL": "",  # the PG* above name the test database
        "POOL_MAX_SIZE": str(max_size),
        "DPP_STATS_CACHE_DIR": str(tmp_path / "stats-cache"),
        "DPP_STATS_INTERVAL": str(INTERVAL),
        **extra,
    }


def full_env(env: dict[str, str]) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(project_dir()),
        "DJANGO_SETTINGS_MODULE": "testproject.settings",
        **env,
    }


@pytest.fixture
def serve(transactional_db: None) -> Iterator[Any]:
    """Start a server: ``serve("gunicorn", argv, env)`` or ``serve("uwsgi", ...)``.

    Servers still running at the end are killed (the test has failed).
    """
    started: list[Served] = []

    def start(kind: str, argv: list[str], env: dict[str, str], ready: bool = True) -> Served:
        port = free_port()
        argv = [a.replace("{port}", str(port)) for a in argv]
        if kind == "gunicorn":
            proc = start_server(["gunicorn", *argv], **env)
        else:  # pyuwsgi's console script, run by this interpreter
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys, pyuwsgi; sys.exit(pyuwsgi.run())", *argv],
                cwd=project_dir(),
                env=full_env(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # its workers outlive a killed master
            )
        served = Served(proc, port, full_env(env))
        started.append(served)
        if ready:  # a request through the ORM answered
            wait_serving(f"http://127.0.0.1:{port}/ping/", proc, deadline=60)
        else:  # it accepts connections
            wait_until(lambda: accepts(port), timeout=60, interval=0.1, message="the server")
        return served

    yield start
    for served in started:
        if served.proc.poll() is None:
            if served.proc.pid == os.getpgid(served.proc.pid):  # uWSGI: master and workers
                os.killpg(served.proc.pid, signal.SIGKILL)
            else:  # gunicorn's workers exit when their master is gone
                served.proc.kill()
            _, stderr = served.proc.communicate(timeout=30)
            print(f"stderr of the server on port {served.port}:\n{stderr}")  # for the report


def requests(n: int) -> list[str]:
    """*n* requests through the ORM, in turn: /hit/ (reads and writes in a
    transaction), /ping/ (the session's backend pid), /sleep/ (holds the
    connection 0.1 s, so that clients pile up and every worker gets some)."""
    paths = ["/hit/?name=workers", "/ping/", "/sleep/?seconds=0.1"]
    return [paths[i % 3] for i in range(n)]


def load_every_worker(served: Served, n: int, threads: int, workers: int) -> None:
    """*n* requests from *threads* clients, again until each of the server's
    *workers* (its child processes) has answered one."""

    def every_worker_served() -> bool:
        current = children(served.proc.pid)
        assert len(current) == workers, current
        if current <= {r["pid"] for r in served.responses}:
            return True
        served.load(requests(n), threads)
        return False

    served.load(requests(n), threads)
    wait_until(every_worker_served, timeout=60, interval=0, message="every worker serving")


def check_served(
    served: Served,
    admin: psycopg.Connection[Any],
    max_size: int,
    master: tuple[int, int] | None,
) -> set[int]:
    """After a load: the workers (pids that answered) kept to their own pools
    of at most *max_size* sessions, the *master* (pid, backend pid) kept its
    session, and poolstats shows nothing left in use. Returns the workers."""
    dbname = connection.settings_dict["NAME"]
    workers = {r["pid"] for r in served.responses}
    backends: dict[int, set[int]] = defaultdict(set)
    for r in served.responses:
        if "backend_pid" in r:
            backends[r["pid"]].add(r["backend_pid"])
    sessions = sessions_by_process(admin, dbname)
    for pid in workers:
        # What the worker used, and what the server says it holds.
        assert 1 <= len(backends[pid]) <= max_size, (pid, backends)
        assert backends[pid] <= sessions.get(pid, set()), (pid, backends[pid], sessions)
        assert len(sessions[pid]) <= max_size, (pid, sessions)
    if master is not None:
        master_pid, master_backend = master
        assert master_pid == served.proc.pid and master_pid not in workers
        # The master keeps the session it forked with (and its pool's others).
        assert master_backend in sessions[master_pid], sessions
        assert len(sessions[master_pid]) <= max_size, sessions
        for pid in workers:
            assert not backends[pid] & sessions[master_pid], (pid, backends, sessions)
    else:  # the master never touched the database
        assert served.proc.pid not in sessions, sessions
    # A worker that answered nothing holds no more (this test's own
    # process holds sessions too: only the server's count).
    for pid in children(served.proc.pid):
        assert len(sessions.get(pid, ())) <= max_size, (pid, sessions)

    done = time.time()
    hits = sum(1 for r in served.responses if "hits" in r)
    assert hits > 0

    def fresh() -> dict[int, dict[str, Any]] | None:
        rows = served.poolstats()
        ok = workers <= set(rows) and all(rows[pid]["time"] > done for pid in workers)
        return rows if ok else None

    rows = wait_until(fresh, timeout=30, interval=INTERVAL / 2, message="fresh stats of workers")
    for pid in workers:
        p = rows[pid]
        live, c = p["live"], p["counters"]
        assert p["config"]["max_size"] == max_size
        assert live["in_use"] == 0 and live["waiting"] == 0, (pid, live)
        assert 1 <= live["size"] <= max_size, (pid, live)
        assert c["timeouts"] == c["rejected"] == c["errors"] == c["leaks"] == 0, (pid, c)
        assert c["checkouts"] >= sum(1 for r in served.responses if r["pid"] == pid)
    return workers


def check_stopped(
    served: Served, admin: psycopg.Connection[Any], processes: set[int], sig: int
) -> None:
    """Stop *served* with *sig*: it exits cleanly and the *processes* (its
    master and workers) leave no session behind."""
    stderr = served.stop(sig)
    assert served.proc.returncode == 0, (served.proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert served.env["PGPASSWORD"] not in stderr
    dbname = connection.settings_dict["NAME"]
    wait_until(
        lambda: not processes & set(sessions_by_process(admin, dbname)),
        timeout=10,
        interval=0.05,
        message=lambda: f"no session of {processes}: {sessions_by_process(admin, dbname)}",
    )


def read_master(report: Path) -> tuple[int, int]:
    """The (pid, backend pid) that testproject.wsgi_preload wrote in the master."""
    wait_until(
        lambda: report.exists() and report.read_text().endswith("\n"),
        timeout=60,
        interval=0.05,
        message="the master to load the app",
    )
    pid, backend = map(int, report.read_text().split())
    return pid, backend


# -- gunicorn ---------------------------------------------------------------


def test_gunicorn_sync_workers_need_a_pool_of_one(
    serve: Any, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """Sync workers serve one request at a time: max_size=1 is enough, also
    under --preload with a master that holds its own session."""
    report = tmp_path / "master.txt"
    env = project_env(tmp_path, max_size=1, PRELOAD_REPORT=str(report))
    served = serve(
        "gunicorn",
        [
            "--preload", "-k", "sync", "-w", "2", "-b", "127.0.0.1:{port}",
            "--graceful-timeout", "10", "testproject.wsgi_preload:application",
        ],
        env,
    )  # fmt: skip
    master = read_master(report)
    load_every_worker(served, 40, threads=4, workers=2)  # more clients than workers
    workers = check_served(served, admin, 1, master)
    assert len(workers) == 2
    check_stopped(served, admin, workers | {master[0]}, signal.SIGTERM)


def test_gevent_worker_overlaps_queries_up_to_max_size(
    serve: Any, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """One gevent worker, more green connections than max_size: requests that
    hold a connection while the server sleeps run side by side, two at a
    time (psycopg 3 waits through gevent's patched select), never more."""
    env = project_env(tmp_path, max_size=2)
    served = serve(
        "gunicorn",
        [
            "-k", "gevent", "-w", "1", "--worker-connections", "20", "-b", "127.0.0.1:{port}",
            "--graceful-timeout", "10", "testproject.wsgi:application",
        ],
        env,
    )  # fmt: skip
    seconds = 1.0
    started = time.monotonic()
    slept = served.load([f"/sleep/?seconds={seconds}"] * 6, threads=6)
    elapsed = time.monotonic() - started
    (worker,) = {r["pid"] for r in slept}
    assert {r["wait"] for r in slept} != {"wait_c"}, slept  # a green wait function
    # Six sleeps on two connections: three rounds of two, not six in a row.
    assert overlap([(r["held_from"], r["held_until"]) for r in slept]) == 2, slept
    assert len({r["backend_pid"] for r in slept}) == 2, slept
    assert elapsed < 5 * seconds, elapsed

    load_every_worker(served, 40, threads=8, workers=1)
    workers = check_served(served, admin, 2, master=None)
    assert workers == {worker}
    check_stopped(served, admin, workers | {served.proc.pid}, signal.SIGTERM)


# -- uWSGI ------------------------------------------------------------------

#: Two processes of two threads each, answering HTTP themselves; with
#: --die-on-term SIGTERM stops them (without it, uWSGI 2.0 reloads on SIGTERM).
UWSGI = [
    "--master", "--processes", "2", "--enable-threads", "--threads", "2",
    "--http-socket", "127.0.0.1:{port}", "--need-app", "--die-on-term",
    "--disable-logging",
]  # fmt: skip
#: uWSGI forks in C: without this, CPython's at-fork hooks (os.register_at_fork,
#: which the engine's fork safety rests on) do not run in the workers.
FORK_HOOKS = "--py-call-uwsgi-fork-hooks"


def test_uwsgi_forks_workers_from_a_master_that_used_the_pool(
    serve: Any, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """uWSGI's default: the master loads the app (here it also runs a query
    and keeps the connection), then forks. Each worker starts its own pool;
    the master's session is never used by a worker."""
    report = tmp_path / "master.txt"
    env = project_env(tmp_path, max_size=2, PRELOAD_REPORT=str(report))
    served = serve(
        "uwsgi", [*UWSGI, FORK_HOOKS, "--module", "testproject.wsgi_preload:application"], env
    )
    master = read_master(report)
    load_every_worker(served, 60, threads=8, workers=2)
    workers = check_served(served, admin, 2, master)
    assert len(workers) == 2
    check_stopped(served, admin, workers | {master[0]}, signal.SIGTERM)


def test_uwsgi_lazy_apps_load_the_app_in_each_worker(
    serve: Any, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """--lazy-apps: each worker imports the app after the fork; the master
    never opens a pool or a session."""
    env = project_env(tmp_path, max_size=2)
    served = serve(
        "uwsgi", [*UWSGI, "--lazy-apps", "--module", "testproject.wsgi:application"], env
    )
    load_every_worker(served, 60, threads=8, workers=2)
    workers = check_served(served, admin, 2, master=None)
    assert len(workers) == 2
    check_stopped(served, admin, workers | {served.proc.pid}, signal.SIGTERM)


def test_uwsgi_without_fork_hooks_keeps_workers_off_the_masters_pool(
    serve: Any, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """uWSGI's default without --py-call-uwsgi-fork-hooks: no at-fork hook
    runs in the worker. One thread per worker serves on the main thread,
    whose Django wrapper the master used: the worker's first request lets
    the master's pool and connection go (registry.check_fork on
    request_started) and says so once; it never uses the master's."""
    report = tmp_path / "master.txt"
    env = project_env(tmp_path, max_size=2, PRELOAD_REPORT=str(report))
    # No stats publisher thread in the master: without the fork hooks, a lock
    # any other thread of the master holds at the fork stays held in the
    # worker (the hazard the warning names), which is not what this tests.
    del env["DPP_STATS_CACHE_DIR"]
    env["PRELOAD_SETTLE"] = "0.5"  # and the pool's threads idle at the fork
    served = serve(
        "uwsgi",
        [
            "--master", "--processes", "1", "--enable-threads", "--http-socket",
            "127.0.0.1:{port}", "--need-app", "--die-on-term", "--disable-logging",
            "--module", "testproject.wsgi_preload:application",
        ],
        {**env, "POOL_OPTIONS_JSON": json.dumps({"timeout": 2})},  # fail fast
        ready=False,
    )  # fmt: skip
    master_pid, master_backend = read_master(report)
    served.timeout = 5  # a checkout fails after 2 s
    for _ in range(4):
        served.get("/ping/")  # an error status raises
        served.get("/hit/?name=workers")
    (worker,) = {r["pid"] for r in served.responses}
    assert worker != master_pid
    used = {r["backend_pid"] for r in served.responses if "backend_pid" in r}
    sessions = sessions_by_process(admin, connection.settings_dict["NAME"])
    assert used and used <= sessions[worker] and len(sessions[worker]) <= 2, (used, sessions)
    assert master_backend in sessions[master_pid] and master_backend not in used
    stderr = served.stop(signal.SIGTERM)
    assert stderr.count("was forked without Python's fork hooks") == 1, stderr[-3000:]
    assert "--py-call-uwsgi-fork-hooks" in stderr
