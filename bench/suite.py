#!/usr/bin/env python3
"""The benchmark suite: every connection strategy side by side, one command.

    .venv/bin/python bench/suite.py                 # everything (about 15 minutes)
    .venv/bin/python bench/suite.py --quick         # fewer rounds, shorter runs
    .venv/bin/python bench/suite.py --scenarios cycle oversubscribed

Each measurement runs in a fresh process with one database alias, so no
strategy pays for another's aliases (Django's request signals visit every
alias). Strategies are interleaved within each round and rounds repeated;
tables give medians and ratios to a persistent connection. Results go to
``bench/results/suite.json`` and, with matplotlib (``pip install -e .[bench]``),
``docs/bench.png``. A server comes from ``DATABASE_URL``/``PG*``, else a
throwaway cluster starts (TCP, password authentication).

Scenarios:
  cycle           a Django request cycle running SELECT 1; 1, 4 and 16 threads
                  with max_size = threads, and 1 thread with max_size=2
  dirty           the request cycle with a SET in every request (1 and 4 threads):
                  reset_session="auto" resets as True does
  interleaved     checkout, SELECT 1 and return per strategy in one process,
                  alternating batches (clean and dirty): the finest comparison
  classifier      what "auto" costs: classifying a statement (first time, cached),
                  the hook per execute(), the reported parameters read at return
  oversubscribed  32 threads on max_size=4: throughput, checkout wait p50/p99, timeouts
  spike           min_size=5, max_size=10, connection set-up slowed to 150 ms,
                  50 requests at once holding their connection 2 ms
  e2e             the test project under gunicorn (2 gthread workers x 4 threads,
                  max_size=4) loaded by wrk from outside (bench/e2e.py; needs
                  wrk: apt-get install wrk)
  pgbouncer       the request cycle (1 and 4 threads) with ours directly and through
                  PgBouncer (session; transaction with the pgbouncer option), the
                  session reset's cost there, and Django without a pool and
                  persistent connections through PgBouncer (needs pgbouncer)
  soak            one million request cycles on the defaults: RSS and connections
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tables import md

from dpp_devtools import throwaway
from dpp_devtools.strategies import POOLER_STRATEGIES, POOLS, STRATEGIES, available, database

ROOT = Path(__file__).resolve().parent.parent


# -- the worker: one strategy, one scenario, in its own process ---------------


def setup(
    strategy: str,
    min_size: int,
    max_size: int,
    port: str | None = None,
    pool: dict[str, Any] | None = None,
) -> None:
    from django.conf import settings

    server = throwaway.database_settings()
    if port:
        server["PORT"] = port
    db = database(strategy, server, min_size=min_size, max_size=max_size, pool=pool)
    settings.configure(
        DATABASES={"default": db},
        USE_TZ=True,
        TIME_ZONE="UTC",
        INSTALLED_APPS=[],
    )
    import django

    django.setup()


class ServerSessions:
    """Samples the database's client sessions (other than its own) every 50 ms."""

    def __init__(self, only_this_process: bool = False) -> None:
        import psycopg

        s = throwaway.database_settings()
        self.conn = psycopg.connect(
            host=s["HOST"],
            port=s["PORT"],
            user=s["USER"],
            password=s["PASSWORD"],
            dbname=s["NAME"],
            autocommit=True,
        )
        # Our sessions name their process (application_name "dpp:host:pid:alias"):
        # with only_this_process, other clients of the server are not counted.
        self.pattern = f"%dpp:%:{os.getpid()}:%" if only_this_process else "%"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
            "AND coalesce(application_name, '') LIKE %s",
            [self.pattern],
        ).fetchone()
        return int(row[0]) if row else 0

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def request(hold: float = 0.0, timed: list[float] | None = None, change: bool = False) -> None:
    """One request as Django's handler runs it: signals around a query (after a
    SET that changes the session, with *change*)."""
    from django.core.signals import request_finished, request_started
    from django.db import connection

    request_started.send(sender=None)
    try:
        if timed is not None:
            t0 = time.perf_counter()
            connection.ensure_connection()
            timed.append(time.perf_counter() - t0)
        with connection.cursor() as cursor:
            if change:
                cursor.execute("SET work_mem = '8MB'")
            cursor.execute("SELECT 1")
            cursor.fetchone()
        if hold:
            time.sleep(hold)
    finally:
        request_finished.send(sender=None)


def request_on(c: Any) -> Callable[[], None]:
    """One request on the connection wrapper *c* (request signals around a
    SELECT 1), for scenarios that alternate aliases in one process."""
    from django.core.signals import request_finished, request_started

    def run() -> None:
        request_started.send(sender=None)
        try:
            with c.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchone()
        finally:
            request_finished.send(sender=None)

    return run


