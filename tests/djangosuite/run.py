#!/usr/bin/env python3
"""Run Django's own test suite on our engine and on Django's, and compare.

Usage (normally through ``tox -e djangosuite``)::

    python tests/djangosuite/run.py [--apps APP ...] [--modes serial parallel]

Downloads the source distribution of the installed Django (it ships
``tests/`` and ``runtests.py``), starts a throwaway PostgreSQL unless ``PG*``
or ``DATABASE_URL`` name a server, and runs the same apps with
``ENGINE: django.db.backends.postgresql`` and ``ENGINE: django_pooled_pg``,
serially and with ``--parallel 2``. It fails when a test fails or errors on
our engine but passes on Django's own, unless ``expected_differences.toml``
lists it with a reason, and prints the counts for both engines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time
import tomllib
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = ROOT / ".djangosuite"

APPS = [
    "backends",
    "transactions",
    "transaction_hooks",
    "select_for_update",
    "queries",
    "basic",
    "model_fields",
    "db_functions",
    "postgres_tests",
    "migrations",
    "schema",
    "cache",
    "sessions_tests",
    "servers",
    "async",
    "test_utils",
    "test_runner",
]
ENGINES = {"django": "django.db.backends.postgresql", "pooled": "django_pooled_pg"}
MODES = {"serial": 1, "parallel": 2}
FAILED = ("failure", "error", "unexpected success")
OK = ("passed", "expected failure")
RUN_TIMEOUT = 30 * 60  # a hang (as Django's pool has under --parallel) fails, it does not block CI


def django_tests_dir() -> Path:
    """The ``tests/`` directory of the installed Django's sdist, downloaded once."""
    import django

    version = django.__version__
    target = CACHE / f"django-{version}"
    if not (target / "tests" / "runtests.py").exists():
        CACHE.mkdir(exist_ok=True)
        archive = CACHE / f"django-{version}.tar.gz"
        if not archive.exists():
            print(f"djangosuite: downloading Django {version}'s source distribution", flush=True)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    f"django=={version}",
                    "-d",
                    str(CACHE),
                ],
                check=True,
            )
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    return target / "tests"


def server_environment() -> dict[str, str]:
    """PG* variables for the suite's server: the configured one or a throwaway."""
    from dpp_devtools import throwaway

    try:
        settings = throwaway.database_settings("postgres")
    except throwaway.NoPostgreSQL as exc:
        raise SystemExit(f"djangosuite: {exc}") from None
    env = dict(os.environ)
    env.update(
        PGHOST=settings["HOST"],
        PGPORT=settings["PORT"] or "5432",
        PGUSER=settings["USER"],
        PGPASSWORD=settings["PASSWORD"],
    )
    return env


def run_one(tests_dir: Path, env: dict[str, str], engine: str, mode: str, apps: list[str]) -> dict:
    results = CACHE / f"results-{engine}-{mode}.json"
    log = CACHE / f"log-{engine}-{mode}.txt"
    results.unlink(missing_ok=True)
    env = dict(
        env,
        DJANGOSUITE_ENGINE=ENGINES[engine],
        DJANGOSUITE_RESULTS=str(results),
        PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]),
    )
    argv = [
        sys.executable,
        "-W",
        "ignore",
        "runtests.py",
        "--settings=djangosuite_settings",
        "--noinput",
        f"--parallel={MODES[mode]}",
        *apps,
    ]
    print(
        f"djangosuite: {engine} engine, {mode}: running {len(apps)} apps (log: {log})", flush=True
    )
    started = time.monotonic()
    with log.open("w") as out:
        try:
            proc = subprocess.run(
                argv,
                cwd=tests_dir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=RUN_TIMEOUT,
            )
            returncode: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            returncode = f"hung, killed after {RUN_TIMEOUT} s"
    elapsed = time.monotonic() - started
    data = json.loads(results.read_text()) if results.exists() else {"outcomes": {}, "details": {}}
    data.update(engine=engine, mode=mode, returncode=returncode, seconds=round(elapsed, 1))
    results.write_text(json.dumps(data, indent=0))
    return data


def counts(data: dict) -> Counter[str]:
    c = Counter(data["outcomes"].values())
    c["run"] = len(data["outcomes"])
    return c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", nargs="+", default=APPS)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    args = parser.parse_args(argv)

    expected = tomllib.loads((HERE / "expected_differences.toml").read_text()).get("tests", {})
    tests_dir = django_tests_dir()
    env = server_environment()
    runs = {
        (e, m): run_one(tests_dir, env, e, m, args.apps) for m in args.modes for e in args.engines
    }

    header = f"{'engine':<8} {'mode':<9} {'run':>6} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8} {'xfail':>6} {'seconds':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for (engine, mode), data in runs.items():
        c = counts(data)
        print(
            f"{engine:<8} {mode:<9} {c['run']:>6} {c['passed']:>7} {c['failure']:>7} {c['error']:>7} "
            f"{c['skipped']:>8} {c['expected failure']:>6} {data['seconds']:>8}"
        )

    status = 0
    for mode in args.modes:
        ours, theirs = runs.get(("pooled", mode)), runs.get(("django", mode))
        for data in (ours, theirs):
            if data is not None and not data["outcomes"]:
                print(
                    f"\nFAIL: the {data['engine']} {mode} run recorded no test (exit {data['returncode']}); "
                    f"see {CACHE}/log-{data['engine']}-{mode}.txt"
                )
                status = 1
        if ours is None or theirs is None:
            continue
        if isinstance(ours["returncode"], str):
            print(f"\nFAIL: the pooled {mode} run {ours['returncode']}")
            status = 1
        regressions = sorted(
            test
            for test, outcome in theirs["outcomes"].items()
            if outcome in OK and ours["outcomes"].get(test, "missing") in (*FAILED, "missing")
        )
        unexpected = [t for t in regressions if t not in expected]
        listed = [t for t in regressions if t in expected]
        print(
            f"\n{mode}: {len(regressions)} tests pass on Django's backend and not on ours "
            f"({len(listed)} listed in expected_differences.toml)"
        )
        for test in listed:
            print(f"  expected: {test}: {expected[test]}")
        for test in unexpected:
            print(f"  FAIL: {test}: {ours['outcomes'].get(test, 'missing')}")
            detail = ours["details"].get(test)
            if detail:
                print("    " + detail.strip().replace("\n", "\n    ")[-1500:])
        if unexpected:
            status = 1
        skipped = sorted(
            t
            for t, o in ours["outcomes"].items()
            if o == "skipped" and theirs["outcomes"].get(t) in OK
        )
        if skipped:
            print(
                f"{mode}: {len(skipped)} tests pass on Django's backend and are skipped on ours "
                "(Django's own skips for pooled connections):"
            )
            for test in skipped:
                print(f"  skipped: {test}")
        fixed = sorted(
            t
            for t, o in ours["outcomes"].items()
            if o in OK and theirs["outcomes"].get(t) in FAILED
        )
        if fixed:
            print(
                f"{mode}: {len(fixed)} tests pass on ours and fail on Django's backend: {', '.join(fixed[:20])}"
            )
    return status


if __name__ == "__main__":
    sys.exit(main())
