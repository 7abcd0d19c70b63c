"""A real multi-worker deployment: gunicorn workers seen through the stats cache.

One gunicorn (4 gthread workers) on the test project, publishing every
``INTERVAL`` seconds to a file-based cache that every process shares, is
started once for the module. ``manage.py poolstats`` runs as a separate
process, as an operator runs it, and reads the workers through that cache;
``/metrics/`` is scraped from each worker in turn and reports them all.
Nothing is mocked: workers are found as the master's children, killed with
SIGKILL, and their sessions looked up on the server.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from django_pooled_pg.observability.activity import host_hash
from django_pooled_pg.observability.records import HOSTNAME
from dpp_devtools.servers import free_port, start_server, stop_server, wait_serving
from tests.helpers import TESTPROJECT, children, run_poolstats, wait_until

pytestmark = pytest.mark.slow

WORKERS = 4
INTERVAL = 0.5  # seconds between two publications of a worker's stats
TOKEN = "deployment-test-metrics-token"
ALIAS = "default"


def rows(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The JSON document's processes of ALIAS, by pid (all on this host)."""
    out = {}
    for p in doc["aliases"][ALIAS]["processes"]:
        assert p["host"] == HOSTNAME, p["host"]
        assert p["pid"] not in out, f"pid {p['pid']} listed twice"
        out[p["pid"]] = p
    return out


