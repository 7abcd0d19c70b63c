"""Failover: a real primary and its streaming standby, started by the harness.

libpq's multi-host settings (``HOST "a,b"``, ``PORT "p1,p2"``,
``target_session_attrs=read-write``) choose the server of each new
connection; the pool makes sure no request is served by a session on a
server of the wrong role, and measures what the application sees when the
primary dies and the standby is promoted. The figures each test prints
(``-s``) are the ones docs/scaling-out.md quotes.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import median
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connections

import django_pooled_pg
from django_pooled_pg import registry
from dpp_devtools.proxy import Proxy
from dpp_devtools.replication import ReplicatedPair
from dpp_devtools.throwaway import ThrowawayServer
from tests.helpers import CheckedThread, Workers, db_settings

pytestmark = pytest.mark.slow

TIMEOUT = 2.0  # the pool's timeout
CONNECT_TIMEOUT = 2  # libpq's (its minimum: 1 counts as 2)


def pair_settings(
    pair: ReplicatedPair, *servers: ThrowawayServer, pool: Any = True, **options: Any
) -> dict[str, Any]:
    """Settings for database ``private`` on *servers*, in that order (libpq multi-host)."""
    s = db_settings(
        NAME=pair.dbname,
        HOST=",".join(server.host for server in servers),
        PORT=",".join(str(server.port) for server in servers),
        USER=pair.primary.user,
        PASSWORD=pair.primary.password,
    )
    s["TEST"] = {**s["TEST"], "NAME": pair.dbname}
    s["OPTIONS"] = {**s["OPTIONS"], **options, "pool": pool}
    return s


@contextlib.contextmanager
def alias_of(name: str, settings: dict[str, Any]) -> Iterator[str]:
    """DATABASES[name] = settings while the block runs: the ORM's ``using(name)``
    works from any thread (each gets its own wrapper on the alias's one pool)."""
    connections.settings[name] = settings
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            connections[name].close()
        with contextlib.suppress(AttributeError):
            delattr(connections._connections, name)
        del connections.settings[name]
        registry.close_matching(lambda p: p.alias == name)


def create_table(alias: str) -> None:
    from demoapp.models import Counter

    with connections[alias].schema_editor() as editor:
        editor.create_model(Counter)
    connections[alias].close()


@dataclass
class Result:
    started: float
    ended: float
    name: str
    error: BaseException | None


class Writers(Workers):
    """Threads writing one row per request through the ORM, each outcome recorded."""

    def __init__(self, alias: str, threads: int = 8) -> None:
        super().__init__(threads)
        self.alias = alias
        self.results: list[Result] = []

    def work(self, i: int) -> None:
        from demoapp.models import Counter

        wrapper = connections[self.alias]
        n = 0
        try:
            while not self.stopping.is_set():
                name = f"w{i}-{n}"
                n += 1
                t0 = time.monotonic()
                error: BaseException | None = None
                try:
                    Counter.objects.using(self.alias).create(name=name)
                except Exception as exc:
                    error = exc
                finally:
                    wrapper.close()  # the end of the request
                self.results.append(Result(t0, time.monotonic(), name, error))
                if error is not None:
                    time.sleep(0.02)
        finally:
            wrapper.close()

    @property
    def acknowledged(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    def failed(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]


def rows_on(pair: ReplicatedPair, server: ThrowawayServer) -> set[str]:
    with pair.connect(server) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM demoapp_counter")}


def failover_under_load(
    pair: ReplicatedPair, hosts: list[ThrowawayServer], break_primary: Any
) -> tuple[Writers, float, float, int | None]:
    """8 threads writing through the ORM (max_size=4) while the primary breaks
    and, a second later, the standby is promoted.

    Returns the writers, when the primary broke, when the promotion finished,
    and the standby's replay lag (bytes) just before the break.
    """
    settings = pair_settings(
        pair,
        *hosts,
        pool={"min_size": 4, "max_size": 4, "timeout": TIMEOUT},
        target_session_attrs="read-write",
        connect_timeout=CONNECT_TIMEOUT,
    )
    with alias_of("failover", settings) as alias:
        create_table(alias)
        with Writers(alias) as writers:
            time.sleep(1.0)
            lag = pair.replay_lag_bytes()
            broke = time.monotonic()
            break_primary()
            time.sleep(1.0)
            promoted = pair.promote()
            time.sleep(3.0 + CONNECT_TIMEOUT)
        assert django_pooled_pg.stats(alias).live.in_use == 0
        assert connections[alias].pool.get_stats()["pool_size"] <= 4
    return writers, broke, promoted, lag


def check_failover(
    writers: Writers, broke: float, promoted: float, first_write_within: float
) -> dict[str, float]:
    """What every failover must show; the figures, for the docs."""
    failed = writers.failed()
    assert failed, "no request ran while there was no primary"
    for r in failed:
        assert isinstance(r.error, OperationalError), repr(r.error)
        assert r.ended - r.started < TIMEOUT + CONNECT_TIMEOUT + 0.5, (
            r.ended - r.started,
            repr(r.error),
        )
    first_ok = min(
        r.ended for r in writers.acknowledged if r.started > broke and r.ended > promoted
    )
    assert first_ok - promoted < first_write_within, first_ok - promoted
    late = [r for r in failed if r.started >= first_ok]
    assert not late, [repr(r.error) for r in late[:3]]
    figures = {
        "requests": len(writers.results),
        "failed": len(failed),
        "failed_median_s": median(r.ended - r.started for r in failed),
        "failed_max_s": max(r.ended - r.started for r in failed),
        "first_write_after_promotion_s": first_ok - promoted,
        "last_failure_after_promotion_s": max(r.ended for r in failed) - promoted,
    }
    return figures


def test_synchronous_failover_fails_in_time_recovers_at_once_and_loses_no_write(
    replicated,
) -> None:
    pair = replicated(synchronous=True)
    writers, broke, promoted, lag = failover_under_load(
        pair, [pair.primary, pair.standby], lambda: pair.primary.stop("immediate")
    )
    figures = check_failover(writers, broke, promoted, first_write_within=2.0)
    on_new_primary = rows_on(pair, pair.standby)
    acknowledged = {r.name for r in writers.acknowledged}
    lost = acknowledged - on_new_primary
    assert not lost, f"{len(lost)} acknowledged writes missing: {sorted(lost)[:5]}"
    assert len(acknowledged) > 100  # before and after the failover
    print(f"\nsynchronous, refused: {figures}, acknowledged={len(acknowledged)}, lost=0")


def test_asynchronous_failover_loses_at_most_what_had_not_replicated(replicated) -> None:
    """The loss window is the replication lag at the moment of failure: the
    writes acknowledged by the primary that the standby had not received."""
    pair = replicated(synchronous=False)
    writers, broke, promoted, lag = failover_under_load(
        pair, [pair.primary, pair.standby], lambda: pair.primary.stop("immediate")
    )
    figures = check_failover(writers, broke, promoted, first_write_within=2.0)
    on_new_primary = rows_on(pair, pair.standby)
    acknowledged = {r.name: r for r in writers.acknowledged}
    lost = [acknowledged[name] for name in set(acknowledged) - on_new_primary]
    # Lost writes, if any, are the last ones before the crash: within the lag.
    for r in lost:
        assert broke - r.ended < 1.0, (broke - r.ended, r.name)
    print(
        f"\nasynchronous, refused: {figures}, acknowledged={len(acknowledged)}, "
        f"lost={len(lost)}, replay lag before the crash={lag} bytes"
    )


def test_failover_from_a_primary_that_drops_packets(replicated) -> None:
    """The old primary's address stops answering (its sessions end, new
    connection attempts get no answer): each attempt costs connect_timeout
    there before libpq tries the next host."""
    pair = replicated(synchronous=True)
    proxy = Proxy(pair.primary.host, pair.primary.port)
    front = ThrowawayServer(bindir=pair.primary.bindir, port=proxy.port)

    def go_silent() -> None:
        proxy.silence_new()
        pair.primary.stop("immediate")

    try:
        writers, broke, promoted, lag = failover_under_load(pair, [front, pair.standby], go_silent)
        # The first new connection after the promotion waits connect_timeout
        # on the silent host first (docs/scaling-out.md: host order).
        figures = check_failover(writers, broke, promoted, first_write_within=CONNECT_TIMEOUT + 1.0)
        assert not {r.name for r in writers.acknowledged} - rows_on(pair, pair.standby)
        print(f"\nsynchronous, silent old primary: {figures}")
    finally:
        proxy.close()


def test_read_write_sessions_never_serve_from_a_standby(replicated) -> None:
    """The standby listed first: libpq skips it for each new connection."""
    pair = replicated()
    settings = pair_settings(
        pair, pair.standby, pair.primary, pool={"max_size": 4}, target_session_attrs="read-write"
    )
    with alias_of("rw", settings) as alias:
        seen: list[bool] = []

        def requests() -> None:
            wrapper = connections[alias]
            for _ in range(25):
                try:
                    with wrapper.cursor() as cursor:
                        cursor.execute("SELECT pg_is_in_recovery()")
                        seen.append(cursor.fetchone()[0])
                finally:
                    wrapper.close()

        threads = [CheckedThread(target=requests) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert seen == [False] * 100


def test_a_standby_reached_by_a_primary_alias_serves_nothing_until_promoted(
    replicated,
) -> None:
    """No target_session_attrs: the alias needs a primary (server_role
    'primary'); a new connection to a standby is a failed attempt, named."""
    pair = replicated()
    settings = pair_settings(pair, pair.standby, pool={"max_size": 2, "timeout": TIMEOUT})
    with alias_of("to_standby", settings) as alias:
        wrapper = connections[alias]
        with pytest.raises(OperationalError) as caught:
            wrapper.ensure_connection()
        assert "hot standby" in str(caught.value) and "server_role" in str(caught.value)
        assert "For a read replica, set OPTIONS['target_session_attrs']" in str(caught.value)
        assert isinstance(caught.value, django_pooled_pg.ServerUnavailable)
        pair.primary.stop("immediate")
        promoted = pair.promote()
        while True:
            try:
                with wrapper.cursor() as cursor:
                    cursor.execute("SELECT pg_is_in_recovery()")
                    assert cursor.fetchone() == (False,)
                break
            except OperationalError:
                assert time.monotonic() - promoted < 2.0, "not serving 2 s after the promotion"
                time.sleep(0.05)
            finally:
                wrapper.close()


def read_only(server: ThrowawayServer, on: bool) -> None:
    """Turn default_transaction_read_only on or off and reload (as fencing a primary does)."""
    with psycopg.connect(**server.conninfo("postgres"), autocommit=True) as conn:
        value = "on" if on else "off"
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
        conn.execute("SELECT pg_reload_conf()")
    # A new session starts with the postmaster's settings; once it has the
    # value, the postmaster has reloaded and signalled every session.
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with psycopg.connect(**server.conninfo("postgres"), autocommit=True) as conn:
            if conn.info.parameter_status("default_transaction_read_only") == value:
                return
        time.sleep(0.01)
    raise AssertionError("the server did not reload")


def write(alias: str) -> None:
    """One request that writes a row through the ORM."""
    from demoapp.models import Counter

    try:
        Counter.objects.using(alias).create(name=f"r{time.monotonic_ns()}")
    finally:
        connections[alias].close()


def read(alias: str) -> bool:
    """One request that reads; whether its server is a standby."""
    wrapper = connections[alias]
    try:
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT pg_is_in_recovery()")
            return bool(cursor.fetchone()[0])
    finally:
        wrapper.close()


def in_new_thread(fn: Any, *args: Any) -> BaseException | None:
    """Run one request in a thread of its own (it takes from the pool, not a
    connection parked by an earlier request); the exception it raised."""
    box: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except Exception as exc:
            box.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return box[0] if box else None


_fenced = itertools.count()


@contextlib.contextmanager
def fenced_failover(pair: ReplicatedPair, **pool: Any) -> Iterator[str]:
    """Four idle connections on the primary; then the standby is promoted and
    the old primary, still reachable, is fenced read-only (as a failover
    manager demotes it). HOST lists the old primary first."""
    settings = pair_settings(
        pair,
        pair.primary,
        pair.standby,
        pool={"min_size": 4, "max_size": 4, "timeout": TIMEOUT, **pool},
        target_session_attrs="read-write",
    )
    with alias_of(f"fenced{next(_fenced)}", settings) as alias:
        create_table(alias)
        from tests.helpers import wait_until

        wait_until(lambda: django_pooled_pg.stats(alias).live.idle == 4, message="4 idle")
        pair.wait_caught_up()
        pair.promote()
        read_only(pair.primary, True)
        yield alias


@pytest.mark.parametrize("drain", [True, False], ids=["drain", "each_found_out"])
def test_one_session_that_sees_the_primary_move_drains_the_others(replicated, drain) -> None:
    pair = replicated()
    with fenced_failover(pair, drain_on_role_change=drain) as alias:
        errors = [in_new_thread(write, alias) for _ in range(8)]
        failed = [e for e in errors if e is not None]
        for e in failed:
            assert "read-only transaction" in str(e), repr(e)
        # With the drain, the first write that hears the change is the only
        # one to fail; without, each of the 4 connections fails one request.
        assert len(failed) == (1 if drain else 4), errors
        assert errors[len(failed) :] == [None] * (8 - len(failed))
        assert django_pooled_pg.stats(alias).closed_by_reason["role_change"] == 4
        assert not in_new_thread(lambda: read(alias) and pytest.fail("served by the standby"))


def test_a_read_that_hears_the_primary_move_fails_nothing(replicated) -> None:
    """The old primary still serves reads: the session that heard the change
    serves its request, and the pool drains before any write fails."""
    pair = replicated()
    with fenced_failover(pair) as alias:
        assert in_new_thread(read, alias) is None
        errors = [in_new_thread(write, alias) for _ in range(8)]
        assert errors == [None] * 8
        assert django_pooled_pg.stats(alias).closed_by_reason["role_change"] == 4


def test_max_lifetime_bounds_how_long_connections_to_the_old_primary_live(replicated) -> None:
    pair = replicated()
    with fenced_failover(pair, drain_on_role_change=False, max_lifetime=2.0) as alias:
        time.sleep(2.2)  # psycopg_pool shortens each lifetime by up to 5% (jitter)
        errors = [in_new_thread(write, alias) for _ in range(8)]
        assert errors == [None] * 8
        # (more if the writes outlast a replacement's own lifetime)
        assert django_pooled_pg.stats(alias).closed_by_reason["lifetime"] >= 4


def test_sessions_that_heard_their_server_turn_read_only_are_discarded_at_checkout(
    private_server, make_wrapper
) -> None:
    """What an earlier query heard (ParameterStatus) is read at checkout, with
    no round trip; the replacement is refused while the server stays read-only
    (a failed attempt, ServerUnavailable), and the pool recovers on its own."""
    from tests.helpers import private_settings, wait_until

    wrapper = make_wrapper(
        pool={"min_size": 2, "max_size": 2, "timeout": TIMEOUT},
        settings=private_settings(private_server),
    )
    pool = wrapper.pool
    wrapper.ensure_connection()
    wrapper.close()
    wait_until(lambda: django_pooled_pg.stats(wrapper.alias).live.idle == 2)
    read_only(private_server, True)
    pool.check()  # a query on each idle session, which hears the change
    t0 = time.monotonic()
    with pytest.raises(django_pooled_pg.ServerUnavailable) as caught:
        wrapper.ensure_connection()
    assert time.monotonic() - t0 < TIMEOUT
    assert "read-only (default_transaction_read_only=on)" in str(caught.value)
    assert django_pooled_pg.stats(wrapper.alias).closed_by_reason["role_change"] == 2
    read_only(private_server, False)
    back = time.monotonic()
    wait_until(lambda: in_new_thread(write_raw, wrapper) is None, timeout=2.0)
    print(f"\nserving again {time.monotonic() - back:.2f} s after the server turned writable")


def write_raw(wrapper: Any) -> None:
    w = wrapper.copy()
    try:
        with w.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE written (x int)")
    finally:
        w.close()


def test_a_write_refused_as_read_only_discards_only_its_connection(
    private_server, make_wrapper
) -> None:
    """SQLSTATE 25006 where the server reports nothing read-only (here the
    request's own read-only transaction): that connection is replaced, the
    others are kept."""
    from django.db import InternalError

    from tests.helpers import private_settings

    wrapper = make_wrapper(
        pool={"min_size": 2, "max_size": 2}, settings=private_settings(private_server)
    )
    other = wrapper.copy()
    other.ensure_connection()
    other_pid = other.connection.info.backend_pid
    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS ro (x int)")
        pid = wrapper.connection.info.backend_pid
    wrapper.set_autocommit(False)
    try:
        with (
            pytest.raises(InternalError, match="read-only transaction"),
            wrapper.cursor() as cursor,
        ):
            cursor.execute("SET TRANSACTION READ ONLY")
            cursor.execute("INSERT INTO ro VALUES (1)")
    finally:
        wrapper.rollback()
        wrapper.set_autocommit(True)
        wrapper.close()
    other.close()
    assert django_pooled_pg.stats(wrapper.alias).closed_by_reason["role_change"] == 1
    pids = set()
    for w in (wrapper, other):
        w.ensure_connection()
        pids.add(w.connection.info.backend_pid)
    assert other_pid in pids and pid not in pids
    wrapper.close()
    other.close()


def test_several_hosts_without_target_session_attrs_reach_the_primary(replicated) -> None:
    """libpq alone stays on the first host that answers; an alias that needs a
    primary asks it for a writable one (target_session_attrs=read-write)."""
    pair = replicated()
    settings = pair_settings(pair, pair.standby, pair.primary, pool={"max_size": 2})
    with alias_of("hosts", settings) as alias:
        assert [
            in_new_thread(lambda: read(alias) and pytest.fail("a standby")) for _ in range(5)
        ] == [None] * 5
        assert django_pooled_pg.stats(alias).counters.connect_errors == 0


def set_read_only(conn: Any) -> None:
    conn.execute("SET default_transaction_read_only = on")


def test_a_configure_that_makes_sessions_read_only_keeps_them(private_server, make_wrapper) -> None:
    """What the pool's own configure sets is the session's start, not a role change."""
    from tests.helpers import private_settings

    wrapper = make_wrapper(
        pool={"max_size": 1, "configure": set_read_only},
        settings=private_settings(private_server),
    )
    pids = set()
    for _ in range(5):
        with wrapper.cursor() as cursor:
            cursor.execute(
                "SELECT pg_backend_pid(), current_setting('default_transaction_read_only')"
            )
            pid, read_only_setting = cursor.fetchone()
        wrapper.close()
        assert read_only_setting == "on"
        pids.add(pid)
    assert len(pids) == 1
    assert django_pooled_pg.stats(wrapper.alias).closed_by_reason["role_change"] == 0
