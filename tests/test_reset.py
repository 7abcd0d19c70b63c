"""A connection comes back clean: rolled back and its session reset.

Each test checks out the pool's only connection, changes something, returns
it, and checks it out again (the same backend, by ``pg_backend_pid()``).
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from django.db import DataError, connection
from django.test import override_settings
from psycopg import pq

from django_pooled_pg.base import DatabaseWrapper
from tests.conftest import ROLE, Make


def fetch(wrapper: DatabaseWrapper, sql: str, params: Any = None) -> Any:
    with wrapper.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()[0]


def pid(wrapper: DatabaseWrapper) -> int:
    return int(fetch(wrapper, "SELECT pg_backend_pid()"))


# (what a request does, how to look at it); the look must match a fresh session's.
SESSION_STATE = {
    "set": (["SET search_path = nowhere"], "SHOW search_path"),
    "set_local_guc": (["SET work_mem = '7MB'"], "SHOW work_mem"),
    "set_config": (
        ["SELECT set_config('myapp.tenant', '42', false)"],
        "SELECT coalesce(current_setting('myapp.tenant', true), '')",  # defined stays ''
    ),
    "set_time_zone": (["SET TIME ZONE 'Pacific/Auckland'"], "SHOW TimeZone"),
    "set_role": ([f"SET ROLE {ROLE}"], "SELECT current_user"),
    "set_session_authorization": ([f"SET SESSION AUTHORIZATION {ROLE}"], "SELECT session_user"),
    "temporary_table": (
        ["CREATE TEMP TABLE leak_tmp (x int)", "INSERT INTO leak_tmp VALUES (1)"],
        "SELECT to_regclass('pg_temp.leak_tmp') IS NOT NULL",
    ),
    "advisory_lock": (
        ["SELECT pg_advisory_lock(4242)"],
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    ),
    "listen": (["LISTEN leak_channel"], "SELECT count(*) FROM pg_listening_channels()"),
    "prepared_statement": (
        ["PREPARE leak_stmt AS SELECT 1"],
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leak_stmt'",
    ),
    "cursor_with_hold": (
        ["DECLARE leak_cur CURSOR WITH HOLD FOR SELECT generate_series(1, 10)"],
        "SELECT count(*) FROM pg_cursors",
    ),
}


@pytest.mark.parametrize("kind", sorted(SESSION_STATE))
def test_session_state_does_not_reach_the_next_request(
    make_wrapper: Make, role: str, kind: str
) -> None:
    statements, look = SESSION_STATE[kind]
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    backend = pid(wrapper)
    fresh = fetch(wrapper, look)
    for sql in statements:
        with wrapper.cursor() as cursor:
            cursor.execute(sql)
    assert fetch(wrapper, look) != fresh  # the request really changed it
    wrapper.close()

    assert pid(wrapper) == backend  # same session, reused
    assert fetch(wrapper, look) == fresh


def test_reset_session_false_lets_state_through(make_wrapper: Make) -> None:
    """The documented risk of turning the reset off, shown."""
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "reset_session": False})
    with wrapper.cursor() as cursor:
        cursor.execute("SET search_path = nowhere")
    wrapper.close()
    assert fetch(wrapper, "SHOW search_path") == "nowhere"


def test_open_transaction_is_rolled_back(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    with wrapper.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS reset_rows (x int)")
        cursor.execute("TRUNCATE reset_rows")
    wrapper.set_autocommit(False)
    with wrapper.cursor() as cursor:
        cursor.execute("INSERT INTO reset_rows VALUES (1)")
    wrapper.close()  # returned inside the transaction

    assert fetch(wrapper, "SELECT count(*) FROM reset_rows") == 0
    assert wrapper.connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
    with wrapper.cursor() as cursor:
        cursor.execute("DROP TABLE reset_rows")


def test_failed_transaction_is_rolled_back(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    backend = pid(wrapper)
    wrapper.set_autocommit(False)
    with pytest.raises(DataError), wrapper.cursor() as cursor:
        cursor.execute("SELECT 1/0")
    wrapper.close()  # returned in INERROR state
    assert pid(wrapper) == backend
    assert fetch(wrapper, "SELECT 1") == 1


@pytest.mark.parametrize(
    "attribute, value",
    [
        ("read_only", True),
        ("deferrable", True),
        ("isolation_level", psycopg.IsolationLevel.SERIALIZABLE),
        ("autocommit", False),
    ],
)
def test_connection_object_settings_are_restored(
    make_wrapper: Make, attribute: str, value: Any
) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid(wrapper)
    raw = wrapper.connection
    fresh = getattr(raw, attribute)
    setattr(raw, attribute, value)
    wrapper.close()
    pid(wrapper)
    assert wrapper.connection is raw
    if attribute == "autocommit":
        assert raw.autocommit is True  # Django's AUTOCOMMIT setting, set again
    else:
        assert getattr(raw, attribute) == fresh


@pytest.mark.parametrize("mode", [True, "auto"])
def test_reset_is_sent_at_return_and_collected_at_checkout(make_wrapper: Make, mode: Any) -> None:
    """The reset costs the request no round trip: the return does not wait for it."""
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "reset_session": mode})
    pid(wrapper)
    raw = wrapper.connection
    if mode == "auto":
        with wrapper.cursor() as cursor:
            cursor.execute("SET search_path = nowhere")  # a reset is needed
    wrapper.close()
    # In flight (or answered but not yet read) while the connection is idle in the pool.
    assert raw._dpp_reset_pending
    assert raw.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
    pid(wrapper)
    assert not raw._dpp_reset_pending
    assert raw.pgconn.transaction_status == pq.TransactionStatus.IDLE


# -- what Django's set-up and the user's configure established holds again --


def test_time_zone_holds_after_reset(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1}, TIME_ZONE="Asia/Tokyo")
    assert fetch(wrapper, "SHOW TimeZone") == "Asia/Tokyo"
    with wrapper.cursor() as cursor:
        cursor.execute("SET TIME ZONE 'UTC'")
    wrapper.close()
    assert fetch(wrapper, "SHOW TimeZone") == "Asia/Tokyo"


def test_assume_role_holds_after_reset(make_wrapper: Make, role: str) -> None:
    """Also: Django's pool deadlocks with assume_role and min_size=max_size=1."""
    wrapper = make_wrapper(
        pool={"min_size": 1, "max_size": 1, "timeout": 5}, options={"assume_role": role}
    )
    assert fetch(wrapper, "SELECT current_user") == role
    with wrapper.cursor() as cursor:
        cursor.execute("RESET ROLE")
    wrapper.close()
    assert fetch(wrapper, "SELECT current_user") == role


