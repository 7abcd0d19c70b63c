#!/usr/bin/env python3
"""Markdown tables from a benchmark suite run (for the README and docs/performance.md).

.venv/bin/python bench/tables.py [bench/results/suite.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def md(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the one table renderer of bench/ (suite.py and
    outage.py print theirs with it, so they paste into the docs as printed)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def cycle_table(cycle: dict[str, Any]) -> str:
    cases = list(cycle)
    strategies = list(cycle[cases[0]])
    header = ["strategy", *[c.replace("max_size", "max") for c in cases]]
    rows = []
    for s in strategies:
        rows.append(
            [s]
            + [
                f"{cycle[c][s]['ratio_to_persistent']:.2f} ({cycle[c][s]['median_rps']:,.0f}/s)"
                for c in cases
            ]
        )
    return md(header, rows)


def cpu_table(cycle: dict[str, Any]) -> str:
    case = next(iter(cycle))
    base = cycle[case]["persistent"]["client_cpu_us"]
    rows = [
        [s, f"{v['client_cpu_us']:.1f}", f"{v['client_cpu_us'] - base:+.1f}"]
        for s, v in cycle[case].items()
        if s != "connect per request"
    ]
    return md(["strategy", "client CPU µs/request", "vs persistent"], rows)


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results" / "suite.json"
    r = json.loads(path.read_text())
    m = r["machine"]
    print(
        f"Python {m['python']}, Django {m['django']}, psycopg {m['psycopg']}, "
        f"{m['cpus']} CPUs, {m['date']}; medians of {r['rounds']} interleaved rounds.\n"
    )
    if "cycle" in r:
        print("Request cycle (`SELECT 1`), throughput relative to a persistent connection:\n")
        print(cycle_table(r["cycle"]))
        print(f"\nClient CPU per request, {next(iter(r['cycle']))}:\n")
        print(cpu_table(r["cycle"]))
    if "dirty" in r:
        for case, by in r["dirty"].items():
            print(f"\nDirty requests (`SET work_mem`, then `SELECT 1`), {case}:\n")
            print(
                md(
                    ["strategy", "req/s", "x persistent", "x reset_session=True"],
                    [
                        [
                            s,
                            f"{v['median_rps']:,.0f}",
                            f"{v['ratio_to_persistent']:.2f}",
                            f"{v['ratio_to_reset_true']:.3f}",
                        ]
                        for s, v in by.items()
                    ],
                )
            )
    if "interleaved" in r:
        for case, us in r["interleaved"].items():
            off, dj = us["ours reset_session=False"], us["django pool"]
            print(
                f"\nInterleaved in one process (1 thread, max_size=1), {case}: "
                "checkout, query and return:\n"
            )
            print(
                md(
                    ["strategy", "µs per cycle", "x reset off", "x Django's pool"],
                    [[s, f"{v:.1f}", f"{off / v:.3f}", f"{dj / v:.3f}"] for s, v in us.items()],
                )
            )
    if "classifier" in r:
        c = r["classifier"]
        print('\nWhat `reset_session="auto"` costs (in-process):\n')
        print(
            md(
                ["what", "cost"],
                [
                    [
                        "classify an ORM statement the first time",
                        f"{c['classify_first_us']:.1f} µs",
                    ],
                    [
                        "classify it again (cached per SQL text)",
                        f"{c['classify_cached_ns']:.0f} ns",
                    ],
                    [
                        "per statement sent: the hook and the cached verdict",
                        f"{c['hook_per_statement_ns']:.0f} ns",
                    ],
                    ["reported parameters read at return", f"{c['parameter_net_us']:.2f} µs"],
                    [
                        "the same through `connection.info`",
                        f"{c['parameter_net_via_info_us']:.2f} µs",
                    ],
                ],
            )
        )
    if "oversubscribed" in r:
        o = r["oversubscribed"]
        print("\nOversubscribed, 32 threads on max_size=4:\n")
        print(
            md(
                [
                    "strategy",
                    "req/s",
                    "x persistent",
                    "wait p50",
                    "wait p99",
                    "timeouts",
                    "server conns",
                ],
                [
                    [
                        s,
                        f"{v['median_rps']:,.0f}",
                        f"{v['ratio_to_persistent']:.2f}",
                        f"{v['wait_p50'] * 1e3:.1f} ms",
                        f"{v['wait_p99'] * 1e3:.1f} ms",
                        str(v["timeouts"]),
                        str(v["server_connections"]),
                    ]
                    for s, v in o.items()
                ],
            )
        )
    if "spike" in r:
        print("\nSpike: min_size=5, max_size=10, 150 ms connection set-up, 50 requests at once:\n")
        print(
            md(
                ["strategy", "connections after", "p50", "p99", "max"],
                [
                    [
                        s,
                        f"{v['ends_with_median']:g} (max {v['ends_with_max']})",
                        f"{v['latency_p50'] * 1e3:.1f} ms",
                        f"{v['latency_p99'] * 1e3:.1f} ms",
                        f"{v['latency_max'] * 1e3:.1f} ms",
                    ]
                    for s, v in r["spike"].items()
                ],
            )
        )
    if r.get("e2e"):
        print("\nEnd to end: gunicorn (2 gthread workers x 4 threads), wrk with 16 connections:\n")
        print(
            md(
                ["strategy", "req/s", "x persistent", "p50", "p99", "errors", "server conns"],
                [
                    [
                        s,
                        f"{v['median_rps']:,.0f}",
                        f"{v['ratio_to_persistent']:.3f}",
                        f"{v['latency_p50'] * 1e3:.1f} ms",
                        f"{v['latency_p99'] * 1e3:.1f} ms",
                        str(v["errors"]),
                        str(v["server_connections"]),
                    ]
                    for s, v in r["e2e"].items()
                ],
            )
        )
    if "soak" in r:
        s = r["soak"]
        first, last = s["samples"][0], s["samples"][-1]
        print(
            f"\nSoak: {last['requests']:,} request cycles on the defaults: RSS "
            f"{first['rss_mb']:.1f} MB after {first['requests']:,}, {last['rss_mb']:.1f} MB "
            f"at the end ({s['rss_growth_mb']:+.2f} MB); server sessions seen: "
            f"{s['sessions_seen']}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
