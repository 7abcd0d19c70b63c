#!/usr/bin/env python3
"""The request cycle of two revisions of the engine, side by side in one run.

    .venv/bin/python bench/compare.py --before d6f0809            # HEAD's tree vs d6f0809
    .venv/bin/python bench/compare.py --before d6f0809 --rounds 9
    .venv/bin/python bench/compare.py --before d6f0809 --in-process   # both in one process

The revision is checked out in a temporary git worktree; each measurement
is bench/suite.py's own "cycle" worker (a fresh process, one alias), run
with that worktree's ``django_pooled_pg`` first on ``PYTHONPATH`` for
"before" and this tree's for "after", so both sides are measured by the
same code. Strategies and cases are interleaved, the starting point
rotated, rounds repeated; the table gives medians and after/before ratios,
with persistent connections and Django's pool as references.

Processes differ in speed by several percent on a noisy machine, more than
a small change costs. ``--in-process`` loads both trees into each process
(the revision's package under another name: its imports are relative) and
alternates batches of their aliases there, as bench/suite.py's
"interleaved" does: a request cycle (request signals, SELECT 1) and a bare
checkout and return (``cursor()`` then ``close()``), each on the defaults
and with ``reset_session=False``. The table gives medians over the
processes of each one's own after/before ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tables import md

from dpp_devtools import throwaway

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "suite.py"
#: (strategy, which tree); the references run the same either way.
RUNS = [
    ("persistent", None),
    ("django pool", None),
    ("ours (defaults)", "before"),
    ("ours (defaults)", "after"),
    ("ours reset_session=False", "before"),
    ("ours reset_session=False", "after"),
]
CASES = [(1, 1), (4, 4), (16, 16)]


#: Runs a script with *tree*'s package first: an editable install's import
#: hook would otherwise find this tree's whatever sys.path says.
BOOT = """
import os, runpy, sys
tree, script, *argv = sys.argv[1:]
sys.meta_path[:] = [f for f in sys.meta_path if "django_pooled_pg" not in f.__module__]
sys.path[:0] = [tree, os.path.dirname(script)]
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def run_with(tree: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BOOT, str(tree), *argv], capture_output=True, text=True, timeout=600
    )


