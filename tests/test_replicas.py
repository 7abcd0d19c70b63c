"""Read replicas: a replica alias beside the primary's, pooled on its own,
with ``django_pooled_pg.routers.ReplicaRouter`` sending reads to it.

A real primary and streaming standby (asynchronous: a synchronous standby
that stops makes the primary's commits wait, by PostgreSQL's design).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.management import call_command
from django.db import OperationalError, connections, router
from django.test import override_settings

import django_pooled_pg
from django_pooled_pg.routers import ReplicaRouter
from dpp_devtools.replication import ReplicatedPair
from tests.helpers import wait_until
from tests.test_failover import alias_of, create_table, pair_settings

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def primary_and_replica(
    pair: ReplicatedPair, replica_hosts: str = "standby", **replica_options: Any
) -> Iterator[tuple[str, str]]:
    """Aliases "rprimary" (the primary) and "rreplica" (by default the
    standby alone, target_session_attrs read-only), routed by ReplicaRouter."""
    servers = {"standby": [pair.standby], "standby,primary": [pair.standby, pair.primary]}
    options = {"target_session_attrs": "read-only", "connect_timeout": 2, **replica_options}
    pool = {"max_size": 4, "timeout": 2.0}
    with (
        alias_of("rprimary", pair_settings(pair, pair.primary, pool=pool)) as primary,
        alias_of(
            "rreplica",
            pair_settings(pair, *servers[replica_hosts], pool=pool, **options),
        ) as replica,
        override_settings(DATABASE_ROUTERS=[ReplicaRouter(primary=primary, replicas=[replica])]),
    ):
        create_table(primary)
        pair.wait_caught_up()
        yield primary, replica


def request(fn: Any) -> Any:
    """One request: *fn*, then every connection goes back (request_finished)."""
    try:
        return fn()
    finally:
        for alias in ("rprimary", "rreplica"):
            connections[alias].close()


def write(name: str) -> None:
    from demoapp.models import Counter

    Counter.objects.create(name=name)  # routed: db_for_write


def count() -> int:
    from demoapp.models import Counter

    return Counter.objects.count()  # routed: db_for_read


def served_by_standby(alias: str) -> bool:
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery()")
        return bool(cursor.fetchone()[0])


def test_reads_go_to_the_replica_and_writes_to_the_primary(replicated) -> None:
    from demoapp.models import Counter

    pair = replicated()
    with primary_and_replica(pair) as (primary, replica):
        assert router.db_for_read(Counter) == replica
        assert router.db_for_write(Counter) == primary
        for n in range(5):
            request(lambda n=n: write(f"row{n}"))
        pair.wait_caught_up()
        assert request(count) == 5
        assert request(lambda: served_by_standby(router.db_for_read(Counter)))
        assert not request(lambda: served_by_standby(router.db_for_write(Counter)))
        # Each alias has its own pool: the replica's served the read.
        assert django_pooled_pg.stats(replica).counters.checkouts >= 2
        assert django_pooled_pg.stats(primary).config.server_role == "primary"
        assert django_pooled_pg.stats(replica).config.server_role == "any"


def test_the_replica_down_neither_blocks_nor_fails_the_primary_and_reads_fall_back(
    replicated,
) -> None:
    from demoapp.models import Counter

    pair = replicated()
    with primary_and_replica(pair) as (primary, replica):
        request(count)  # the replica's pool is open and holds a connection
        pair.standby.stop("immediate")
        # A read finds it out (the server closed its session; the postmaster
        # may exit a moment before its last backends): it fails in time, and
        # the pool's own connection attempt then fails too (at once when
        # refused; connect_timeout when the server is silent).
        failures = 0
        end = time.monotonic() + 10
        while (down := django_pooled_pg.unavailable(replica)) is None:
            assert time.monotonic() < end, "the replica's pool never noticed"
            t0 = time.monotonic()
            try:
                request(count)
            except OperationalError:
                failures += 1
                assert time.monotonic() - t0 < 2.0 + 2 + 0.5  # timeout + connect_timeout
            time.sleep(0.02)
        assert failures <= 3  # those before the pool's own attempt failed (milliseconds)
        assert down.alias == replica and down.server_role == "any"
        assert f"port {pair.standby.port}" in down.cause  # which server, and why
        # From then on reads go to the primary, and writes never noticed.
        assert router.db_for_read(Counter) == primary
        for n in range(20):
            t0 = time.monotonic()
            request(lambda n=n: write(f"down{n}"))
            assert request(count) == n + 1
            assert time.monotonic() - t0 < 0.5
        assert django_pooled_pg.unavailable(primary) is None
        # The replica comes back: the pool reconnects on its own, reads return to it.
        pair.standby.start()
        wait_until(
            lambda: request(count) >= 0 and router.db_for_read(Counter) == replica,
            timeout=10,
            interval=0.1,
            message="reads routed to the replica again",
        )
        wait_until(lambda: request(count) == 20, timeout=10, interval=0.1)
        assert request(lambda: served_by_standby(router.db_for_read(Counter)))


def test_prefer_standby_falls_back_to_the_primary_within_libpq(replicated) -> None:
    """HOST "standby,primary" with prefer-standby: libpq itself connects to
    the primary while the standby is down; no request fails after the first
    that held a connection to it."""
    pair = replicated()
    with primary_and_replica(pair, "standby,primary", target_session_attrs="prefer-standby") as (
        primary,
        replica,
    ):
        assert request(lambda: served_by_standby(replica))
        pair.standby.stop("immediate")
        errors = 0
        for _ in range(10):
            try:
                assert not request(lambda: served_by_standby(replica))
            except OperationalError:
                errors += 1  # the connection the standby's shutdown ended
        assert errors <= 1


def test_a_lagging_replica_does_not_slow_the_primary_and_poolstats_shows_its_lag(
    replicated,
) -> None:
    pair = replicated()
    with primary_and_replica(pair) as (primary, replica):
        request(count)
        with pair.connect(pair.standby, "postgres") as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        paused = time.monotonic()
        for n in range(20):
            t0 = time.monotonic()
            request(lambda n=n: write(f"lag{n}"))
            assert time.monotonic() - t0 < 0.5
        assert request(count) == 0  # the replica serves, stale
        time.sleep(max(0.0, 1.5 - (time.monotonic() - paused)))
        out = io.StringIO()
        call_command("poolstats", "--local", stdout=out)
        text = out.getvalue()
        assert "standby, replay lag" in text, text
        lag = float(text.split("standby, replay lag ", 1)[1].split(" s", 1)[0].split()[0])
        assert lag >= 1.0, text
        report = io.StringIO()
        call_command("poolstats", "--local", "--json", "--database", replica, stdout=report)
        import json

        server = json.loads(report.getvalue())["aliases"][replica]["server"]
        assert server["role"] == "standby" and server["replay_lag"] >= 1.0
        primary_view = io.StringIO()
        call_command("poolstats", "--local", "--json", "--database", primary, stdout=primary_view)
        server = json.loads(primary_view.getvalue())["aliases"][primary]["server"]
        assert server["role"] == "primary" and server["replay_lag"] is None
        metrics = io.StringIO()
        call_command("poolstats", "--local", "--format", "prometheus", stdout=metrics)
        lines = metrics.getvalue().splitlines()
        assert f'django_pooled_pg_server_standby{{alias="{replica}"}} 1.0' in lines
        assert f'django_pooled_pg_server_standby{{alias="{primary}"}} 0.0' in lines
        (lag_line,) = [
            line
            for line in lines
            if line.startswith(f'django_pooled_pg_server_replay_lag_seconds{{alias="{replica}"}}')
        ]
        assert float(lag_line.split()[-1]) >= 1.0
        with pair.connect(pair.standby, "postgres") as conn:
            conn.execute("SELECT pg_wal_replay_resume()")
        pair.wait_caught_up()
        assert request(count) == 20
