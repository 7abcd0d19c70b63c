"""Sizing advice (poolstats --advise) and the limit check at a pool's first connection."""

from __future__ import annotations

import json
import logging
import math
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from django_pooled_pg.observability.activity import ServerView
from django_pooled_pg.observability.pooler import PoolerPool, PoolerView
from django_pooled_pg.observability.records import AliasRecord, LiveState, PoolConfig
from django_pooled_pg.observability.report import AliasReport, totals
from django_pooled_pg.observability.sizing import advise
from tests.conftest import Make
from tests.helpers import wait_until


def recorded(
    checkouts: int, seconds: float, hold: float, wait: float = 0.0, max_size: int = 10
) -> AliasReport:
    """An alias whose one process checked out *checkouts* times in *seconds*,
    holding each *hold* s after waiting *wait* s: what its record would say."""
    record = AliasRecord("advised")
    for _ in range(checkouts):
        record.checked_out(wait)
        record.returned(hold)
    record.since = time.time() - seconds
    config = PoolConfig(
        "db:5432/app", "app", 1, max_size, 30.0, 0, 3600.0, 600.0, "auto", True, None
    )
    live = LiveState(True, 2, 2, 0, 0, 0.0, 0.0, 0.0, "")
    stats = record.snapshot(live, config)
    return AliasReport(alias="advised", config=config, processes=[stats], totals=totals([stats]))


def server(max_connections: int = 100, reserved: int = 3, others: int = 7, **kw: Any) -> ServerView:
    # client_sessions counts poolstats' own session too.
    return ServerView(max_connections, reserved, client_sessions=others + 1, **kw)


def test_littles_law_on_recorded_holds_gives_the_known_answer() -> None:
    a = recorded(checkouts=6000, seconds=60, hold=0.05)  # λ = 100/s, W = 50 ms
    a.server = server()
    adv = advise(a)
    assert adv.checkouts_per_second == pytest.approx(100, rel=0.01)
    assert adv.in_use_mean == pytest.approx(5, rel=0.01)  # L = λ·W
    assert adv.recommended_max_size == math.ceil(5 + 3 * math.sqrt(5)) == 12
    assert adv.limit == 97 and adv.other_clients == 7
    assert adv.processes_that_fit == (97 - 7) // 12 == 7
    assert adv.processes == 1 and adv.deployment_needs == 10 and not adv.over_limit
    text = "\n".join(adv.reasoning)
    assert "L = λ·W = 5.00" in text and "Little's law" in text
    assert "max_connections 100 - 3 reserved for superusers = 97" in text


def test_waiting_checkouts_are_a_sign_of_bursts_not_more_demand() -> None:
    """At the same throughput a bigger pool has the same L in use: waits do not add."""
    a = recorded(checkouts=6000, seconds=60, hold=0.05, wait=0.01)  # Lq = 100 x 0.01 = 1
    a.server = server()
    adv = advise(a)
    assert adv.waiting_mean == pytest.approx(1, rel=0.01)
    assert adv.recommended_max_size == 12
    text = "\n".join(adv.reasoning)
    assert "Lq = λ·Wq = 1.00 waiting on average" in text and "raise max_size" in text


def test_a_deployment_that_can_exceed_the_server_is_warned(settings: Any) -> None:
    settings.POOLED_PG_PROCESSES = 10
    a = recorded(checkouts=6000, seconds=60, hold=0.05)
    a.server = server()
    adv = advise(a)
    assert adv.processes == 10 and adv.deployment_needs == 100
    assert adv.over_limit
    assert "WARNING: 100 > 90" in "\n".join(adv.reasoning)


def test_reserved_connections_of_postgresql_16_count_against_the_limit() -> None:
    a = recorded(checkouts=600, seconds=60, hold=0.01)
    a.server = server(reserved_connections=5)
    adv = advise(a)
    assert adv.limit == 100 - 3 - 5
    assert "and 5 for pg_use_reserved_connections" in "\n".join(adv.reasoning)