def run_threads(threads: int, body: Any) -> float:
    """Run body(index) in *threads* threads released together; the elapsed time."""
    from django.db import connections

    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            body(i, barrier)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connections.close_all()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def worker_cycle(args: dict[str, Any]) -> dict[str, Any]:
    threads, n = args["threads"], args["requests"]
    setup(
        args["strategy"],
        args["max_size"],
        args["max_size"],
        port=args.get("port"),
        pool=args.get("pool"),
    )

    change = bool(args.get("change"))

    def body(i: int, barrier: threading.Barrier) -> None:
        for _ in range(50):
            request(change=change)  # warm: connections open, statements cached
        barrier.wait()
        for _ in range(n):
            request(change=change)

    # One request first, outside the CPU count: the ENGINE module is imported
    # and the pool opened at the first use of the alias (one-off costs of
    # tens of milliseconds, which would weigh on the per-request figure).
    from django.db import connections

    request(change=change)
    connections.close_all()
    sessions = ServerSessions()
    cpu = time.process_time()
    elapsed = run_threads(threads, body)
    cpu = time.process_time() - cpu
    return {
        "rps": threads * n / elapsed,
        # This process's CPU per request: the client side's cost, steadier
        # than throughput on a busy machine (the warm-up is included).
        "cpu_us": 1e6 * cpu / (threads * (n + 50)),
        "server_connections": sessions.stop(),
    }


def worker_oversubscribed(args: dict[str, Any]) -> dict[str, Any]:
    from django.db import OperationalError

    threads, n = args["threads"], args["requests"]
    setup(args["strategy"], args["max_size"], args["max_size"])
    waits: list[list[float]] = [[] for _ in range(threads)]
    timeouts = [0] * threads

    def body(i: int, barrier: threading.Barrier) -> None:
        request()
        barrier.wait()
        for _ in range(n):
            try:
                request(timed=waits[i])
            except OperationalError:
                timeouts[i] += 1

    sessions = ServerSessions()
    elapsed = run_threads(threads, body)
    every = [w for ws in waits for w in ws]
    return {
        "rps": (threads * n - sum(timeouts)) / elapsed,
        "wait_p50": percentile(every, 0.50),
        "wait_p99": percentile(every, 0.99),
        "timeouts": sum(timeouts),
        "server_connections": sessions.stop(),
    }


def worker_spike(args: dict[str, Any]) -> dict[str, Any]:
    from dpp_devtools.proxy import Proxy

    s = throwaway.database_settings()
    proxy = Proxy(s["HOST"], int(s["PORT"]), connect_delay=0.15)
    setup(args["strategy"], 5, 10, port=str(proxy.port))
    from django.db import connections

    sessions = ServerSessions()
    # Warm: the pool open with its min_size connections, as after start-up
    # (no request yet, which would itself grow the pool).
    pool = getattr(connections["default"], "pool", None)
    if pool is not None:
        pool.open(wait=True, timeout=30)
    else:  # django-db-connection-pool opens on demand
        request()
        connections.close_all()
    latencies: list[float] = [0.0] * 50

    def body(i: int, barrier: threading.Barrier) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        request(hold=0.002)
        latencies[i] = time.perf_counter() - t0

    run_threads(50, body)
    time.sleep(1.0)  # connections the pool was still opening arrive
    ends_with = sessions.now()
    peak = sessions.stop()
    proxy.close()
    return {
        "ends_with": ends_with,
        "server_connections": peak,
        "latency_p50": percentile(latencies, 0.5),
        "latency_p99": percentile(latencies, 0.99),
        "latency_max": max(latencies),
    }


