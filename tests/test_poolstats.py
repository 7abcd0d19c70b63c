"""manage.py poolstats: each format, its options, bad input, and a server that is down.

Multi-process deployments (gunicorn workers through the stats cache) are in
test_deployment.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from prometheus_client.parser import text_string_to_metric_families

from django_pooled_pg.observability.records import HOSTNAME
from tests.helpers import CheckedThread, wait_until

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"


def poolstats(*args: str) -> str:
    out = StringIO()
    call_command("poolstats", *args, stdout=out)
    return out.getvalue()


def busy_default(in_use: int = 1) -> list[Any]:
    """Hold *in_use* checkouts of 'default' (this thread's and copies)."""
    held = []
    for i in range(in_use):
        w = connection if i == 0 else connection.copy()
        with w.cursor() as cursor:
            cursor.execute("SELECT 1")
        held.append(w)
    return held


def test_table_shows_configuration_live_state_counters_times_and_server(
    transactional_db: None,
) -> None:
    held = busy_default(2)
    text = poolstats("--database", "default")
    lines = text.splitlines()
    config = next(line for line in lines if line.startswith("default "))
    assert "max_size 4" in config and "reset_session auto" in config
    row = next(line for line in lines if f"{HOSTNAME}:{os.getpid()} (this)" in line)
    cells = row.split("(this)")[1].split()
    assert cells[2] == "2"  # in use
    assert any(line.strip().startswith("total, 1 process") for line in lines)
    assert "closed by reason: lifetime 0" in text
    assert re.search(r"session resets: sent \d+, skipped \d+", text), text
    assert "checkout wait" in text and "held" in text and "connect" in text
    # The server's view: this process's two sessions of the alias, active or idle.
    server = text[text.index("server (") :]
    assert f"{HOSTNAME}:{os.getpid()}" in server
    assert "max_connections" in server
    assert connection.settings_dict["PASSWORD"] not in text
    for w in held[1:]:
        w.close()


def test_json_follows_the_documented_schema(transactional_db: None) -> None:
    busy_default(1)
    doc = json.loads(poolstats("--json"))
    assert doc["schema"] == 1 and doc["pid"] == os.getpid() and doc["host"] == HOSTNAME
    assert set(doc["transport"]) == {"cache", "shared", "error", "note"}
    assert doc["transport"]["shared"] is False  # the test settings' cache is local memory
    default = doc["aliases"]["default"]
    assert set(default) == {
        "config", "processes", "totals", "server", "server_error", "pooler", "pooler_error", "rates"
    }  # fmt: skip
    assert default["pooler"] is None  # no pgbouncer_admin
    (mine,) = default["processes"]
    assert mine["pid"] == os.getpid() and mine["live"]["in_use"] == 1
    assert set(mine["counters"]) >= {"checkouts", "timeouts", "rejected", "opened", "lost", "leaks"}
    assert set(mine["wait"]) == {"count", "sum", "mean", "p50", "p95", "p99", "max", "buckets"}
    assert default["totals"]["in_use"] == 1
    ours = [g for g in default["server"]["ours"] if g["pid"] == os.getpid()]
    assert ours and ours[0]["alias"] == "default" and ours[0]["active"] + ours[0]["idle"] >= 1
    assert default["server"]["max_connections"] > 0
    again = json.loads(poolstats("--format", "json"))
    assert set(again) == set(doc)


def test_prometheus_format_parses_with_conventional_names(transactional_db: None) -> None:
    busy_default(1)
    text = poolstats("--format", "prometheus", "--database", "default")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["django_pooled_pg_checkouts"].type == "counter"
    assert families["django_pooled_pg_connections_in_use"].type == "gauge"
    assert families["django_pooled_pg_checkout_wait_seconds"].type == "histogram"
    (sample,) = [
        s
        for s in families["django_pooled_pg_connections_in_use"].samples
        if s.labels["alias"] == "default"
    ]
    assert sample.labels == {"alias": "default", "host": HOSTNAME, "pid": str(os.getpid())}
    assert sample.value == 1
    assert "_total{" in text and 'le="+Inf"' in text
    reasons = {s.labels["reason"] for s in families["django_pooled_pg_connections_closed"].samples}
    assert reasons >= {"lifetime", "idle", "broken", "reset_failed", "fork", "shutdown"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--database", "nope"],
            "--database 'nope': no such alias. Configured aliases: default, small",
        ),
        (["--format", "xml"], "--format is 'xml'; it must be one of: table, json, prometheus"),
        (["--json", "--format", "table"], "--json and --format table contradict each other"),
        (["--watch", "0"], "--watch is '0'; it must be a number of seconds > 0"),
        (["--watch", "soon"], "--watch is 'soon'; it must be a number of seconds > 0"),
        (["--watch", "1", "--format", "prometheus"], "--watch works with --format table or json"),
    ],
)
def test_bad_options_are_command_errors(
    transactional_db: None, args: list[str], message: str
) -> None:
    with pytest.raises(CommandError) as info:
        poolstats(*args)
    assert message in str(info.value)