def test_behind_pgbouncer_its_max_client_conn_is_the_limit() -> None:
    a = recorded(checkouts=600, seconds=60, hold=0.01)
    a.pooler = PoolerView(
        "PgBouncer 1.18.0",
        pools=[PoolerPool("app", "app", "transaction", 30, 0, 5, 5, 0, 0.0)],
        max_client_conn=200,
    )
    adv = advise(a)
    assert adv.limit == 200 and adv.limit_source == "pgbouncer max_client_conn"
    assert adv.other_clients == 30 - 2  # PgBouncer's clients less this alias's 2


def test_nothing_measured_yet_says_so() -> None:
    a = recorded(checkouts=0, seconds=60, hold=0.0)
    a.server = server()
    adv = advise(a)
    assert adv.recommended_max_size is None
    assert "nothing to measure" in adv.reasoning[0]


def test_poolstats_advise_on_this_process(transactional_db: None) -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.execute("SHOW max_connections")
        (max_connections,) = cursor.fetchone()
    connection.close()
    out = StringIO()
    call_command("poolstats", "--advise", "--local", "--database", "default", stdout=out)
    assert "recommended max_size per process:" in out.getvalue()
    assert f"Server: max_connections {max_connections} - " in out.getvalue()
    out = StringIO()
    call_command("poolstats", "--advise", "--json", "--local", "--database", "default", stdout=out)
    adv = json.loads(out.getvalue())["aliases"]["default"]
    assert adv["recommended_max_size"] >= 1 and adv["limit_source"] == "server max_connections"
    with pytest.raises(CommandError, match="--advise and --holders are two reports"):
        call_command("poolstats", "--advise", "--holders", "--local")


def test_the_first_connection_warns_when_the_deployment_can_exceed_the_server(
    make_wrapper: Make, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="django_pooled_pg")
    settings.POOLED_PG_PROCESSES = 1000
    w = make_wrapper(pool={"min_size": 1, "max_size": 4})
    for _ in range(3):
        w.ensure_connection()
        w.close()

    def warned() -> list[str]:
        return [r.getMessage() for r in caplog.records if "can exceed" in r.getMessage()]

    # The first connection's configure logs it; a second one, opened as the
    # first checkout waited, may have served that checkout before.
    wait_until(warned, timeout=10, message="the limit warning")
    time.sleep(0.2)  # and no second warning comes
    found = warned()
    assert len(found) == 1, found
    assert "max_size 4 x 1000 POOLED_PG_PROCESSES = 4000 connections" in found[0]

    caplog.clear()
    for processes in (1, 0):  # 0: no check at all
        settings.POOLED_PG_PROCESSES = processes
        w = make_wrapper(pool={"min_size": 1, "max_size": 4})
        w.ensure_connection()
        w.close()
    assert not [r for r in caplog.records if "can exceed" in r.getMessage()]


def test_without_the_setting_the_processes_seen_are_counted_off_the_connection(
    django_db_blocker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that takes 2 clients, one process with max_size 4: the check
    counts the processes publishing stats in a thread of its own, and warns."""
    from django_pooled_pg.base import DatabaseWrapper
    from dpp_devtools import throwaway
    from tests.helpers import private_settings, wait_until

    caplog.set_level(logging.WARNING, logger="django_pooled_pg")
    server = throwaway.start_private("private", max_connections="5")  # 3 reserved
    try:
        with django_db_blocker.unblock():
            s = private_settings(server)
            s["OPTIONS"] = {**s["OPTIONS"], "pool": {"min_size": 1, "max_size": 4}}
            w = DatabaseWrapper(s, "limited")
            w.ensure_connection()
            w.close()

            def warned() -> list[str]:
                return [r.getMessage() for r in caplog.records if "can exceed" in r.getMessage()]

            found = wait_until(warned, timeout=10, message="the limit warning")
            w.close_pool()
    finally:
        server.destroy()
    assert len(found) == 1
    assert "max_size 4 x 1 processes seen publishing stats = 4 connections" in found[0]
    assert "the 2 client sessions the server takes (max_connections 5 - 3 reserved)" in found[0]