def worker_soak(args: dict[str, Any]) -> dict[str, Any]:
    import resource

    setup(args["strategy"], 1, 2)
    sessions = ServerSessions(only_this_process=True)
    samples = []
    total, step = args["requests"], max(args["requests"] // 10, 1)
    for i in range(total):
        request()
        if i % step == step - 1:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * resource.getpagesize() / 2**20
            samples.append({"requests": i + 1, "rss_mb": rss, "sessions": sessions.now()})
    sessions.stop()
    return {"samples": samples}


def worker_classifier(args: dict[str, Any]) -> dict[str, Any]:
    """What reset_session="auto" costs per statement and per request, in-process."""
    import timeit

    setup("ours (defaults)", 1, 1)
    from django.db import connection

    from django_pooled_pg import statements, watch

    def per_call(fn: Any, number: int) -> float:
        return min(timeit.repeat(fn, number=number, repeat=7)) / number

    orm = [
        'SELECT "demoapp_counter"."id", "demoapp_counter"."name", "demoapp_counter"."hits" '
        'FROM "demoapp_counter" WHERE "demoapp_counter"."name" = %s LIMIT 21',
        'INSERT INTO "demoapp_counter" ("name", "hits", "updated") VALUES (%s, %s, %s) '
        'RETURNING "demoapp_counter"."id"',
        'UPDATE "demoapp_counter" SET "hits" = ("demoapp_counter"."hits" + %s) '
        'WHERE "demoapp_counter"."name" = %s',
        'SELECT COUNT(*) AS "__count" FROM "demoapp_counter" WHERE "demoapp_counter"."hits" >= %s',
    ]
    classify = statements.may_change_session.__wrapped__  # uncached
    first = statistics.median(per_call(lambda q=q: classify(q), 2000) for q in orm)
    statements.may_change_session(orm[0])
    cached = per_call(lambda: statements.may_change_session(orm[0]), 200_000)

    connection.ensure_connection()
    raw = connection.connection
    pgconn = raw.pgconn
    net = per_call(lambda: watch.reported_parameters(pgconn), 50_000)
    info = raw.info
    names = [n.decode() for n in watch.REPORTED_PARAMETERS]
    via_info = per_call(lambda: [info.parameter_status(n) for n in names], 20_000)

    # The hook per statement: execute()'s generator made through the wrapper
    # (watching this connection) and through psycopg's own function.
    cur = raw.cursor()
    hooked = type(cur)._execute_gen
    original = hooked.__wrapped__
    raw._dpp_clean = True
    through_hook = per_call(lambda: hooked(cur, orm[0]).close(), 100_000)
    direct = per_call(lambda: original(cur, orm[0]).close(), 100_000)
    return {
        "classify_first_us": first * 1e6,
        "classify_cached_ns": cached * 1e9,
        "parameter_net_us": net * 1e6,
        "parameter_net_via_info_us": via_info * 1e6,
        "hook_per_statement_ns": (through_hook - direct) * 1e9,
    }


def alternate(runs: dict[str, Any], args: dict[str, Any]) -> dict[str, float]:
    """Median microseconds per call of each of *runs* (name: callable), warmed,
    then timed in alternating batches with the starting point rotated."""
    import timeit

    for run in runs.values():
        for _ in range(300):
            run()  # warm
    batch = args.get("batch", 200)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for r in range(args.get("rounds", 40)):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            times[name].append(timeit.timeit(runs[name], number=batch) / batch)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


#: The strategies the "interleaved" scenario runs side by side in one process.
INTERLEAVED = (
    "persistent",
    "django pool",
    "ours (defaults)",
    "ours reset_session=False",
    "ours reset_session=True",
)


def worker_interleaved(args: dict[str, Any]) -> dict[str, Any]:
    """Checkout, SELECT 1 and return on one alias per strategy, in one process,
    alternating batches: the finest interleaving there is, so drift on a
    noisy machine falls on every strategy alike. Each alias is used on its
    own (no request signals, which would visit every alias)."""

    from django.conf import settings

    server = throwaway.database_settings()
    aliases = {f"s{i}": name for i, name in enumerate(INTERLEAVED)}
    dbs = {a: database(n, server, min_size=1, max_size=1) for a, n in aliases.items()}
    settings.configure(
        DATABASES={"default": dbs["s0"], **dbs}, USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[]
    )
    import django

    django.setup()
    from django.db import connections

    change = bool(args.get("change"))

    def cycle(alias: str) -> Any:
        c = connections[alias]
        persistent = aliases[alias] == "persistent"

        def run() -> None:
            c.ensure_connection()
            with c.cursor() as cursor:
                if change:
                    cursor.execute("SET work_mem = '8MB'")
                cursor.execute("SELECT 1")
                cursor.fetchone()
            if not persistent:
                c.close()

        return run

    return alternate({aliases[a]: cycle(a) for a in aliases}, args)


#: The holders settings the "holders" scenario runs side by side in one process.
HOLDERS = {
    "holders=False": False,
    "holders=True, request's view known": True,
    "holders=True, unknown": True,
    "holders='stack', stack walk": "stack",
}


def worker_holders(args: dict[str, Any]) -> dict[str, Any]:
    """What charging checkouts to holders costs: a checkout made by cursor()
    and its return through Django's wrapper on one alias per setting,
    alternating batches (as "interleaved"), each alias in a context of its
    own. "known" runs inside a holder cell entered once, as a request behind
    HolderMiddleware, a Celery task or a command does; the others outside
    one: "unknown" charges (unknown), "stack walk" walks the stack from the
    cursor up to this module at each checkout."""
    import contextvars
    import timeit

    from django.conf import settings

    server = throwaway.database_settings()
    aliases = {f"h{i}": name for i, name in enumerate(HOLDERS)}
    dbs = {
        a: database("ours (defaults)", server, min_size=1, max_size=1, pool={"holders": HOLDERS[n]})
        for a, n in aliases.items()
    }
    settings.configure(
        DATABASES={"default": dbs["h0"], **dbs}, USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[]
    )
    import django

    django.setup()
    from django.db import connections

    from django_pooled_pg import holders

    def cycle(alias: str) -> Any:
        c = connections[alias]

        def run() -> None:
            # A checkout where a query makes it (in cursor(), which a walk
            # climbs back up from) and its return, without the query: its
            # round trip would drown the difference in the machine's noise.
            c.cursor().close()
            c.close()

        # Each alias runs in a context of its own; "known" has a holder cell
        # entered there once, as a request's is before its checkouts (what
        # entering costs, once per request, is measured alone below).
        context = contextvars.copy_context()
        if "view known" in aliases[alias]:
            context.run(holders.enter, "bench.view")
        return lambda: context.run(run)

    out = alternate({aliases[a]: cycle(a) for a in aliases}, args)

    # A whole request's worth, for the settings as a request without a
    # known holder meets them.
    unnamed = [a for a, n in aliases.items() if "view known" not in n]
    per_request = alternate({aliases[a]: request_on(connections[a]) for a in unnamed}, args)
    out.update({f"request: {n}": us for n, us in per_request.items()})
    # The parts alone: entering a holder cell (per request, not per
    # checkout), and what a checkout asks when a cell is set.
    n = 200_000
    out["enter and leave a holder cell (us)"] = (
        min(timeit.repeat(lambda: holders.leave(holders.enter("x")), number=n, repeat=5)) / n * 1e6
    )
    token = holders.enter("x")
    out["holder() with a cell (us)"] = (
        min(timeit.repeat(lambda: holders.holder(True), number=n, repeat=5)) / n * 1e6
    )
    holders.leave(token)
    # The walk alone, at a checkout's depth: timed around each call.
    spent = [0, 0]
    walk = holders.from_stack

    def timed() -> str:
        t0 = time.perf_counter_ns()
        try:
            return walk()
        finally:
            spent[0] += time.perf_counter_ns() - t0
            spent[1] += 1

    stack_walk = cycle(next(a for a, n in aliases.items() if n.endswith("stack walk")))
    holders.from_stack = timed
    try:
        for _ in range(20_000):
            stack_walk()
    finally:
        holders.from_stack = walk
    out["the stack walk of such a checkout (us)"] = spent[0] / spent[1] / 1000
    return out


WORKERS = {
    "interleaved": worker_interleaved,
    "holders": worker_holders,
    "classifier": worker_classifier,
    "cycle": worker_cycle,
    "oversubscribed": worker_oversubscribed,
    "spike": worker_spike,
    "soak": worker_soak,
}


# -- the orchestrator ----------------------------------------------------------


def measure(scenario: str, **args: Any) -> dict[str, Any]:
    payload = json.dumps({"scenario": scenario, **args})
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", payload],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{scenario} {args}: {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}\n\n{md(header, rows)}")