def server_sessions(doc: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The server's view of ALIAS's sessions on this host, by process pid."""
    alias = doc["aliases"][ALIAS]
    assert alias["server_error"] is None, alias["server_error"]
    return {
        g["pid"]: g
        for g in alias["server"]["ours"]
        if g["alias"] == ALIAS and g["host"] in (HOSTNAME, host_hash(HOSTNAME))
    }


def metric_samples(text: str, name: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]


@dataclass
class Deployment:
    proc: subprocess.Popen[str]
    port: int
    env: dict[str, str]
    password: str
    outputs: list[str] = field(default_factory=list)  # every output, to look for the password

    # -- the workers -------------------------------------------------------

    def workers(self, deadline: float = 30) -> set[int]:
        """The master's WORKERS current workers (waits while one is replaced)."""

        def current() -> set[int] | None:
            assert self.proc.poll() is None, "gunicorn's master exited"
            found = children(self.proc.pid)
            return found if len(found) == WORKERS else None

        found: set[int] = wait_until(
            current,
            timeout=deadline,
            interval=0.05,
            message=lambda: f"{WORKERS} workers; gunicorn has {children(self.proc.pid)}",
        )
        return found

    def hit(self) -> int:
        """One request to /hit/ (ORM reads and writes); the worker's pid."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", "/hit/?name=deployment")
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        assert resp.status == 200, (resp.status, body[:500])
        return int(json.loads(body)["pid"])

    def serve(self, n: int, threads: int = 16) -> Counter[int]:
        """*n* concurrent requests; how many each worker pid served."""
        with ThreadPoolExecutor(threads) as pool:
            return Counter(pool.map(lambda _: self.hit(), range(n)))

    def serve_every_worker(self, n: int = 40, deadline: float = 30) -> Counter[int]:
        """At least *n* requests, more until every current worker served one."""
        served = self.serve(n)

        def every_worker_served() -> bool:
            if self.workers() <= set(served):
                return True
            served.update(self.serve(2 * WORKERS * 2))
            return False

        wait_until(
            every_worker_served,
            timeout=deadline,
            interval=0,
            message=lambda: (
                f"every worker serving; {self.workers() - set(served)} served nothing of {served}"
            ),
        )
        return served

    # -- poolstats, run as an operator runs it -------------------------------

    def poolstats(self, *args: str) -> str:
        result = run_poolstats(self.env, *args)
        self.outputs += [result.stdout, result.stderr]
        return result.stdout

    def poolstats_json(self) -> dict[str, Any]:
        doc = json.loads(self.poolstats("--json", "--database", ALIAS))
        assert doc["schema"] == 1
        assert doc["transport"] == {"cache": "stats", "shared": True, "error": None, "note": None}
        return doc

    def wait_stats(
        self, until: Callable[[dict[str, Any]], bool], what: str, deadline: float = 30
    ) -> dict[str, Any]:
        """poolstats --json, again until *until* holds for it."""

        def shown() -> dict[str, Any] | None:
            doc = self.poolstats_json()
            return doc if until(doc) else None

        def summary() -> str:
            now = rows(self.poolstats_json())
            return f"poolstats to show {what}; now: " + str(
                {pid: (p["time"], p["counters"]["checkouts"]) for pid, p in now.items()}
            )

        doc: dict[str, Any] = wait_until(
            shown, timeout=deadline, interval=INTERVAL / 2, message=summary
        )
        return doc

    def wait_fresh(self, workers: set[int], since: float) -> dict[str, Any]:
        """poolstats once it shows exactly *workers*, each with stats taken
        after *since* (a time.time())."""
        return self.wait_stats(
            lambda d: set(rows(d)) == workers and all(p["time"] > since for p in rows(d).values()),
            f"exactly workers {sorted(workers)} with stats newer than {since}",
        )

    # -- /metrics/ ----------------------------------------------------------

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            return _get(conn, path, headers)
        finally:
            conn.close()

    def on_one_connection(
        self, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, tuple[int, str, str]]:
        """GET *path* on a keep-alive connection after a /hit/ on it: the pid
        of the worker that served both (a connection stays with the worker
        that accepted it), and the response."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            status, _, body = _get(conn, "/hit/?name=deployment")
            assert status == 200, body
            sock = conn.sock
            response = _get(conn, path, headers)
            # http.client reconnects silently: this proves it did not.
            assert sock is not None and conn.sock is sock, "the server closed the connection"
            return int(json.loads(body)["pid"]), response
        finally:
            conn.close()


def _get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()


# The tests take transactional_db only to have the rows the workers wrote
# flushed afterwards, as every test on the test database does.


@pytest.fixture(scope="module")
def deployment(
    django_db_setup: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    s = connection.settings_dict  # the migrated test database
    env = {
        "PGHOST": s["HOST"],
        "PGPORT": str(s["PORT"]),
        "PGUSER": s["USER"],
        "PGPASSWORD": s["PASSWORD"],
        "PGDATABASE": s["NAME"],
        "DPP_STATS_CACHE_DIR": str(tmp_path_factory.mktemp("stats-cache")),
        "DPP_STATS_INTERVAL": str(INTERVAL),
        "DPP_METRICS_TOKEN": TOKEN,
        "DATABASE_URL": "",  # the PG* above name the test database
    }
    port = free_port()
    proc = start_server(
        [
            "gunicorn", "-w", str(WORKERS), "-k", "gthread", "--threads", "2",
            "-b", f"127.0.0.1:{port}", "--graceful-timeout", "5",
            "testproject.wsgi:application",
        ],
        **env,
    )  # fmt: skip
    # manage.py poolstats runs with what the workers were given.
    full_env = {**os.environ, "PYTHONPATH": str(TESTPROJECT), **env}
    full_env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    dep = Deployment(proc, port, full_env, s["PASSWORD"])
    try:
        wait_serving(f"http://127.0.0.1:{port}/ping/", proc)
        dep.workers()
        yield dep
    finally:
        stderr = stop_server(proc)
    # SIGKILLed workers are expected; a traceback is not.
    assert "Traceback" not in stderr, stderr
    dep.outputs.append(stderr)
    assert_no_password(dep)


def assert_no_password(dep: Deployment) -> None:
    """The database password is in no output seen so far."""
    if dep.password:
        for text in dep.outputs:
            assert dep.password not in text


def test_poolstats_shows_every_gunicorn_worker_and_totals(
    deployment: Deployment, transactional_db: None
) -> None:
    dep = deployment
    served = dep.serve(200)
    workers = dep.workers()
    # 200 requests from 16 threads reach every worker; if the kernel was
    # unfair, more requests until it is so.
    if workers - set(served):
        served += dep.serve_every_worker()
    assert set(served) == workers
    done = time.time()

    doc = dep.wait_fresh(workers, since=done)
    default = doc["aliases"][ALIAS]
    procs = rows(doc)
    max_size = connection.settings_dict["OPTIONS"]["pool"]["max_size"]
    assert default["config"]["max_size"] == max_size
    for pid, p in procs.items():
        assert p["alias"] == ALIAS and p["config"]["max_size"] == max_size
        live, c = p["live"], p["counters"]
        assert live["open"] and live["in_use"] == 0 and live["waiting"] == 0
        assert 1 <= live["size"] <= max_size and live["idle"] <= live["size"]
        assert c["checkouts"] >= served[pid]  # every /hit/ checks out at least once
        assert c["timeouts"] == c["rejected"] == c["errors"] == c["leaks"] == 0
        assert p["hold"]["count"] == c["checkouts"]
    assert sum(p["counters"]["checkouts"] for p in procs.values()) >= sum(served.values())

    # The totals are the sum of the rows.
    totals, listed = default["totals"], list(procs.values())
    assert totals["processes"] == WORKERS
    for key in ("size", "idle", "in_use", "waiting"):
        assert totals[key] == sum(p["live"][key] for p in listed), key
    for key in ("oldest_checkout", "longest_wait"):
        assert totals[key] == max(p["live"][key] for p in listed), key
    for key, value in totals["counters"].items():
        assert value == sum(p["counters"][key] for p in listed), key
    for reason, value in totals["closed_by_reason"].items():
        assert value == sum(p["closed_by_reason"].get(reason, 0) for p in listed), reason
    for dist in ("wait", "hold", "connect"):
        t = totals[dist]
        assert t["count"] == sum(p[dist]["count"] for p in listed), dist
        assert t["buckets"] == [
            sum(b) for b in zip(*(p[dist]["buckets"] for p in listed), strict=True)
        ]
        assert math.isclose(t["sum"], sum(p[dist]["sum"] for p in listed), rel_tol=1e-9)
        assert t["max"] == max(p[dist]["max"] for p in listed)

    # The server's view: each worker's sessions, by application_name, none
    # left idle in a transaction.
    sessions = server_sessions(doc)
    assert workers <= set(sessions), sessions
    for pid in workers:
        g = sessions[pid]
        total = g["active"] + g["idle"] + g["idle_in_transaction"] + g["other"]
        assert 1 <= total <= max_size, g
        assert g["idle_in_transaction"] == 0, g

    # The table: a row per worker and the total, then each worker's sessions.
    table = dep.poolstats("--database", ALIAS)
    pools, _, server = table.partition("\n  server (")
    assert "Other processes: read from cache 'stats'." in pools.splitlines()
    pool_lines = [line.strip() for line in pools.splitlines()]
    server_lines = [line.strip() for line in server.splitlines()]
    for pid in workers:
        assert any(line.startswith(f"{HOSTNAME}:{pid} ") for line in pool_lines), (pid, table)
        assert any(
            line.startswith((f"{HOSTNAME}:{pid} ", f"{host_hash(HOSTNAME)}:{pid} "))
            for line in server_lines
        ), (pid, table)
    assert any(line.startswith(f"total, {WORKERS} processes") for line in pool_lines), table
    assert_no_password(dep)


def test_a_dead_worker_ages_out(deployment: Deployment, transactional_db: None) -> None:
    dep = deployment
    dep.serve_every_worker()
    workers = dep.workers()
    dep.wait_fresh(workers, since=time.time())
    victim = max(workers)

    os.kill(victim, signal.SIGKILL)
    killed = time.time()
    now = wait_until(
        lambda: victim not in (found := dep.workers()) and found,
        timeout=30,
        interval=0.05,
        message="gunicorn to replace the killed worker",
    )
    (replacement,) = now - workers
    assert now == workers - {victim} | {replacement}

    # Three intervals after its last publication (at the latest, its death)
    # the dead worker's slot is stale: from then on poolstats never shows it.
    # The replacement has served nothing, so it has no pool and is not shown.
    time.sleep(max(0.0, killed + 3 * INTERVAL + 0.1 - time.time()))  # it ages out

    def survivors_only(d: dict[str, Any]) -> bool:
        shown = set(rows(d))
        assert victim not in shown and replacement not in shown, shown
        return shown == workers - {victim}

    dep.wait_stats(survivors_only, f"the survivors of {sorted(workers)}")
    # Its sessions ended with it.
    dep.wait_stats(
        lambda d: victim not in server_sessions(d), f"no session of the dead worker {victim}"
    )

    served = wait_until(
        lambda: replacement in (s := dep.serve(2 * WORKERS)) and s,
        timeout=30,
        interval=0,
        message="the replacement worker to serve a request",
    )
    doc = dep.wait_fresh(now, since=time.time())
    assert rows(doc)[replacement]["counters"]["checkouts"] >= served[replacement]
    assert replacement in server_sessions(doc)
    assert_no_password(dep)


def test_metrics_view_reports_every_worker_from_any_worker(
    deployment: Deployment, transactional_db: None
) -> None:
    dep = deployment
    dep.serve_every_worker()
    workers = dep.workers()
    dep.wait_fresh(workers, since=time.time())

    assert dep.get("/metrics/")[0] == 403
    assert dep.get("/metrics/", {"Authorization": "Bearer not-the-token"})[0] == 403

    def check(text: str) -> None:
        dep.outputs.append(text)
        checkouts = metric_samples(text, "django_pooled_pg_checkouts_total")
        mine = [s for s in checkouts if s.labels["alias"] == ALIAS]
        assert {int(s.labels["pid"]) for s in mine} == workers, mine
        assert len(mine) == WORKERS
        for s in mine:
            assert s.labels["host"] == HOSTNAME and s.value >= 1, s

    # A scrape lands on whichever worker accepts its connection: learn which
    # with a /hit/ on the same keep-alive connection, and scrape (at least 8
    # times) until every worker has answered one. Each reports them all.
    scraped_by: Counter[int] = Counter()

    def scrape() -> bool:
        pid, (status, content_type, text) = dep.on_one_connection(
            "/metrics/", {"Authorization": f"Bearer {TOKEN}"}
        )
        assert status == 200, text
        assert content_type.startswith("text/plain"), content_type
        check(text)
        scraped_by[pid] += 1
        return len(scraped_by) >= WORKERS and scraped_by.total() >= 8

    wait_until(
        scrape,
        timeout=30,
        interval=0,
        message=lambda: f"scrapes to reach every worker; reached {scraped_by}",
    )
    assert set(scraped_by) == workers

    check(dep.poolstats("--format", "prometheus", "--database", ALIAS))
    assert_no_password(dep)


def test_poolstats_holders_merges_every_worker(
    deployment: Deployment, transactional_db: None
) -> None:
    """Each worker charges /hit/ to its view; poolstats --holders sums the workers."""
    dep = deployment
    dep.serve_every_worker()
    workers = dep.workers()
    doc = dep.wait_fresh(workers, since=time.time())
    per_process = [
        next((h for h in p["holders"] if h["holder"] == "demoapp.views.hit"), None)
        for p in rows(doc).values()
    ]
    assert all(h is not None and h["checkouts"] >= 1 for h in per_process), per_process

    merged = json.loads(dep.poolstats("--holders", "--json", "--database", ALIAS))
    hit = next(h for h in merged["aliases"][ALIAS] if h["holder"] == "demoapp.views.hit")
    # Stats published since doc was read may add checkouts, never remove any.
    assert hit["checkouts"] >= sum(h["checkouts"] for h in per_process if h is not None)
    assert hit["hold"]["count"] == hit["checkouts"]

    table = dep.poolstats("--holders", "--database", ALIAS)
    assert f"{ALIAS}  {WORKERS} processes" in table, table
    assert any(line.strip().startswith("demoapp.views.hit ") for line in table.splitlines())
    assert_no_password(dep)


def test_poolstats_advise_sizes_the_gunicorn_workers_against_the_server(
    deployment: Deployment, admin: Any, transactional_db: None
) -> None:
    """Under load, --advise reads every worker and the server's real limit."""
    dep = deployment
    dep.serve(200)
    workers = dep.workers()
    dep.wait_fresh(workers, since=time.time())
    max_connections = int(admin.execute("SHOW max_connections").fetchone()[0])
    reserved = int(admin.execute("SHOW superuser_reserved_connections").fetchone()[0])

    doc = json.loads(dep.poolstats("--advise", "--json", "--database", ALIAS))
    adv = doc["aliases"][ALIAS]
    max_size = connection.settings_dict["OPTIONS"]["pool"]["max_size"]
    assert adv["processes"] == WORKERS and adv["max_size"] == max_size
    assert adv["limit"] == max_connections - reserved
    assert adv["deployment_needs"] == WORKERS * max_size
    # 16 client threads on 4 workers of 2 threads: at most 2 in use per worker.
    assert adv["checkouts_per_second"] > 0 and 0 < adv["in_use_mean"] <= 2
    assert 1 <= adv["recommended_max_size"] <= max_size + 2
    assert adv["processes_that_fit"] >= 1 and not adv["over_limit"]

    table = dep.poolstats("--advise", "--database", ALIAS)
    assert f"{ALIAS}  recommended max_size per process: {adv['recommended_max_size']}" in table
    assert "Little's law" in table and f"{WORKERS} processes publishing stats" in table
    assert_no_password(dep)
