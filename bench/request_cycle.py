#!/usr/bin/env python3
"""Request-cycle microbenchmark: how much a checkout and return cost.

One "request" is what Django does around a view that runs ``SELECT 1``:
``request_started`` (``close_old_connections``), a cursor and the query,
``request_finished`` (``close_old_connections``, which returns a pooled
connection). Strategies run side by side in one process, interleaved and
repeated; the table gives medians and ratios to a persistent connection.

    .venv/bin/python bench/request_cycle.py [--threads 1 4 16] [--rounds 7]

A server comes from ``DATABASE_URL``/``PG*``, else a throwaway cluster starts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "testproject"), str(ROOT)]

import throwaway_pg  # noqa: E402

PG = "django.db.backends.postgresql"
OURS = "django_pooled_pg"

# name: (ENGINE, CONN_MAX_AGE, pool options or None)
STRATEGIES: dict[str, tuple[str, float | None, dict[str, Any] | None]] = {
    "connect per request": (PG, 0, None),
    "persistent": (PG, None, None),
    "django pool": (PG, 0, {}),
    "ours (defaults)": (OURS, 0, {}),
    "ours reset_session=False": (OURS, 0, {"reset_session": False}),
}


def alias_for(strategy: str, max_size: int) -> str:
    return f"{strategy.replace(' ', '_')}_{max_size}"


def configure(max_sizes: set[int]) -> None:
    from django.conf import settings

    server = throwaway_pg.database_settings()
    databases: dict[str, Any] = {"default": {"ENGINE": PG, **server}}
    for name, (engine, max_age, pool) in STRATEGIES.items():
        for size in max_sizes:
            options: dict[str, Any] = {}
            if pool is not None:
                options["pool"] = {"min_size": size, "max_size": size, **pool}
            databases[alias_for(name, size)] = {
                "ENGINE": engine,
                **server,
                "CONN_MAX_AGE": max_age,
                "OPTIONS": options,
            }
    settings.configure(DATABASES=databases, USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[])
    import django

    django.setup()


def cycles(alias: str, n: int) -> None:
    from django.core.signals import request_finished, request_started
    from django.db import connections

    conn = connections[alias]
    for _ in range(n):
        request_started.send(sender=None)
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
        request_finished.send(sender=None)


def measure(alias: str, threads: int, n: int) -> float:
    """Requests per second of *threads* threads doing *n* requests each."""
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        from django.db import connections

        try:
            cycles(alias, 20)  # warm: connection opened, statements cached
            barrier.wait()
            cycles(alias, n)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            connections.close_all()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return threads * n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000, help="per thread and round")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "request_cycle.json"
    )
    args = parser.parse_args()

    # (threads, max_size): max_size equal to threads, plus 1 thread on 2 (a spare).
    cases = [(t, t) for t in args.threads] + ([(1, 2)] if 1 in args.threads else [])
    configure({size for _, size in cases})
    results: dict[str, Any] = {}
    for threads, size in cases:
        key = f"{threads} thread{'s' if threads > 1 else ''}, max_size={size}"
        runs: dict[str, list[float]] = {s: [] for s in args.strategies}
        for _ in range(args.rounds):
            for strategy in args.strategies:  # interleaved: same noise for all
                n = args.requests // threads if threads > 1 else args.requests
                if strategy == "connect per request":
                    n = max(n // 40, 10)
                runs[strategy].append(measure(alias_for(strategy, size), threads, n))
        persistent = statistics.median(runs["persistent"]) if "persistent" in runs else None
        print(f"\n{key}")
        print(f"  {'strategy':<28} {'req/s':>9} {'us/req':>8} {'x persistent':>13}")
        results[key] = {}
        for strategy, values in runs.items():
            median = statistics.median(values)
            ratio = median / persistent if persistent else float("nan")
            results[key][strategy] = {
                "median_rps": median,
                "runs": values,
                "ratio_to_persistent": ratio,
            }
            print(f"  {strategy:<28} {median:>9.0f} {1e6 / median * threads:>8.1f} {ratio:>13.3f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