def run_cycle(strategies: list[str], rounds: int, requests: int) -> dict[str, Any]:
    cases = [(1, 1), (1, 2), (4, 4), (16, 16)]
    out: dict[str, Any] = {}
    for threads, size in cases:
        key = f"{threads} thread{'s' if threads > 1 else ''}, max_size={size}"
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
        for r in range(rounds):
            order = strategies[r % len(strategies) :] + strategies[: r % len(strategies)]
            for strategy in order:  # interleaved, starting point rotated
                n = max(requests // threads, 200)
                if strategy == "connect per request":
                    n = max(n // 40, 20)
                runs[strategy].append(
                    measure("cycle", strategy=strategy, threads=threads, max_size=size, requests=n)
                )
        persistent = median_of(runs["persistent"], "rps")
        out[key] = {}
        rows = []
        for strategy in strategies:
            rps = median_of(runs[strategy], "rps")
            out[key][strategy] = {
                "median_rps": rps,
                "ratio_to_persistent": rps / persistent,
                "us_per_request": 1e6 * threads / rps,
                "client_cpu_us": median_of(runs[strategy], "cpu_us"),
                "server_connections": max(r["server_connections"] for r in runs[strategy]),
                "runs": [r["rps"] for r in runs[strategy]],
            }
            rows.append(
                [
                    strategy,
                    f"{rps:,.0f}",
                    f"{1e6 * threads / rps:.1f}",
                    f"{rps / persistent:.3f}",
                    f"{out[key][strategy]['client_cpu_us']:.1f}",
                    str(out[key][strategy]["server_connections"]),
                ]
            )
        table(
            f"request cycle, {key} (medians of {rounds})",
            ["strategy", "req/s", "us/req", "x persistent", "client CPU us/req", "server conns"],
            rows,
        )
    return out


def run_dirty(rounds: int, requests: int) -> dict[str, Any]:
    """Every request changes the session (a SET): "auto" resets as True does."""
    names = [
        "persistent",
        "django pool",
        "ours (defaults)",
        "ours reset_session=True",
        "ours reset_session=False",
    ]
    out: dict[str, Any] = {}
    for threads in (1, 4):
        key = f"{threads} thread{'s' if threads > 1 else ''}, max_size={threads}"
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
        for r in range(rounds):
            for strategy in names[r % len(names) :] + names[: r % len(names)]:
                runs[strategy].append(
                    measure(
                        "cycle",
                        strategy=strategy,
                        threads=threads,
                        max_size=threads,
                        requests=max(requests // threads, 200),
                        change=True,
                    )
                )
        true = median_of(runs["ours reset_session=True"], "rps")
        persistent = median_of(runs["persistent"], "rps")
        out[key] = {}
        rows = []
        for strategy in names:
            rps = median_of(runs[strategy], "rps")
            out[key][strategy] = {
                "median_rps": rps,
                "ratio_to_persistent": rps / persistent,
                "ratio_to_reset_true": rps / true,
                "client_cpu_us": median_of(runs[strategy], "cpu_us"),
                "runs": [x["rps"] for x in runs[strategy]],
            }
            rows.append(
                [
                    strategy,
                    f"{rps:,.0f}",
                    f"{rps / persistent:.3f}",
                    f"{rps / true:.3f}",
                    f"{out[key][strategy]['client_cpu_us']:.1f}",
                ]
            )
        table(
            f"dirty requests (SET work_mem, then SELECT 1), {key} (medians of {rounds}; "
            "persistent and reset_session=False keep the SET)",
            ["strategy", "req/s", "x persistent", "x reset_session=True", "client CPU us/req"],
            rows,
        )
    return out


def run_interleaved(rounds: int) -> dict[str, Any]:
    """Fine-grained interleaving in one process, clean and dirty requests."""
    out: dict[str, Any] = {}
    for change in (False, True):
        key = "dirty (SET, then SELECT 1)" if change else "clean (SELECT 1)"
        runs = [measure("interleaved", change=change) for _ in range(rounds)]
        us = {n: statistics.median(r[n] for r in runs) for n in INTERLEAVED}
        out[key] = us
        rows = [
            [
                n,
                f"{us[n]:.1f}",
                f"{us['persistent'] / us[n]:.3f}",
                f"{us['ours reset_session=False'] / us[n]:.3f}",
                f"{us['django pool'] / us[n]:.3f}",
            ]
            for n in INTERLEAVED
        ]
        table(
            f"interleaved in one process, 1 thread, max_size=1, {key}: us per checkout + "
            f"query + return (medians of 40 alternating batches, medians of {rounds} processes)",
            ["strategy", "us/cycle", "speed x persistent", "x reset off", "x django pool"],
            rows,
        )
    return out


def run_holders(rounds: int) -> dict[str, Any]:
    """Attribution on vs off, per checkout (issue 21's target: under 1 us when known)."""
    runs = [measure("holders") for _ in range(rounds)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    off = out["holders=False"]

    def versus_off(n: str, off: str = "holders=False") -> tuple[float, str]:
        # Each process's own difference (the machine's speed varies by
        # process): their median, and their range.
        diffs = sorted(r[n] - r[off] for r in runs)
        return statistics.median(diffs), f"{diffs[0]:+.2f} .. {diffs[-1]:+.2f}"

    rows = [
        [n, f"{out[n]:.2f}", f"{versus_off(n)[0]:+.2f}", versus_off(n)[1], f"{off / out[n]:.3f}"]
        for n in HOLDERS
    ]
    table(
        f"holders: us per checkout (by cursor()) and return through Django's wrapper, 1 thread, "
        f"max_size=1 (medians of 40 alternating batches, medians of {rounds} processes)",
        ["setting", "us/cycle", "us vs off (median)", "per process", "speed x off"],
        rows,
    )
    requests = [k for k in out if k.startswith("request: ")]
    base = out["request: holders=False"]
    table(
        "holders: us per request (request signals, checkout, SELECT 1, return), 1 thread "
        f"(medians of 40 alternating batches, medians of {rounds} processes)",
        ["setting", "us/request", "us vs off (median)", "per process", "speed x off"],
        [
            [k.removeprefix("request: "), f"{out[k]:.1f}",
             f"{versus_off(k, 'request: holders=False')[0]:+.1f}",
             versus_off(k, "request: holders=False")[1], f"{base / out[k]:.3f}"]
            for k in requests
        ],
    )  # fmt: skip
    parts = [k for k in out if k not in HOLDERS and k not in requests]
    table(
        "holders: the parts alone (best of 5)",
        ["what", "us"],
        [[k, f"{out[k]:.3f}"] for k in parts],
    )
    return out


def run_classifier(rounds: int) -> dict[str, Any]:
    runs = [measure("classifier") for _ in range(rounds)]
    out = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    rows = [
        ["classify an ORM statement, first time (parsed)", f"{out['classify_first_us']:.1f} us"],
        ["classify it again (cached per SQL text)", f"{out['classify_cached_ns']:.0f} ns"],
        [
            "per statement sent: the hook and the cached verdict",
            f"{out['hook_per_statement_ns']:.0f} ns",
        ],
        ["reported parameters at return (libpq)", f"{out['parameter_net_us']:.2f} us"],
        ["the same through connection.info", f"{out['parameter_net_via_info_us']:.2f} us"],
    ]
    table(
        f'what reset_session="auto" costs (in-process, best of 7, medians of {rounds})',
        ["what", "cost"],
        rows,
    )
    return out


def targets(results: dict[str, Any]) -> None:
    """The ratios issue 19 sets targets on, from this run."""
    rows = []
    for case, by in (results.get("cycle") or {}).items():
        auto = by.get("ours (defaults)", {}).get("median_rps")
        off = by.get("ours reset_session=False", {}).get("median_rps")
        dj = by.get("django pool", {}).get("median_rps")
        if auto and off and dj:
            rows.append(
                [
                    case,
                    f"{auto / off:.3f}",
                    f"{auto / dj:.3f}",
                    f"{by['ours (defaults)']['ratio_to_persistent']:.3f}",
                    f"{by['ours reset_session=False']['ratio_to_persistent']:.3f}",
                ]
            )
    if rows:
        table(
            'targets: "auto" on clean requests',
            [
                "case",
                "auto / reset off",
                "auto / django pool",
                "auto x persistent",
                "reset off x persistent",
            ],
            rows,
        )


def run_oversubscribed(strategies: list[str], rounds: int, requests: int) -> dict[str, Any]:
    chosen = [s for s in strategies if s in POOLS or s == "persistent"]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in chosen}
    for r in range(rounds):
        for strategy in chosen[r % len(chosen) :] + chosen[: r % len(chosen)]:
            runs[strategy].append(
                measure(
                    "oversubscribed",
                    strategy=strategy,
                    threads=32,
                    max_size=4,
                    requests=max(requests // 32, 100),
                )
            )
    out: dict[str, Any] = {}
    rows = []
    base = median_of(runs["persistent"], "rps") if "persistent" in runs else None
    for strategy in chosen:
        rr = runs[strategy]
        out[strategy] = {
            "median_rps": median_of(rr, "rps"),
            "ratio_to_persistent": median_of(rr, "rps") / base if base else None,
            "wait_p50": median_of(rr, "wait_p50"),
            "wait_p99": median_of(rr, "wait_p99"),
            "timeouts": sum(x["timeouts"] for x in rr),
            "server_connections": max(x["server_connections"] for x in rr),
        }
        o = out[strategy]
        rows.append(
            [
                strategy,
                f"{o['median_rps']:,.0f}",
                f"{o['ratio_to_persistent']:.3f}" if base else "-",
                f"{o['wait_p50'] * 1e6:.0f}",
                f"{o['wait_p99'] * 1e6:.0f}",
                str(o["timeouts"]),
                str(o["server_connections"]),
            ]
        )
    table(
        f"oversubscribed: 32 threads, max_size=4 (persistent: 32 connections), medians of {rounds}",
        [
            "strategy",
            "req/s",
            "x persistent",
            "wait p50 us",
            "wait p99 us",
            "timeouts",
            "server conns",
        ],
        rows,
    )
    return out


def run_spike(strategies: list[str], rounds: int) -> dict[str, Any]:
    chosen = [s for s in strategies if s in POOLS]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in chosen}
    for _ in range(rounds):
        for strategy in chosen:
            runs[strategy].append(measure("spike", strategy=strategy))
    out: dict[str, Any] = {}
    rows = []
    for strategy in chosen:
        rr = runs[strategy]
        out[strategy] = {
            "ends_with_max": max(x["ends_with"] for x in rr),
            "ends_with_median": median_of(rr, "ends_with"),
            "latency_p50": median_of(rr, "latency_p50"),
            "latency_p99": median_of(rr, "latency_p99"),
            "latency_max": max(x["latency_max"] for x in rr),
            "server_connections": max(x["server_connections"] for x in rr),
        }
        o = out[strategy]
        rows.append(
            [
                strategy,
                f"{o['ends_with_median']:g} (max {o['ends_with_max']})",
                f"{o['latency_p50'] * 1e3:.1f}",
                f"{o['latency_p99'] * 1e3:.1f}",
                f"{o['latency_max'] * 1e3:.1f}",
                str(o["server_connections"]),
            ]
        )
    table(
        f"spike: min_size=5, max_size=10, 150 ms connection set-up, 50 requests at once "
        f"holding 2 ms ({rounds} runs)",
        ["strategy", "ends with", "p50 ms", "p99 ms", "max ms", "peak conns"],
        rows,
    )
    return out


def run_pgbouncer(rounds: int, requests: int, seconds: int) -> dict[str, Any] | None:
    """Ours directly and through PgBouncer, and what deployments run there today."""
    from dpp_devtools.pgbouncer import NoPgBouncer, ThrowawayPgBouncer

    s = throwaway.database_settings()
    server = {
        "host": s["HOST"],
        "port": str(s["PORT"]),
        "user": s["USER"],
        "password": s["PASSWORD"],
    }
    try:
        bouncers = {
            mode: ThrowawayPgBouncer(server, mode=mode) for mode in ("session", "transaction")
        }
    except NoPgBouncer as exc:
        print(f"\npgbouncer: skipped, {exc}")
        return None
    for b in bouncers.values():
        b.start()
    names = list(POOLER_STRATEGIES)
    out: dict[str, Any] = {}
    try:
        for threads, size in [(1, 1), (4, 4)]:
            key = f"{threads} thread{'s' if threads > 1 else ''}, max_size={size}"
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
            for r in range(rounds):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    behind = POOLER_STRATEGIES[name]
                    _fresh(bouncers)
                    n = max(requests // threads, 200)
                    if behind.strategy == "connect per request":
                        n = max(n // 10, 50)
                    port = str(bouncers[behind.pgbouncer].port) if behind.pgbouncer else None
                    runs[name].append(
                        measure(
                            "cycle",
                            strategy=behind.strategy,
                            threads=threads,
                            max_size=size,
                            requests=n,
                            port=port,
                            pool=behind.pool,
                        )
                    )
            base = median_of(runs["ours direct"], "rps")
            out[key] = {}
            rows = []
            for name in names:
                rps = median_of(runs[name], "rps")
                out[key][name] = {
                    "median_rps": rps,
                    "ratio_to_ours_direct": rps / base,
                    "client_cpu_us": median_of(runs[name], "cpu_us"),
                    "server_connections": max(r["server_connections"] for r in runs[name]),
                    "runs": [r["rps"] for r in runs[name]],
                }
                rows.append(
                    [
                        name,
                        f"{rps:,.0f}",
                        f"{rps / base:.3f}",
                        f"{out[key][name]['client_cpu_us']:.1f}",
                        str(out[key][name]["server_connections"]),
                    ]
                )
            table(
                f"through PgBouncer ({bouncers['session'].admin('SHOW VERSION')[0]['version']}), "
                f"request cycle, {key} (medians of {rounds})",
                ["strategy", "req/s", "x ours direct", "client CPU us/req", "server conns"],
                rows,
            )
        out["end to end"] = _pgbouncer_e2e(bouncers, max(rounds, 3), seconds)
    finally:
        for b in bouncers.values():
            b.destroy()
    return out


def _fresh(bouncers: dict[str, Any]) -> None:
    """Restart the PgBouncers: no server connection of an earlier run counts in this one."""
    for b in bouncers.values():
        b.restart()


#: The end-to-end rows through PgBouncer (POOLER_STRATEGIES names).
PGBOUNCER_E2E = (
    "ours direct",
    "ours via pgbouncer session",
    "ours via pgbouncer transaction (pgbouncer option)",
    "django no pool via pgbouncer transaction",
    "persistent via pgbouncer transaction",
)


def _pgbouncer_e2e(bouncers: dict[str, Any], rounds: int, seconds: int) -> dict[str, Any] | None:
    import shutil

    import e2e

    if shutil.which("wrk") is None:
        print("\npgbouncer end to end: skipped, wrk is not installed (apt-get install wrk)")
        return None
    e2e.migrate()
    names = list(PGBOUNCER_E2E)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            behind = POOLER_STRATEGIES[name]
            env = {"POOL_OPTIONS_JSON": json.dumps(behind.pool)}
            _fresh(bouncers)
            if behind.pgbouncer:
                env["PGPORT"] = str(bouncers[behind.pgbouncer].port)
            runs[name].append(e2e.serve_and_load(behind.strategy, seconds, ServerSessions, **env))
    return e2e_summary(
        runs,
        "ours direct",
        f"end to end through PgBouncer: gunicorn 2 workers x 4 threads (max_size=4), "
        f"wrk 16 connections, {seconds} s, medians of {rounds}",
    )


def run_soak(requests: int) -> dict[str, Any]:
    result = measure("soak", strategy="ours (defaults)", requests=requests)
    samples = result["samples"]
    first, last = samples[0], samples[-1]
    growth = last["rss_mb"] - first["rss_mb"]
    sessions = sorted({s["sessions"] for s in samples})
    print(f"\nsoak: {requests:,} request cycles on the defaults (max_size=2)")
    for s in samples:
        print(
            f"  after {s['requests']:>9,}: RSS {s['rss_mb']:.1f} MB, server sessions {s['sessions']}"
        )
    print(
        f"  RSS growth after the first {first['requests']:,}: {growth:+.2f} MB; sessions seen: {sessions}"
    )
    return {"samples": samples, "rss_growth_mb": growth, "sessions_seen": sessions}


def run_e2e(rounds: int, seconds: int) -> dict[str, Any] | None:
    import shutil

    import e2e

    if shutil.which("wrk") is None:
        print("\ne2e: skipped, wrk is not installed (apt-get install wrk)")
        return None
    e2e.migrate()
    names = list(e2e.STRATEGIES)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for strategy in names[r % len(names) :] + names[: r % len(names)]:
            runs[strategy].append(e2e.serve_and_load(strategy, seconds, ServerSessions))
    return e2e_summary(
        runs,
        "persistent",
        f"end to end: gunicorn 2 workers x 4 threads (max_size=4), wrk 16 connections, "
        f"{seconds} s, medians of {rounds}",
    )


def e2e_summary(
    runs: dict[str, list[dict[str, Any]]], base_name: str, title: str
) -> dict[str, Any]:
    """Medians of end-to-end runs, ratios to *base_name*, printed as a table."""
    base = median_of(runs[base_name], "rps")
    ratio = f"ratio_to_{base_name.replace(' ', '_')}"
    out: dict[str, Any] = {}
    rows = []
    for strategy, rr in runs.items():
        o = out[strategy] = {
            "median_rps": median_of(rr, "rps"),
            ratio: median_of(rr, "rps") / base,
            "latency_p50": median_of(rr, "latency_p50"),
            "latency_p99": median_of(rr, "latency_p99"),
            "errors": sum(x["errors"] for x in rr),
            "server_connections": max(x["server_connections"] for x in rr),
            "runs": [x["rps"] for x in rr],
        }
        rows.append(
            [
                strategy,
                f"{o['median_rps']:,.0f}",
                f"{o[ratio]:.3f}",
                f"{o['latency_p50'] * 1e3:.1f}",
                f"{o['latency_p99'] * 1e3:.1f}",
                str(o["errors"]),
                str(o["server_connections"]),
            ]
        )
    table(
        title,
        ["strategy", "req/s", f"x {base_name}", "p50 ms", "p99 ms", "errors", "server conns"],
        rows,
    )
    return out


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no chart: matplotlib is not installed; pip install -e .[bench])")
        return False
    cycle = results.get("cycle")
    if not cycle:
        return False
    cases = list(cycle)
    strategies = [s for s in cycle[cases[0]] if s != "connect per request"]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        values = [cycle[c][strategy]["ratio_to_persistent"] for c in cases]
        xs = [j + i * width for j in range(len(cases))]
        ax.bar(xs, values, width, label=strategy)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(strategies) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(cases)
    ax.set_ylabel("throughput / persistent connection")
    ax.set_ylim(0, 1.15)
    ax.set_title(
        "Django request cycle (SELECT 1): median throughput relative to a persistent connection"
    )
    ax.legend(fontsize=8, ncol=3, loc="lower center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=[
            "cycle",
            "dirty",
            "interleaved",
            "classifier",
            "holders",
            "oversubscribed",
            "spike",
            "e2e",
            "pgbouncer",
            "soak",
        ],
    )
    parser.add_argument("--e2e-seconds", type=int, default=10)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=6000, help="per run, split among threads")
    parser.add_argument("--soak-requests", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="3 rounds, shorter runs, 100k soak")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "suite.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "docs" / "bench.png")
    args = parser.parse_args()
    if args.worker:
        payload = json.loads(args.worker)
        print(json.dumps(WORKERS[payload["scenario"]](payload)))
        return 0
    if args.quick:
        args.rounds, args.requests, args.soak_requests = 3, 3000, 100_000
        args.e2e_seconds = 5

    try:
        throwaway.database_settings()  # starts a server for the workers if none is set
    except throwaway.NoPostgreSQL as exc:
        raise SystemExit(str(exc)) from None
    strategies = [s for s in args.strategies if available(s)]
    skipped = sorted(set(args.strategies) - set(strategies))
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}")
    import django
    import psycopg

    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "django": django.__version__,
            "psycopg": psycopg.__version__,
            "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "rounds": args.rounds,
    }
    started = time.monotonic()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    scenarios: list[tuple[str, Any]] = [
        ("cycle", lambda: run_cycle(strategies, args.rounds, args.requests)),
        ("dirty", lambda: run_dirty(args.rounds, args.requests)),
        ("interleaved", lambda: run_interleaved(max(args.rounds // 2, 3))),
        ("classifier", lambda: run_classifier(max(args.rounds // 2, 3))),
        ("holders", lambda: run_holders(max(args.rounds // 2, 3))),
        ("oversubscribed", lambda: run_oversubscribed(strategies, args.rounds, args.requests)),
        ("spike", lambda: run_spike(strategies, max(args.rounds // 2, 3))),
        ("e2e", lambda: run_e2e(max(args.rounds, 3), args.e2e_seconds)),
        ("pgbouncer", lambda: run_pgbouncer(args.rounds, args.requests, args.e2e_seconds)),
        ("soak", lambda: run_soak(args.soak_requests)),
    ]
    for name, run in scenarios:
        if name in args.scenarios:
            results[name] = run()
            # Written after each scenario: a later one that fails loses nothing.
            args.json.write_text(json.dumps(results, indent=1))
    targets(results)
    results["seconds"] = time.monotonic() - started
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.json} ({results['seconds']:.0f} s)")
    chart(results, args.chart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
