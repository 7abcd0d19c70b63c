"""Behind a real PgBouncer (Debian's, 1.18 here), in session and transaction mode.

PgBouncer before 1.20 refuses the startup packet's ``options`` parameter,
where the engine sends the time zone and ``assume_role``; the engine learns
that on its first connection and sets them after connecting and in each
session reset instead (startup.py). No PgBouncer setting is changed from its
defaults: a user must not have to reconfigure their pooler.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, ProgrammingError
from prometheus_client.parser import text_string_to_metric_families

import django_pooled_pg
from django_pooled_pg import ServerUnavailable
from django_pooled_pg.base import DatabaseWrapper
from dpp_devtools.pgbouncer import ThrowawayPgBouncer
from tests.conftest import Make, server_conninfo
from tests.helpers import CheckedThread, private_settings, wait_until

MODES = ["session", "transaction"]
ROLE = "dpp_assumed"


def request(wrapper: DatabaseWrapper, *statements: str) -> Any:
    """One request: a checkout, the statements, the connection returned; the last row's value."""
    try:
        with wrapper.cursor() as cursor:
            for sql in statements:
                cursor.execute(sql)
            return cursor.fetchone()[0]
    finally:
        wrapper.close()


def behind(pgbouncers: Any, mode: str) -> dict[str, str]:
    bouncer = pgbouncers(mode)
    return {"HOST": bouncer.host, "PORT": str(bouncer.port)}


@contextlib.contextmanager
def own_pgbouncer(mode: str, **settings: Any) -> Iterator[ThrowawayPgBouncer]:
    """A PgBouncer of this test's own (other settings, or to restart)."""
    bouncer = ThrowawayPgBouncer(server_conninfo(), mode=mode, **settings)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.destroy()


@pytest.fixture
def assumed_role(admin: psycopg.Connection[Any]) -> str:
    if not admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [ROLE]).fetchone():
        admin.execute(f"CREATE ROLE {ROLE} NOLOGIN")
    return ROLE


@pytest.mark.parametrize("mode", MODES)
def test_serves_requests_through_pgbouncer_with_its_default_configuration(
    make_wrapper: Make, pgbouncers: Any, mode: str
) -> None:
    wrapper = make_wrapper(pool={"max_size": 2}, **behind(pgbouncers, mode))
    for _ in range(10):
        assert request(wrapper, "SHOW TimeZone") == wrapper.timezone_name == "UTC"
    # PgBouncer 1.18 refused the whole options parameter: the time zone is set by SQL.
    assert wrapper.pool.startup.by_sql == {"TimeZone"}
    assert wrapper.pool.startup.options() == ""


@pytest.mark.parametrize("mode", MODES)
def test_the_databases_time_zone_holds_in_every_request(
    make_wrapper: Make, pgbouncers: Any, mode: str
) -> None:
    wrapper = make_wrapper(pool={"max_size": 1}, TIME_ZONE="Asia/Tokyo", **behind(pgbouncers, mode))
    assert request(wrapper, "SHOW TimeZone") == "Asia/Tokyo"
    # A request that changes the session's time zone does not hand it on.
    assert request(wrapper, "SET TimeZone TO 'America/Lima'", "SHOW TimeZone") == "America/Lima"
    for _ in range(5):
        assert request(wrapper, "SHOW TimeZone") == "Asia/Tokyo"
    # Django's own reading of the zone agrees (aware datetimes in Tokyo time).
    assert request(wrapper, "SELECT to_char(TIMESTAMPTZ '2026-01-01 00:00Z', 'HH24')") == "09"


def test_assume_role_holds_in_every_request_in_session_mode(
    make_wrapper: Make, pgbouncers: Any, assumed_role: str
) -> None:
    wrapper = make_wrapper(
        pool={"max_size": 2}, options={"assume_role": assumed_role}, **behind(pgbouncers, "session")
    )
    assert request(wrapper, "SELECT current_user") == assumed_role
    assert request(wrapper, "RESET ROLE", "SELECT current_user") != assumed_role
    for _ in range(5):
        assert request(wrapper, "SELECT current_user") == assumed_role
    assert wrapper.pool.startup.by_sql == {"TimeZone", "role"}