def test_an_alias_without_a_pool_says_so(transactional_db: None) -> None:
    plain = {**connection.settings_dict, "ENGINE": "django.db.backends.postgresql", "OPTIONS": {}}
    off = {**connection.settings_dict, "OPTIONS": {"pool": False}}
    saved = connections.settings
    connections.settings = {**saved, "plain": plain, "nopool": off}
    try:
        with pytest.raises(
            CommandError,
            match="'plain' uses ENGINE 'django.db.backends.postgresql', not django_pooled_pg",
        ):
            poolstats("--database", "plain")
        with pytest.raises(CommandError, match="'nopool' uses django_pooled_pg with pooling off"):
            poolstats("--database", "nopool")
        assert set(json.loads(poolstats("--json", "--no-server"))["aliases"]) == {
            "default",
            "small",
        }
    finally:
        connections.settings = saved
        for alias in ("plain", "nopool"):
            if hasattr(connections._connections, alias):
                delattr(connections._connections, alias)


def run_manage(args: list[str], env: dict[str, str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "poolstats", *args],
        cwd=TESTPROJECT,
        env={**os.environ, "PYTHONPATH": str(TESTPROJECT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def private_env(server: Any) -> dict[str, str]:
    return {
        "PGHOST": server.host,
        "PGPORT": str(server.port),
        "PGUSER": server.user,
        "PGPASSWORD": server.password,
        "PGDATABASE": "private",
        "DATABASE_URL": "",
    }


def test_a_database_that_is_down_is_reported_and_the_rest_still_shown(private_server: Any) -> None:
    env = private_env(private_server)
    private_server.stop()
    proc = run_manage(["--database", "default"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "server: unavailable:" in out
    assert "default " in out  # the configuration line is still there
    assert private_server.password not in out + err

    proc = run_manage(["--json", "--database", "default"], env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    doc = json.loads(out)
    assert doc["aliases"]["default"]["server"] is None
    assert doc["aliases"]["default"]["server_error"]
    assert private_server.password not in out + err


def test_watch_refreshes_with_rates_until_ctrl_c(private_server: Any) -> None:
    """--watch: several refreshes, per-second rates from the second one, and a
    clean exit (status 0, no traceback) on SIGINT."""
    proc = run_manage(
        ["--watch", "0.3", "--json", "--database", "default"], private_env(private_server)
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = CheckedThread(target=read)
    reader.start()
    try:
        wait_until(lambda: len(lines) >= 3, timeout=30, interval=0.05, message="three refreshes")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        reader.join(5)
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    docs = [json.loads(line) for line in lines if line.strip()]
    assert len(docs) >= 3
    assert docs[0]["aliases"]["default"]["rates"] is None
    assert set(docs[1]["aliases"]["default"]["rates"]) >= {"checkouts", "timeouts", "opened"}


def test_settings_for_the_stats_cache_are_validated(transactional_db: None, settings: Any) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from django_pooled_pg.observability.publisher import publish_settings

    for bad, message in [
        ({"CACHE": "nowhere"}, "POOLED_PG_STATS['CACHE'] is 'nowhere'; it must be None or one of"),
        ({"INTERVAL": 0}, "POOLED_PG_STATS['INTERVAL'] is 0; it must be a number of seconds > 0"),
        ({"INTERVAL": "5"}, "POOLED_PG_STATS['INTERVAL'] is '5'"),
        ({"CACHES": "x"}, "unknown keys ['CACHES']"),
        ("default", "must be a dict"),
    ]:
        settings.POOLED_PG_STATS = bad
        with pytest.raises(ImproperlyConfigured) as info:
            publish_settings()
        assert message in str(info.value)
    # poolstats still works and says why it shows this process only.
    settings.POOLED_PG_STATS = {"CACHE": None}
    doc = json.loads(poolstats("--json", "--no-server"))
    assert "publishing is off" in doc["transport"]["note"]


def test_an_unreadable_stats_cache_is_reported_and_this_process_still_shown(
    transactional_db: None, settings: Any
) -> None:
    """The transport fails (here a database cache whose table was never
    created; a database that is down fails the same way): poolstats says so
    and still shows what its own process knows."""
    busy_default(1)
    settings.CACHES = {
        **settings.CACHES,
        "stats": {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": "no_such_cache_table",
        },
    }
    settings.POOLED_PG_STATS = {"CACHE": "stats"}
    doc = json.loads(poolstats("--json", "--no-server"))
    assert doc["transport"]["shared"] is True
    assert "cache 'stats' cannot be read" in doc["transport"]["error"]
    assert "no_such_cache_table" in doc["transport"]["error"]
    (mine,) = doc["aliases"]["default"]["processes"]
    assert mine["pid"] == os.getpid() and mine["live"]["in_use"] == 1
    text = poolstats("--no-server", "--database", "default")
    assert "Other processes: unavailable, cache 'stats' cannot be read" in text
    assert f"{HOSTNAME}:{os.getpid()} (this)" in text
