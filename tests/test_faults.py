"""Fault injection: what the application sees when things break, and recovery.

Each test starts its own PostgreSQL cluster (and, where the network is the
subject, a TCP proxy between the engine and the server), breaks it, and
asserts the error, how long it took, and that the pool serves again with no
capacity lost.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.db import DatabaseError, OperationalError

import django_pooled_pg
from django_pooled_pg import PoolExhausted, ServerUnavailable
from django_pooled_pg.base import DatabaseWrapper
from dpp_devtools.proxy import Proxy
from tests.conftest import Make
from tests.helpers import CheckedThread, Workers, private_settings, wait_until

pytestmark = pytest.mark.slow


def query(wrapper: DatabaseWrapper, sql: str = "SELECT pg_backend_pid()") -> Any:
    with wrapper.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def request(wrapper: DatabaseWrapper, sql: str = "SELECT pg_backend_pid()") -> Any:
    """One request: check out, query, return (as close_old_connections does)."""
    try:
        return query(wrapper, sql)
    finally:
        wrapper.close()


def serves(wrapper: DatabaseWrapper) -> bool:
    """Whether one request succeeds."""
    try:
        request(wrapper)
        return True
    except OperationalError:
        return False


@pytest.fixture
def make_pooled(private_server, make_wrapper: Make) -> Callable[..., DatabaseWrapper]:
    """Pooled wrappers on the private cluster: ``make_pooled(port=..., **pool)``."""

    def make(
        port: int | None = None, options: dict[str, Any] | None = None, **pool: Any
    ) -> DatabaseWrapper:
        settings = private_settings(private_server)
        if port is not None:
            settings["PORT"] = str(port)
        return make_wrapper(pool=pool, options=options, settings=settings)

    return make


def admin_connect(server) -> psycopg.Connection[Any]:
    return psycopg.connect(**server.conninfo("postgres"), autocommit=True)


# -- 1. the server stops and starts under load ------------------------------


class Load(Workers):
    """Threads doing requests back to back, recording each outcome."""

    def __init__(self, wrapper: DatabaseWrapper, threads: int = 4) -> None:
        super().__init__(threads)
        self.wrapper = wrapper
        self.results: list[tuple[float, float, BaseException | None]] = []

    def work(self, i: int) -> None:
        wrapper = self.wrapper.copy()
        while not self.stopping.is_set():
            t0 = time.monotonic()
            error: BaseException | None = None
            try:
                request(wrapper, "SELECT pg_backend_pid(), pg_sleep(0.005)")
            except Exception as exc:
                error = exc
                time.sleep(0.02)
            self.results.append((t0, time.monotonic(), error))


@pytest.mark.parametrize("mode", ["fast", "immediate"])
@pytest.mark.parametrize("fail_fast", [True, False], ids=["fail_fast", "wait"])
def test_server_restart_under_load(private_server, make_pooled, mode: str, fail_fast: bool) -> None:
    timeout = 1.5
    wrapper = make_pooled(min_size=2, max_size=4, timeout=timeout, fail_fast=fail_fast)
    request(wrapper)
    with Load(wrapper) as load:
        time.sleep(0.5)
        down = time.monotonic()
        private_server.stop(mode)
        time.sleep(3.0)
        private_server.start()  # returns once the server accepts connections
        up = time.monotonic()
        time.sleep(2.0)
    during = [r for r in load.results if down < r[0] < up]
    failed = [r for r in during if r[2] is not None]
    assert failed, "no request ran while the server was down"
    for t0, t1, error in failed:
        assert isinstance(error, OperationalError), repr(error)
        assert t1 - t0 < timeout + 0.5, (t1 - t0, error)
    if fail_fast:
        # Requests already under way when the server went (each thread may
        # hold a session it kills) fail with its error; once a checkout has
        # failed with ServerUnavailable, every later one does.
        unavailable = [r for r in failed if isinstance(r[2], ServerUnavailable)]
        assert unavailable, failed
        known = unavailable[0][1]
        assert all(isinstance(e, ServerUnavailable) for t0, _, e in failed if t0 > known), [
            (t0 - known, repr(e)) for t0, _, e in failed if not isinstance(e, ServerUnavailable)
        ]
        last = str(failed[-1][2])  # the server's own words, as the pool last heard them
        assert any(cause in last for cause in ("refused", "shutting down", "starting up")), last
    first_ok = min(t1 for t0, t1, e in load.results if e is None and t0 >= up)
    assert first_ok - up < 1.0, first_ok - up  # serving again within 1 s
    late_failures = [r for r in load.results if r[2] is not None and r[0] >= first_ok]
    assert not late_failures, late_failures[:3]  # no stale connection afterwards
    assert wrapper.pool.get_stats()["pool_size"] <= 4
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0


FREEZE_CHECK = """
import sys, threading, time
from django.conf import settings
settings.configure(USE_TZ=True, INSTALLED_APPS=[])
import django
django.setup()
from django.db import OperationalError
from django_pooled_pg.base import DatabaseWrapper
from dpp_devtools.proxy import Proxy
host, port, user, password = sys.argv[1:5]
proxy = Proxy(host, int(port))
w = DatabaseWrapper({
    "ENGINE": "django_pooled_pg", "NAME": "private", "USER": user, "PASSWORD": password,
    "HOST": host, "PORT": str(proxy.port), "OPTIONS": {"pool": {"min_size": 2, "max_size": 4, "timeout": 3}},
    "CONN_MAX_AGE": 0, "CONN_HEALTH_CHECKS": False, "AUTOCOMMIT": True, "ATOMIC_REQUESTS": False,
    "TIME_ZONE": None, "TEST": {},
}, "freeze")
stop = threading.Event()
errors = []
def loop():
    try:
        mine = w.copy()
        while not stop.is_set():
            try:
                with mine.cursor() as cursor:
                    cursor.execute("SELECT 1")
            except OperationalError:
                time.sleep(0.01)
            finally:
                mine.close()
    except BaseException as exc:  # reported to the parent
        errors.append(repr(exc))
