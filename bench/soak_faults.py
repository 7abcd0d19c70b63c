#!/usr/bin/env python3
"""Soak under intermittent faults: load for minutes, a fault every 30 s.

    .venv/bin/python bench/soak_faults.py [--minutes 10] [--interval 30] [--threads 8]

Starts a throwaway PostgreSQL and a TCP proxy in front of it, runs request
loops from several threads through the pooled engine, and injects in turn:
a fast restart, an immediate restart, pg_terminate_backend() of every pooled
session, and a 5 s network black hole. Reports errors inside and outside the
fault windows (a window is the fault plus 3 s), connections lost (in use +
idle = size at the end, none left checked out), and RSS at the start and end.
"""

from __future__ import annotations

import argparse
import resource
import sys
import threading
import time

import psycopg
from harness import pooled_wrapper, private_server, setup_django

from dpp_devtools.proxy import Proxy


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--interval", type=float, default=30)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()

    setup_django()
    from django.db import OperationalError

    server = private_server()
    proxy = Proxy(server.host, server.port)
    wrapper = pooled_wrapper(
        server,
        "soak",
        port=proxy.port,
        options={"connect_timeout": 2},
        min_size=2,
        max_size=4,
        timeout=3,
    )
    # Counters and failure times only: a record per request would itself
    # grow the RSS this script measures.
    served = [0] * args.threads
    failures: list[tuple[float, str]] = []
    stop = threading.Event()

    def loop(index: int) -> None:
        w = wrapper.copy()
        while not stop.is_set():
            try:
                with w.cursor() as cursor:
                    cursor.execute("SELECT count(*) FROM pg_class")
                served[index] += 1
            except OperationalError as exc:
                failures.append((time.monotonic(), " ".join(str(exc).split())[:120]))
                time.sleep(0.05)
            finally:
                w.close()

    def terminate_all() -> None:
        with psycopg.connect(**server.conninfo("postgres"), autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = 'private' AND pid <> pg_backend_pid()"
            )

    def blackhole() -> None:
        proxy.blackhole()
        time.sleep(5)
        proxy.resume()

    faults = [
        ("fast restart", lambda: server.restart("fast")),
        ("immediate restart", lambda: server.restart("immediate")),
        ("terminate every session", terminate_all),
        ("5 s network black hole", blackhole),
    ]
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(args.threads)]
    for t in workers:
        t.start()
    time.sleep(5)  # warm-up
    rss_start = rss_mb()
    windows: list[tuple[str, float, float]] = []
    end = time.monotonic() + args.minutes * 60
    i = 0
    try:
        while time.monotonic() + args.interval < end:
            time.sleep(args.interval)
            name, inject = faults[i % len(faults)]
            t0 = time.monotonic()
            inject()
            windows.append((name, t0, time.monotonic() + 3))
            i += 1
        time.sleep(max(0.0, end - time.monotonic()))
    finally:
        stop.set()
        for t in workers:
            t.join(60)
    rss_end = rss_mb()
    pool = wrapper.pool
    stats = pool.get_stats()

    def inside(t: float) -> bool:
        return any(a <= t <= b for _, a, b in windows)

    in_windows = sum(1 for t, _ in failures if inside(t))
    outside = [(t, why) for t, why in failures if not inside(t)]
    print(
        f"{args.minutes:g} min, {sum(served) + len(failures)} requests, {len(windows)} faults ({', '.join(n for n, _ in faults)})"
    )
    print(f"errors inside fault windows: {in_windows}; outside: {len(outside)}")
    for t, why in outside:
        last = max(
            ((n, b) for n, _, b in windows if b <= t), key=lambda w: w[1], default=("start", 0.0)
        )
        print(f"  outside: {t - last[1]:.2f} s after the window of {last[0]!r}: {why}")
    print(
        f"pool at the end: size {stats['pool_size']}, idle {stats['pool_available']}, "
        f"checked out {len(pool._leased)}; connections lost: {stats['pool_size'] - stats['pool_available'] - len(pool._leased)}"
    )
    print(
        f"RSS: {rss_start:.1f} MB after warm-up, {rss_end:.1f} MB at the end ({rss_end - rss_start:+.1f} MB)"
    )
    wrapper.close_pool()
    proxy.close()
    server.destroy()
    return 1 if outside or len(pool._leased) else 0


if __name__ == "__main__":
    sys.exit(main())