@pytest.mark.parametrize("option", [{}, {"pgbouncer": "session"}])
def test_the_session_reset_still_works_in_session_mode(
    make_wrapper: Make, pgbouncers: Any, option: dict[str, str]
) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 1, "max_size": 1, **option}, **behind(pgbouncers, "session")
    )
    assert wrapper.pool.options.reset_session == "auto"
    request(wrapper, "SELECT 1")
    request(wrapper, "CREATE TEMP TABLE leak (x int)", "SET search_path TO pg_catalog", "SELECT 1")
    assert request(wrapper, "SHOW search_path") == '"$user", public'
    assert request(wrapper, "SELECT count(*) FROM pg_tables WHERE tablename = 'leak'") == 0
    assert request(wrapper, "SHOW TimeZone") == "UTC"
    # Reset after the one request that changed the session, skipped after the others.
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert (counters.resets, counters.resets_skipped) == (1, 4)


def test_user_options_a_pooler_refuses_fail_with_the_fix(
    make_wrapper: Make, pgbouncers: Any
) -> None:
    wrapper = make_wrapper(
        pool={"max_size": 1, "timeout": 2},
        options={"options": "-c search_path=public"},
        **behind(pgbouncers, "session"),
    )
    with pytest.raises(ServerUnavailable) as info:
        request(wrapper, "SELECT 1")
    message = str(info.value)
    assert (
        "DATABASES['" in message and "['OPTIONS']['options'] ('-c search_path=public')" in message
    )
    assert "Remove it from OPTIONS" in message and "ALTER ROLE" in message
    assert wrapper.settings_dict["PASSWORD"] not in message


def test_startup_options_stay_in_the_startup_packet_where_accepted(
    make_wrapper: Make, assumed_role: str
) -> None:
    """Directly on PostgreSQL nothing is refused: no statement per checkout."""
    wrapper = make_wrapper(pool={"max_size": 1}, options={"assume_role": assumed_role})
    assert request(wrapper, "SELECT current_user") == assumed_role
    assert wrapper.pool.startup.by_sql == frozenset()
    assert "-c TimeZone=UTC" in wrapper.pool.startup.options()
    assert f"-c role={assumed_role}" in wrapper.pool.startup.options()


# -- OPTIONS["pool"]["pgbouncer"] = "transaction" -----------------------------


def transaction_pooled(make_wrapper: Make, pgbouncers: Any, **pool: Any) -> DatabaseWrapper:
    return make_wrapper(
        pool={"pgbouncer": "transaction", **pool}, **behind(pgbouncers, "transaction")
    )


def test_transaction_mode_sends_no_session_reset(make_wrapper: Make, pgbouncers: Any) -> None:
    wrapper = transaction_pooled(make_wrapper, pgbouncers, max_size=2)
    assert wrapper.pool.options.reset_session is False
    for _ in range(5):
        assert request(wrapper, "SHOW TimeZone") == "UTC"
    assert django_pooled_pg.stats(wrapper.alias).counters.resets == 0


@pytest.mark.parametrize(
    ("pool", "options", "option", "says"),
    [
        ({"reset_session": True}, {}, "reset_session", "run PgBouncer in session mode"),
        ({"reset_session": "auto"}, {}, "reset_session", "run PgBouncer in session mode"),
        ({}, {"assume_role": "app"}, "assume_role", "ALTER ROLE <login> SET role = 'app'"),
        ({}, {"options": "-c search_path=app"}, "options", "ALTER ROLE <login> SET search_path"),
        ({}, {"prepare_threshold": 5}, "prepare_threshold", "pgbouncer_prepared_statements"),
    ],
)
def test_what_transaction_pooling_cannot_keep_safe_is_refused_at_configuration(
    make_wrapper: Make, pool: dict[str, Any], options: dict[str, Any], option: str, says: str
) -> None:
    from django.core.exceptions import ImproperlyConfigured

    from django_pooled_pg.options import collect_errors

    wrapper = make_wrapper(pool={"pgbouncer": "transaction", **pool}, options=options)
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.pool_options()
    assert f"['{option}']" in str(info.value) and says in str(info.value)
    assert "'pgbouncer'] is 'transaction'" in str(info.value)
    # The system check reports the same error (it collects them all).
    found = collect_errors(
        "x", wrapper.settings_dict["OPTIONS"]["pool"], wrapper.settings_dict["OPTIONS"]
    )
    assert [e.option for e in found] == [option]