@pytest.mark.parametrize("level", list(psycopg.IsolationLevel), ids=lambda level: level.name)
def test_isolation_level_holds_on_every_checkout(
    make_wrapper: Make, level: psycopg.IsolationLevel
) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1}, options={"isolation_level": level})
    expected = level.name.lower().replace("_", " ")
    if level == psycopg.IsolationLevel.READ_UNCOMMITTED:
        expected = "read uncommitted"  # PostgreSQL runs it as read committed
    for _ in range(3):
        wrapper.set_autocommit(False)
        assert fetch(wrapper, "SHOW transaction_isolation") == expected
        wrapper.rollback()
        wrapper.set_autocommit(True)
        wrapper.close()


def configure_statement_timeout(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET statement_timeout = 4321")


def test_configure_settings_hold_after_reset(make_wrapper: Make) -> None:
    wrapper = make_wrapper(
        pool={
            "min_size": 0,
            "max_size": 1,
            "configure": "tests.test_reset.configure_statement_timeout",
        }
    )
    backend = pid(wrapper)
    assert fetch(wrapper, "SHOW statement_timeout") == "4321ms"
    with wrapper.cursor() as cursor:
        cursor.execute("SET statement_timeout = 0")
    wrapper.close()
    assert pid(wrapper) == backend
    assert fetch(wrapper, "SHOW statement_timeout") == "4321ms"


@pytest.mark.django_db(transaction=True)
def test_override_settings_time_zone_reaches_pooled_connections() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SHOW TimeZone")
        assert cursor.fetchone()[0] == "UTC"
    connection.close()
    # With USE_TZ=True connections speak UTC (or the alias's TIME_ZONE);
    # settings.TIME_ZONE reaches them with USE_TZ=False, as in Django's tests.
    with override_settings(USE_TZ=False, TIME_ZONE="America/Chicago"):
        with connection.cursor() as cursor:
            cursor.execute("SHOW TimeZone")
            assert cursor.fetchone()[0] == "America/Chicago"
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("SHOW TimeZone")
            assert cursor.fetchone()[0] == "America/Chicago"
    connection.close()
    with connection.cursor() as cursor:
        cursor.execute("SHOW TimeZone")
        assert cursor.fetchone()[0] == "UTC"


def test_override_settings_time_zone_switches_connection_in_hand(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid(wrapper)
    with override_settings(USE_TZ=False, TIME_ZONE="Europe/Paris"):
        # Django's setting_changed receiver calls ensure_timezone() only on
        # connections in django.db.connections; do what it does.
        del wrapper.timezone_name
        del wrapper.timezone
        wrapper.ensure_timezone()
        assert fetch(wrapper, "SHOW TimeZone") == "Europe/Paris"
    wrapper.close()


# -- psycopg's prepared statements survive the resets ------------------------


@pytest.mark.parametrize("threshold", [0, 5])
def test_prepared_statements_work_across_resets(make_wrapper: Make, threshold: int) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 0, "max_size": 1},
        options={"prepare_threshold": threshold, "server_side_binding": True},
    )
    prepared_seen = 0
    for _round in range(8):
        with wrapper.cursor() as cursor:
            for i in range(7):
                cursor.execute("SELECT %s::int + 1", [i])
                assert cursor.fetchone()[0] == i + 1
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            prepared_seen = max(prepared_seen, cursor.fetchone()[0])
        wrapper.close()
    # The test is only worth something if psycopg really prepared statements.
    assert prepared_seen > 0