threads = [threading.Thread(target=loop, daemon=True) for _ in range(8)]
for t in threads:
    t.start()
last, worst = time.monotonic(), 0.0
for _ in range(300):  # 6 s of ticks; the parent restarts the server meanwhile
    time.sleep(0.02)
    now = time.monotonic()
    worst, last = max(worst, now - last), now
stop.set()
print("thread errors", errors, flush=True)
print("worst stall", worst, flush=True)
"""


def test_restarts_never_freeze_the_process(private_server) -> None:
    """No libpq call waits on a socket while holding the GIL.

    A session reset cut off by a restart used to leave PQgetResult waiting
    for the rest of an answer with the GIL held: every thread of the process
    froze (through the in-process proxy, for good). A child process runs load
    through a proxy and measures its longest stall while the server restarts
    again and again; a frozen child is killed, not waited for.
    """
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            FREEZE_CHECK,
            private_server.host,
            str(private_server.port),
            private_server.user,
            private_server.password,
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        time.sleep(1.0)
        for _ in range(6):
            private_server.restart("fast")
            time.sleep(0.5)
        out, _ = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        child.kill()
        raise AssertionError("the process froze during a restart") from None
    assert "thread errors []" in out, out
    worst = float(out.split()[-1])
    assert worst < 2.0, out


# -- 2. a backend terminated in the middle of a request -----------------------


def test_terminated_mid_request_fails_that_request_only(private_server, make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=1, timeout=2)
    victim = request(wrapper)
    box: dict[str, Any] = {}

    def long_request() -> None:
        t0 = time.monotonic()
        try:
            request(wrapper.copy(), "SELECT pg_sleep(10)")
        except Exception as exc:
            box["error"] = exc
        box["took"] = time.monotonic() - t0

    t = CheckedThread(target=long_request)
    t.start()
    with admin_connect(private_server) as admin:
        wait_until(
            lambda: admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'", [victim]
            ).fetchone(),
            timeout=5,
            interval=0.02,
            message="the long request running",
        )
        admin.execute("SELECT pg_terminate_backend(%s)", [victim])
    t.join(10)
    assert isinstance(box.get("error"), OperationalError), box
    assert "terminat" in str(box["error"])
    assert box["took"] < 5
    # Discarded, not returned: the next request gets a new session at once.
    t0 = time.monotonic()
    assert request(wrapper) != victim
    assert time.monotonic() - t0 < 1.0
    assert wrapper.pool.get_stats()["pool_size"] == 1


# -- 3. a network that goes silent ---------------------------------------------


def test_black_holed_network_fails_in_time_and_recovers(private_server, make_pooled) -> None:
    proxy = Proxy(private_server.host, private_server.port)
    try:
        timeout, connect_timeout = 1.0, 2
        wrapper = make_pooled(
            port=proxy.port,
            min_size=0,
            max_size=2,
            timeout=timeout,
            options={"connect_timeout": connect_timeout},
        )
        request(wrapper)
        wrapper.close_pool()  # no connection open: the next checkout needs a new one
        proxy.blackhole()
        silent = time.monotonic()
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(OperationalError):
                request(wrapper)
            assert time.monotonic() - t0 < timeout + connect_timeout + 0.5
        # The pool's own attempt ends at connect_timeout: its worker is free again.
        pool = wrapper.pool
        wait_until(
            lambda: pool.get_stats().get("connections_errors", 0),
            timeout=silent + connect_timeout + 3 - time.monotonic(),
            interval=0.05,
            message="a failed attempt (else a worker is stuck on a silent connection)",
        )
        proxy.resume()
        wait_until(
            lambda: serves(wrapper),
            timeout=2.0,
            interval=0.05,
            message="serving again within 2 s of the network coming back",
        )
        # No capacity lost: both connections at once.
        first, second = wrapper.copy(), wrapper.copy()
        try:
            assert query(first) != query(second)
        finally:
            first.close()
            second.close()
    finally:
        proxy.close()


def test_reset_answer_that_never_comes_fails_the_checkout_in_time(
    private_server, make_pooled
) -> None:
    """A connection returned just as the network went silent: its session
    reset is never answered; the next checkout gives up on it at timeout.
    (With "auto", a request that changed nothing sends no reset to wait for.)"""
    proxy = Proxy(private_server.host, private_server.port)
    try:
        wrapper = make_pooled(
            port=proxy.port,
            min_size=1,
            max_size=1,
            timeout=1.0,
            reset_session=True,
            options={"connect_timeout": 2},
        )
        query(wrapper)
        proxy.blackhole()
        wrapper.close()  # DISCARD ALL goes into the silence
        t0 = time.monotonic()
        with pytest.raises(OperationalError):
            request(wrapper)
        assert time.monotonic() - t0 < 1.0 + 0.5
        proxy.resume()
        recovers(wrapper)
    finally:
        proxy.close()


# -- 4. causes that are not outages: each named, no retry storm, recovery -------


def attempts_per_second(proxy: Proxy, seconds: float) -> list[int]:
    start = time.monotonic()
    time.sleep(seconds)
    return [proxy.attempts_between(start + i, start + i + 1) for i in range(int(seconds))]


def check_cause(wrapper: DatabaseWrapper, proxy: Proxy, cause: str, password: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(OperationalError) as info:
        request(wrapper)
    assert time.monotonic() - t0 < 2.5
    message = str(info.value)
    assert re.search(cause, message), message
    assert password not in message
    # Retrying in the background at a bounded, backing-off rate.
    rates = attempts_per_second(proxy, 3)
    assert max(rates) <= 12, rates
    assert sum(rates) >= 3, rates  # still retrying
    # Every later checkout fails at once (fail_fast), with the same cause:
    # well within the 2 s timeout it would otherwise wait.
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=cause):
        request(wrapper)
    assert time.monotonic() - t0 < 1.0


def recovers(wrapper: DatabaseWrapper) -> None:
    wait_until(
        lambda: serves(wrapper),
        timeout=2.0,
        interval=0.05,
        message="the pool to recover on its own",
    )


CAUSES = {
    # name: (SQL before, settings, SQL that breaks, the cause named, SQL that fixes)
    "wrong_password": (
        ["CREATE ROLE rotating LOGIN PASSWORD 'Not-The-Password-42'"],
        {"USER": "rotating"}, [], "password authentication failed",
        ["ALTER ROLE rotating PASSWORD {password}"],
    ),
    "role_without_login": (
        ["CREATE ROLE nologin_role NOLOGIN PASSWORD {password}"],
        {"USER": "nologin_role"}, [], "not permitted to log in",
        ["ALTER ROLE nologin_role LOGIN"],
    ),
    "dropped_database": (
        ["CREATE DATABASE doomed"],
        {"NAME": "doomed"}, ["DROP DATABASE doomed WITH (FORCE)"], 'database "doomed" does not exist',
        ["CREATE DATABASE doomed"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CAUSES))
def test_connection_refused_for_a_cause_names_it_and_recovers(
    private_server, make_pooled, case: str
) -> None:
    before, settings, breaks, cause, fixes = CAUSES[case]
    password = private_server.password

    def run(statements: list[str]) -> None:
        for statement in statements:
            admin.execute(statement.format(password=psycopg.sql.quote(password)))

    proxy = Proxy(private_server.host, private_server.port)
    with admin_connect(private_server) as admin:
        try:
            run(before)
            wrapper = make_pooled(port=proxy.port, min_size=1, max_size=2, timeout=2)
            wrapper.settings_dict.update(settings)
            if breaks:
                request(wrapper)  # works, until...
                wrapper.close_pool()
                run(breaks)
            check_cause(wrapper, proxy, cause, password)
            run(fixes)
            recovers(wrapper)
        finally:
            proxy.close()


def test_too_many_clients_is_named_and_recovers(private_server, make_pooled) -> None:
    proxy = Proxy(private_server.host, private_server.port)
    hogs: list[psycopg.Connection[Any]] = []
    with admin_connect(private_server) as admin:
        limit = int(admin.execute("SHOW max_connections").fetchone()[0])
        reserved = int(admin.execute("SHOW superuser_reserved_connections").fetchone()[0])
        admin.execute(
            psycopg.sql.SQL("CREATE ROLE plain LOGIN PASSWORD {}").format(
                psycopg.sql.Literal(private_server.password)
            )
        )
        admin.execute("GRANT ALL ON DATABASE private TO plain")
    try:
        info = private_server.conninfo("private")
        # Fill every slot an ordinary role may use.
        while True:
            try:
                hogs.append(psycopg.connect(**{**info, "user": "plain"}))
            except psycopg.OperationalError:
                break
            assert len(hogs) <= limit - reserved
        wrapper = make_pooled(port=proxy.port, min_size=1, max_size=2, timeout=2)
        wrapper.settings_dict["USER"] = "plain"
        # PostgreSQL says "too many clients", or, with superuser slots left,
        # "remaining connection slots are reserved".
        check_cause(
            wrapper,
            proxy,
            "(too many clients|remaining connection slots are reserved)",
            private_server.password,
        )
        for hog in hogs[:5]:
            hog.close()
        recovers(wrapper)
    finally:
        for hog in hogs:
            hog.close()
        proxy.close()


# -- 6. server-side timeouts -------------------------------------------------------


def test_statement_timeout_fails_the_query_and_the_next_request_is_clean(make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=1, options={"options": "-c statement_timeout=200"})
    pid = request(wrapper)
    with pytest.raises(OperationalError, match="statement timeout"):
        request(wrapper, "SELECT pg_sleep(2)")
    wrapper.set_autocommit(False)
    with pytest.raises(OperationalError, match="statement timeout"):
        query(wrapper, "SELECT pg_sleep(2)")  # inside a transaction, now aborted
    wrapper.close()  # rolled back at return
    assert request(wrapper) == pid  # the same session, usable
    assert request(wrapper, "SELECT pg_current_xact_id_if_assigned() IS NULL")


def test_idle_in_transaction_timeout_kills_only_that_session(make_pooled) -> None:
    wrapper = make_pooled(
        min_size=1,
        max_size=1,
        timeout=2,
        options={"options": "-c idle_in_transaction_session_timeout=300"},
    )
    wrapper.set_autocommit(False)
    victim = query(wrapper)
    time.sleep(1.0)  # the server ends the idle transaction's session
    with pytest.raises(DatabaseError, match="idle-in-transaction timeout"):
        query(wrapper)
    wrapper.close()  # discarded, not returned to the pool
    assert request(wrapper) != victim


# -- 7. requests that end badly ---------------------------------------------------


def test_exception_inside_atomic_leaves_a_clean_connection(make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=1)
    wrapper.settings_dict["ATOMIC_REQUESTS"] = False

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        wrapper.set_autocommit(False)
        with wrapper.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE half_done (x int)")
        raise Boom
    wrapper.close()  # mid-transaction: rolled back at return
    assert request(wrapper, "SELECT count(*) FROM pg_class WHERE relname = 'half_done'") == 0
    assert request(wrapper, "SELECT pg_current_xact_id_if_assigned() IS NULL")


def test_open_server_side_cursor_does_not_survive_the_request(make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=1)
    wrapper.ensure_connection()
    cursor = wrapper.chunked_cursor()  # what QuerySet.iterator() uses
    cursor.execute("SELECT generate_series(1, 10000)")
    cursor.fetchmany(10)  # abandoned half read
    wrapper.close()
    assert request(wrapper, "SELECT count(*) FROM pg_cursors") == 0


def test_signal_handler_raising_mid_query_discards_the_connection(make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=1, timeout=2)
    victim = request(wrapper)

    class Interrupted(Exception):
        pass

    def handler(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            query(wrapper, "SELECT pg_sleep(3)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    wrapper.close()  # a connection in the middle of a query is not reused as is
    t0 = time.monotonic()
    pid = request(wrapper)
    assert time.monotonic() - t0 < 1.0  # not behind the interrupted query
    if pid == victim:  # psycopg cancelled the query cleanly: then it is idle
        assert request(wrapper, "SELECT 1") == 1


# -- 8. a crowd on a small pool with a bounded queue --------------------------------


def test_crowd_gets_exactly_the_expected_rejections(make_pooled) -> None:
    wrapper = make_pooled(min_size=4, max_size=4, max_waiting=20, timeout=20)
    request(wrapper)
    pool = wrapper.pool
    wait_until(
        lambda: pool.get_stats()["pool_available"] >= 4,
        timeout=10,
        interval=0.02,
        message="4 idle connections",
    )
    barrier = threading.Barrier(100)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        twin = wrapper.copy()
        barrier.wait(30)
        try:
            request(twin, "SELECT pg_sleep(0.5)")
            result = "ok"
        except PoolExhausted as exc:
            result = "rejected" if "queue is full (max_waiting=20)" in str(exc) else f"other: {exc}"
        except Exception as exc:
            result = f"error: {exc!r}"
        with lock:
            outcomes.append(result)

    threads = [CheckedThread(target=one) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert outcomes.count("ok") == 24, sorted(set(outcomes))
    assert outcomes.count("rejected") == 76
    stats = pool.get_stats()
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0
    assert stats["pool_available"] == stats["pool_size"] == 4  # none lost


# -- 9. fork while the server is down -------------------------------------------------


def test_fork_while_the_server_is_down(private_server, make_pooled) -> None:
    wrapper = make_pooled(min_size=1, max_size=2, timeout=1)
    parent_pid = request(wrapper)
    twin = wrapper.copy()
    held = query(twin)  # the parent holds a connection across the outage
    private_server.stop("fast")
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            with pytest.raises(OperationalError):
                request(wrapper)
            os.read(read, 1)  # the parent started the server again
            wait_until(lambda: serves(wrapper), timeout=5, interval=0.05)
            code = 0
        finally:
            os._exit(code)
    private_server.start()
    os.write(write, b"x")
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent: its own connections died with the server; its pool heals.
    twin.close()
    recovers(wrapper)
    assert held and parent_pid