def test_tracked_startup_options_and_declared_prepared_statements_are_accepted(
    make_wrapper: Make,
) -> None:
    wrapper = make_wrapper(
        pool={"pgbouncer": "transaction", "pgbouncer_prepared_statements": True},
        options={"options": "-c DateStyle=ISO,YMD", "prepare_threshold": 5},
    )
    assert wrapper.pool_options().pgbouncer == "transaction"


def test_chunked_reads_work_under_concurrent_load(make_wrapper: Make) -> None:
    """8 threads through 4 server connections, each reading in chunks outside a transaction."""
    with own_pgbouncer("transaction", default_pool_size=4) as bouncer:
        wrapper = make_wrapper(
            pool={"pgbouncer": "transaction", "max_size": 8},
            HOST=bouncer.host,
            PORT=str(bouncer.port),
        )
        rows, reads = 3000, 5
        seen: list[int] = []

        def read() -> None:
            w = wrapper.copy()
            try:
                for _ in range(reads):
                    with w.chunked_cursor() as cursor:
                        cursor.execute("SELECT g FROM generate_series(1, %s) g", [rows])
                        n = 0
                        while batch := cursor.fetchmany(100):
                            n += len(batch)
                    seen.append(n)
                    w.close()
            finally:
                w.close()

        threads = [CheckedThread(target=read) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert seen == [rows] * (8 * reads)
        assert bouncer.server_connections(wrapper.settings_dict["NAME"]) <= 4


def test_without_the_option_a_vanished_chunked_cursor_names_it(
    make_wrapper: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """What Django's backend does behind transaction pooling, and the warning that says why.

    PgBouncer hands out its most recently used server connection first, so
    a FETCH after another client's transaction lands where the cursor is not.
    """
    with own_pgbouncer("transaction", default_pool_size=2) as bouncer:
        where = {"HOST": bouncer.host, "PORT": str(bouncer.port)}
        reader = make_wrapper(pool={"max_size": 1}, **where)
        other = make_wrapper(pool={"max_size": 1}, **where)
        other.ensure_connection()
        other.set_autocommit(False)
        with other.cursor() as c:
            c.execute("SELECT 1")  # holds a server connection in its transaction
        cursor = reader.chunked_cursor()
        cursor.execute("SELECT g FROM generate_series(1, 10000) g")  # WITH HOLD, autocommit
        other.commit()  # its server connection is now the most recently used
        with pytest.raises(ProgrammingError, match="does not exist"):
            while cursor.fetchmany(100):
                pass
        other.set_autocommit(True)
        other.close()
        reader.close()
    warned = [r.getMessage() for r in caplog.records if "vanished" in r.getMessage()]
    assert warned and "['OPTIONS']['pool']['pgbouncer'] = 'transaction'" in warned[0]


def test_chunked_reads_inside_a_transaction_keep_server_side_cursors(
    make_wrapper: Make, pgbouncers: Any
) -> None:
    wrapper = transaction_pooled(make_wrapper, pgbouncers, max_size=2)
    wrapper.ensure_connection()
    wrapper.set_autocommit(False)
    try:
        with wrapper.chunked_cursor() as cursor:
            assert getattr(cursor.cursor, "name", "").startswith("_django_curs_")  # server-side
            cursor.execute("SELECT g FROM generate_series(1, 500) g")
            assert len(cursor.fetchall()) == 500
        wrapper.commit()
    finally:
        wrapper.set_autocommit(True)
        wrapper.close()


def test_a_pooler_in_front_is_detected_and_the_option_named(
    make_wrapper: Make, pgbouncers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    wrapper = make_wrapper(pool={"max_size": 1}, **behind(pgbouncers, "transaction"))
    request(wrapper, "SELECT 1")
    assert wrapper.pool.behind_pooler is True
    warned = [r.getMessage() for r in caplog.records if "stands between" in r.getMessage()]
    assert len(warned) == 1 and "['pgbouncer'] = 'transaction'" in warned[0]
    direct = make_wrapper(pool={"max_size": 1})
    request(direct, "SELECT 1")
    assert direct.pool.behind_pooler is False


# -- exhaustion and failures behind PgBouncer ---------------------------------


def test_an_exhausted_pool_behind_pgbouncer_says_so(make_wrapper: Make, pgbouncers: Any) -> None:
    wrapper = transaction_pooled(make_wrapper, pgbouncers, max_size=2, timeout=0.5)
    held = [wrapper.copy() for _ in range(2)]
    for w in held:
        w.ensure_connection()
    try:
        t0 = time.monotonic()
        with pytest.raises(django_pooled_pg.PoolExhausted, match="max_size=2, in use=2"):
            request(wrapper, "SELECT 1")
        assert time.monotonic() - t0 < 2.0
    finally:
        for w in held:
            w.close()
    assert request(wrapper, "SELECT 1") == 1


def test_more_clients_than_pgbouncer_server_connections_wait_and_succeed(
    make_wrapper: Make,
) -> None:
    with own_pgbouncer("transaction", default_pool_size=2) as bouncer:
        wrapper = make_wrapper(
            pool={"pgbouncer": "transaction", "max_size": 6},
            HOST=bouncer.host,
            PORT=str(bouncer.port),
        )
        done: list[int] = []

        def slow() -> None:
            w = wrapper.copy()
            try:
                done.append(request(w, "SELECT 1 FROM pg_sleep(0.2)"))
            finally:
                w.close()

        threads = [CheckedThread(target=slow) for _ in range(6)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert done == [1] * 6
        # Six 0.2 s transactions through two server connections: three rounds.
        assert time.monotonic() - t0 >= 0.55
        assert bouncer.server_connections(wrapper.settings_dict["NAME"]) <= 2


@pytest.mark.parametrize("mode", MODES)
def test_the_pool_recovers_when_pgbouncer_restarts(make_wrapper: Make, mode: str) -> None:
    with own_pgbouncer(mode) as bouncer:
        pool = {
            "max_size": 2,
            "timeout": 1.5,
            **({"pgbouncer": mode} if mode == "transaction" else {}),
        }
        wrapper = make_wrapper(pool=pool, HOST=bouncer.host, PORT=str(bouncer.port))
        assert request(wrapper, "SELECT 1") == 1
        bouncer.restart(immediate=True)
        # The pooled connection died with PgBouncer: at most this request fails,
        # fast, with an OperationalError; the pool replaces the connection.
        t0 = time.monotonic()
        with contextlib.suppress(OperationalError):
            request(wrapper, "SELECT 1")
        assert time.monotonic() - t0 < 1.5 + 0.5
        assert wait_until(lambda: _serves(wrapper), timeout=2.0) == 1
        for _ in range(5):
            assert request(wrapper, "SELECT 1") == 1


@pytest.mark.slow
def test_the_pool_recovers_when_postgresql_restarts_behind_pgbouncer(
    make_wrapper: Make, private_server: Any
) -> None:
    with contextlib.ExitStack() as stack:
        # PgBouncer waits server_login_retry (default 15 s) after a failed
        # login to the server before it tries again, failing clients meanwhile.
        bouncer = ThrowawayPgBouncer(
            private_server.conninfo("private"), mode="transaction", server_login_retry=1
        )
        bouncer.start()
        stack.callback(bouncer.destroy)
        wrapper = make_wrapper(
            pool={"pgbouncer": "transaction", "max_size": 2, "timeout": 1.5},
            settings=private_settings(private_server, HOST=bouncer.host, PORT=str(bouncer.port)),
        )
        assert request(wrapper, "SELECT 1") == 1
        private_server.restart("fast")
        t0 = time.monotonic()
        errors = 0
        while time.monotonic() - t0 < 5:
            t1 = time.monotonic()
            try:
                if request(wrapper, "SELECT 1") == 1:
                    break
            except OperationalError:
                errors += 1
                assert time.monotonic() - t1 < 1.5 + 0.5  # bounded by timeout
        else:
            raise AssertionError("no request succeeded within 5 s of the restart")
        for _ in range(5):
            assert request(wrapper, "SELECT 1") == 1


def test_pause_holds_requests_and_resume_releases_them(make_wrapper: Make) -> None:
    # (server_login_retry: a failed server login after RESUME is retried
    # after 1 s, not PgBouncer's default 15 s.)
    with own_pgbouncer("transaction", server_login_retry=1) as bouncer:
        wrapper = make_wrapper(
            pool={"pgbouncer": "transaction", "max_size": 2, "timeout": 5},
            HOST=bouncer.host,
            PORT=str(bouncer.port),
        )
        assert request(wrapper, "SELECT 1") == 1
        bouncer.admin("PAUSE")
        result: list[Any] = []
        thread = CheckedThread(target=lambda: result.append(request(wrapper.copy(), "SELECT 2")))
        thread.start()
        time.sleep(0.5)  # the condition under test: nothing is served while paused
        assert result == []
        t0 = time.monotonic()
        bouncer.admin("RESUME")
        thread.join()
        assert result == [2] and time.monotonic() - t0 < 1.0, bouncer.log()[-3000:]


def _serves(wrapper: DatabaseWrapper) -> Any:
    try:
        return request(wrapper, "SELECT 1")
    except OperationalError:
        return None


def test_pgbouncer_keeps_the_time_zone_per_client_and_nothing_else() -> None:
    """What transaction pooling does to session settings (why the option refuses some)."""
    with own_pgbouncer("transaction", default_pool_size=1) as bouncer:
        info = bouncer.conninfo(server_conninfo()["dbname"])
        with (
            psycopg.connect(**info, autocommit=True) as a,
            psycopg.connect(**info, autocommit=True) as b,
        ):
            b_zone = b.execute("SHOW TimeZone").fetchone()
            a.execute("SET TimeZone TO 'Asia/Tokyo'")
            a.execute("SET search_path TO pg_catalog")
            a.execute("SET statement_timeout TO '7s'")
            a.execute("SET IntervalStyle TO 'iso_8601'")
            # One server connection, shared: PgBouncer sets B's own time zone
            # again, and hands on A's other settings.
            assert b.execute("SHOW TimeZone").fetchone() == b_zone
            assert b.execute("SHOW search_path").fetchone() == ("pg_catalog",)
            assert b.execute("SHOW statement_timeout").fetchone() == ("7s",)
            assert b.execute("SHOW IntervalStyle").fetchone() == ("iso_8601",)
            assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)


# -- poolstats: PgBouncer's own view --------------------------------------------


def poolstats_behind(bouncer: ThrowawayPgBouncer, *args: str, **pool: Any) -> tuple[int, str, str]:
    """manage.py poolstats in a process whose 'default' alias goes through *bouncer*."""
    from tests.test_poolstats import run_manage

    env = {
        "PGHOST": bouncer.host,
        "PGPORT": str(bouncer.port),
        "PGUSER": bouncer.user,
        "PGPASSWORD": bouncer.password,
        "PGDATABASE": server_conninfo()["dbname"],
        "DATABASE_URL": "",
        "POOL_OPTIONS_JSON": json.dumps(pool),
    }
    # --no-server: pg_stat_activity would be read through the saturated
    # PgBouncer too, and wait for its only server connection.
    proc = run_manage([*args, "--no-server", "--database", "default"], env)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


def test_poolstats_shows_pgbouncers_pools_and_stats(transactional_db: None) -> None:
    with own_pgbouncer("transaction", default_pool_size=1, stats_period=1) as bouncer:
        info = bouncer.conninfo(server_conninfo()["dbname"])
        # One client holds the only server connection in a transaction, one waits.
        holder = psycopg.connect(**info)
        holder.execute("SELECT 1")
        waiter = CheckedThread(
            target=lambda: psycopg.connect(**info, autocommit=True).execute("SELECT pg_sleep(0)")
        )
        waiter.start()
        wait_until(lambda: any(r["cl_waiting"] for r in bouncer.admin("SHOW POOLS")))
        try:
            pool = {"pgbouncer": "transaction", "pgbouncer_admin": True}
            rc, out, err = poolstats_behind(bouncer, "--json", **pool)
            assert rc == 0, err
            entry = json.loads(out)["aliases"]["default"]
            assert entry["pooler_error"] is None
            (mine,) = entry["pooler"]["pools"]
            assert mine["clients_active"] >= 1 and mine["clients_waiting"] == 1
            assert mine["servers_active"] == 1 and mine["mode"] == "transaction"
            assert entry["pooler"]["version"].startswith("PgBouncer")
            assert [s["database"] for s in entry["pooler"]["stats"]] == [
                server_conninfo()["dbname"]
            ]

            rc, out, err = poolstats_behind(bouncer, **pool)
            assert rc == 0, err
            assert "pgbouncer (PgBouncer" in out and "cl_waiting" in out
            assert "per second:" in out and bouncer.password not in out + err

            rc, out, err = poolstats_behind(bouncer, "--format", "prometheus", **pool)
            assert rc == 0, err
            found = {
                s.name: s.value
                for family in text_string_to_metric_families(out)
                for s in family.samples
                if s.name.startswith("django_pooled_pg_pgbouncer_")
            }
            assert found["django_pooled_pg_pgbouncer_clients_waiting"] == 1
            assert found["django_pooled_pg_pgbouncer_servers_active"] == 1
            assert "django_pooled_pg_pgbouncer_transactions_per_second" in found
        finally:
            holder.commit()
            holder.close()
            waiter.join()


def test_poolstats_without_an_admin_connection_shows_no_pooler(transactional_db: None) -> None:
    with own_pgbouncer("transaction") as bouncer:
        rc, out, err = poolstats_behind(bouncer, "--json", pgbouncer="transaction")
        assert rc == 0, err
        entry = json.loads(out)["aliases"]["default"]
        assert entry["pooler"] is None and entry["pooler_error"] is None
        rc, out, err = poolstats_behind(bouncer, pgbouncer="transaction")
        assert "pgbouncer (" not in out


def test_poolstats_says_when_pgbouncers_admin_console_is_unreachable(
    transactional_db: None,
) -> None:
    with own_pgbouncer("transaction") as bouncer:
        admin = {"user": "nobody_here", "password": "not-the-secret"}
        rc, out, err = poolstats_behind(bouncer, pgbouncer="transaction", pgbouncer_admin=admin)
        assert rc == 0, err
        assert "pgbouncer: unavailable:" in out
        assert "not-the-secret" not in out + err and bouncer.password not in out + err


@pytest.mark.parametrize("mode", MODES)
def test_a_time_zone_the_server_has_by_default_costs_no_statement(
    make_wrapper: Make, pgbouncers: Any, admin: psycopg.Connection[Any], mode: str
) -> None:
    """As Django sets the zone only when it differs; RESET ALL in the reset returns to it."""
    (default,) = admin.execute("SHOW TimeZone").fetchone()
    wrapper = make_wrapper(pool={"max_size": 1}, TIME_ZONE=default, **behind(pgbouncers, mode))
    assert request(wrapper, "SHOW TimeZone") == default
    assert wrapper.pool.startup.by_sql == {"TimeZone"} and wrapper.pool.startup.sql == b""
    assert request(wrapper, "SET TimeZone TO 'Asia/Tokyo'", "SHOW TimeZone") == "Asia/Tokyo"
    for _ in range(3):
        assert request(wrapper, "SHOW TimeZone") == default


def test_a_refusal_of_one_setting_moves_only_that_setting() -> None:
    """PgBouncer 1.20+ and Neon's proxy accept TimeZone and refuse what they do not track.

    Debian's PgBouncer is 1.18, so this newer message is given as text: the
    part under test is how the engine reads it.
    """
    from django_pooled_pg.startup import StartupOptionsRefused, StartupSettings

    refused_role = psycopg.OperationalError(
        'connection to server at "127.0.0.1", port 6432 failed: '
        "FATAL:  unsupported startup parameter in options: role"
    )
    settings = StartupSettings("x", {"TimeZone": "UTC", "role": "app"})
    assert settings.learn(refused_role)
    assert settings.by_sql == {"role"}
    assert settings.options() == "-c TimeZone=UTC"
    assert settings.sql == b"SET role TO 'app'"
    assert not settings.learn(psycopg.OperationalError("password authentication failed"))

    users = StartupSettings("x", {"TimeZone": "UTC"}, "-c search_path=app")
    refused_user = psycopg.OperationalError(
        "FATAL:  unsupported startup parameter in options: search_path"
    )
    with pytest.raises(StartupOptionsRefused, match=r"\['options'\] \('-c search_path=app'\)"):
        users.learn(refused_user)