def measure(tree: Path, **args: Any) -> dict[str, Any]:
    payload = json.dumps({"scenario": "cycle", **args})
    proc = run_with(tree, str(SUITE), "--worker", payload)
    if proc.returncode != 0:
        raise RuntimeError(f"{args} ({tree}): {proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def imported_from(tree: Path) -> str:
    """Where ``django_pooled_pg`` is imported from, run with *tree* first."""
    with tempfile.NamedTemporaryFile("w", suffix=".py") as probe:
        probe.write(
            "import django_pooled_pg, os; print(os.path.dirname(django_pooled_pg.__file__))"
        )
        probe.flush()
        return run_with(tree, probe.name).stdout.strip()


#: The before tree's package is imported under this name (--in-process).
BEFORE_PACKAGE = "dpp_before"

IN_PROCESS = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from suite import alternate, database, request_on, throwaway
from django.conf import settings
server = throwaway.database_settings()
dbs = {}
for side, engine in (("before", sys.argv[3]), ("after", "django_pooled_pg")):
    for case, pool in (("defaults", None), ("reset_session=False", {"reset_session": False})):
        db = database("ours (defaults)", server, min_size=1, max_size=1, pool=pool)
        db["ENGINE"] = engine
        dbs[(side, case)] = db
aliases = {f"a{i}": key for i, key in enumerate(dbs)}
settings.configure(
    DATABASES={"default": dbs[("after", "defaults")], **{a: dbs[k] for a, k in aliases.items()}},
    USE_TZ=True, TIME_ZONE="UTC", INSTALLED_APPS=[],
)
import django
django.setup()
from django.db import connections
for a, (side, _) in aliases.items():
    engine = type(connections[a]).__module__.partition(".")[0]
    assert engine == dbs[aliases[a]]["ENGINE"], (a, engine)
def checkout(c):
    def run():
        c.cursor().close()
        c.close()
    return run
out = {}
for what, make in (("request", request_on), ("checkout", checkout)):
    times = alternate({a: make(connections[a]) for a in aliases}, {"rounds": int(sys.argv[4])})
    for a, us in times.items():
        side, case = aliases[a]
        out[f"{what}|{case}|{side}"] = us
print(json.dumps(out))
"""


def in_process(before: Path, rounds: int) -> None:
    """Both trees in each process; medians of the processes' own ratios."""
    with tempfile.TemporaryDirectory(prefix="dpp-alias-") as alias_dir:
        # The revision's package under another name, so both import side by side.
        (Path(alias_dir) / BEFORE_PACKAGE).symlink_to(before / "django_pooled_pg")
        runs = []
        for _ in range(rounds):
            proc = subprocess.run(
                [sys.executable, "-c", IN_PROCESS, alias_dir, str(SUITE.parent), BEFORE_PACKAGE,
                 "40"],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for what, label in (("request", "request cycle (signals, SELECT 1)"),
                        ("checkout", "checkout + return (cursor(), close())")):  # fmt: skip
        for case in ("defaults", "reset_session=False"):
            before_us = statistics.median(r[f"{what}|{case}|before"] for r in runs)
            after_us = statistics.median(r[f"{what}|{case}|after"] for r in runs)
            ratios = sorted(r[f"{what}|{case}|before"] / r[f"{what}|{case}|after"] for r in runs)
            diffs = [r[f"{what}|{case}|after"] - r[f"{what}|{case}|before"] for r in runs]
            rows.append(
                [label, case, f"{before_us:.1f}", f"{after_us:.1f}",
                 f"{statistics.median(diffs):+.2f}", f"{statistics.median(ratios):.3f}",
                 f"{ratios[0]:.3f} .. {ratios[-1]:.3f}"]
            )  # fmt: skip
    print(f"\nin one process, alternating batches; medians of {rounds} processes\n")
    print(
        md(
            ["what", "case", "us before", "us after", "us after - before (median)",
             "speed after / before (median)", "per process"],
            rows,
        )
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=6000, help="per run, split among threads")
    parser.add_argument(
        "--in-process", action="store_true", help="both trees in each process (see above)"
    )
    args = parser.parse_args()
    throwaway.database_settings()  # a server for the workers if none is set
    with tempfile.TemporaryDirectory(prefix="dpp-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
            check=True,
            capture_output=True,
        )
        try:
            trees = {"before": before, "after": ROOT}
            for name, tree in trees.items():
                where = imported_from(tree)
                assert where == str(tree / "django_pooled_pg"), (name, where)
            print(f"before: {args.before} ({before}); after: the working tree ({ROOT})")
            if args.in_process:
                in_process(before, args.rounds)
                return 0
            for threads, size in CASES:
                runs: dict[tuple[str, str | None], list[float]] = {r: [] for r in RUNS}
                for r in range(args.rounds):
                    for run in RUNS[r % len(RUNS) :] + RUNS[: r % len(RUNS)]:
                        strategy, side = run
                        result = measure(
                            trees[side or "after"],
                            strategy=strategy,
                            threads=threads,
                            max_size=size,
                            requests=max(args.requests // threads, 200),
                        )
                        runs[run].append(result["rps"])
                rps = {run: statistics.median(v) for run, v in runs.items()}
                persistent = rps[("persistent", None)]
                django = rps[("django pool", None)]
                rows = [
                    [
                        f"{s} ({side})" if side else s,
                        f"{v:,.0f}",
                        f"{v / persistent:.3f}",
                        f"{v / django:.3f}",
                    ]
                    for (s, side), v in rps.items()
                ]
                ratios = [
                    [s, f"{rps[(s, 'after')] / rps[(s, 'before')]:.3f}"]
                    for s in ("ours (defaults)", "ours reset_session=False")
                ]
                print(
                    f"\nrequest cycle, {threads} thread(s), max_size={size}, "
                    f"medians of {args.rounds}\n"
                )
                print(md(["run", "req/s", "x persistent", "x django pool"], rows))
                print()
                print(md(["strategy", "after / before"], ratios))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                capture_output=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
