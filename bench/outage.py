#!/usr/bin/env python3
"""A 5 s outage under load, with fail_fast on and off: what requests see.

    .venv/bin/python bench/outage.py [--threads 8] [--outage 5] [--rounds 3]

Starts a throwaway PostgreSQL of its own, runs request loops (check out,
``SELECT 1``, return) from several threads, stops the server (fast
shutdown) for the outage, starts it again, and reports per setting: requests
failed during the outage, their latency (median, max), and the time from the
server accepting connections again to the first successful request.
Medians over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from harness import pooled_wrapper, private_server, setup_django
from tables import md

from dpp_devtools.throwaway import ThrowawayServer


def run_once(
    server: ThrowawayServer, fail_fast: bool, threads: int, outage: float
) -> dict[str, float]:
    from django.db import OperationalError

    wrapper = pooled_wrapper(
        server, f"outage_{fail_fast}", min_size=4, max_size=8, timeout=10, fail_fast=fail_fast
    )
    results: list[tuple[float, float, bool]] = []
    stop = threading.Event()

    def loop() -> None:
        w = wrapper.copy()
        while not stop.is_set():
            t0 = time.monotonic()
            ok = True
            try:
                with w.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except OperationalError:
                ok = False
            finally:
                w.close()
            results.append((t0, time.monotonic(), ok))
            if not ok:
                time.sleep(0.01)  # a client backing off a little, as a web worker would not

    workers = [threading.Thread(target=loop) for _ in range(threads)]
    for t in workers:
        t.start()
    time.sleep(1.0)
    down = time.monotonic()
    server.stop("fast")
    time.sleep(outage)
    server.start()
    up = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for t in workers:
        t.join(60)
    wrapper.close_pool()
    failed = [t1 - t0 for t0, t1, ok in results if not ok and t0 >= down]
    first_ok = min((t1 for t0, t1, ok in results if ok and t1 >= up), default=float("nan"))
    return {
        "failed": len(failed),
        "failed_p50_ms": 1000 * statistics.median(failed) if failed else 0.0,
        "failed_max_ms": 1000 * max(failed) if failed else 0.0,
        "first_success_s": first_ok - up,
        "served_during": sum(1 for t0, t1, ok in results if ok and down <= t0 < up),
        "slowest_s": max((t1 - t0 for t0, t1, ok in results if t0 >= down - 1), default=0.0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--outage", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    setup_django()
    server = private_server()
    try:
        runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(args.rounds):
            for fail_fast in (True, False):
                runs[fail_fast].append(run_once(server, fail_fast, args.threads, args.outage))
    finally:
        server.destroy()

    def med(fail_fast: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs[fail_fast])

    print(f"{args.outage:.0f} s outage, {args.threads} threads, medians of {args.rounds} rounds\n")
    header = [
        "fail_fast",
        "requests failed",
        "failed: median latency",
        "failed: max latency",
        "slowest request",
        "first success after restart",
    ]
    rows = [
        [
            str(fail_fast),
            f"{med(fail_fast, 'failed'):.0f}",
            f"{med(fail_fast, 'failed_p50_ms'):.1f} ms",
            f"{med(fail_fast, 'failed_max_ms'):.0f} ms",
            f"{med(fail_fast, 'slowest_s'):.2f} s",
            f"{1000 * med(fail_fast, 'first_success_s'):.0f} ms",
        ]
        for fail_fast in runs
    ]
    print(md(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
