"""reset_session="auto": a reset after a request that may have changed the session only.

The leak tests check out the pool's only connection (``max_size=1``),
change one kind of session state through one path by which application
code sends SQL, return it, and check out again: the same backend, with the
state a fresh session has. The other tests show that requests that only
read and write rows send no reset (counted by the server), that prepared
statements stay coherent, and what "auto" cannot see.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from django.db import OperationalError, connection, connections, transaction

import django_pooled_pg
from django_pooled_pg import watch
from django_pooled_pg.base import DatabaseWrapper
from dpp_devtools import throwaway
from tests.conftest import ROLE, Make
from tests.helpers import private_settings
from tests.test_reset import fetch, pid

TENANT = "SELECT coalesce(current_setting('myapp.tenant', true), '')"


@dataclass(frozen=True)
class State:
    """One kind of session state: what sets it, and how to look at it."""

    sql: str  # one statement that leaves it in the session
    look: str  # a query whose answer differs from a fresh session's
    select: str | None = None  # a SELECT that sets it too (for SELECT-only paths)


STATES = {
    "set_guc": State(
        "SET work_mem = '7MB'", "SHOW work_mem", "SELECT set_config('work_mem', '7MB', false)"
    ),
    "set_search_path": State(
        "SET search_path = nowhere",
        "SHOW search_path",
        "SELECT set_config('search_path', 'nowhere', false)",
    ),
    "set_config": State(
        "SELECT set_config('myapp.tenant', '42', false)",
        TENANT,
        "SELECT set_config('myapp.tenant', '42', false)",
    ),
    "time_zone": State(
        "SET TIME ZONE 'Pacific/Auckland'",
        "SHOW TimeZone",
        "SELECT set_config('TimeZone', 'Pacific/Auckland', false)",
    ),
    "set_role": State(
        f"SET ROLE {ROLE}", "SELECT current_user", f"SELECT set_config('role', '{ROLE}', false)"
    ),
    "session_authorization": State(f"SET SESSION AUTHORIZATION {ROLE}", "SELECT session_user"),
    "session_characteristics": State(
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SHOW default_transaction_read_only",
        "SELECT set_config('default_transaction_read_only', 'on', false)",
    ),
    "temporary_table": State(
        "CREATE TEMP TABLE auto_tmp (x int)", "SELECT to_regclass('pg_temp.auto_tmp') IS NOT NULL"
    ),
    "select_into_temp": State(
        "SELECT 1 AS x INTO TEMP auto_into", "SELECT to_regclass('pg_temp.auto_into') IS NOT NULL"
    ),
    "advisory_lock": State(
        "SELECT pg_advisory_lock(4242)",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        "SELECT pg_advisory_lock(4242)",
    ),
    "listen": State("LISTEN auto_channel", "SELECT count(*) FROM pg_listening_channels()"),
    "prepare": State(
        "PREPARE auto_stmt AS SELECT 1",
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'auto_stmt'",
    ),
    "held_cursor": State(
        "DECLARE auto_cur CURSOR WITH HOLD FOR SELECT generate_series(1, 3)",
        "SELECT count(*) FROM pg_cursors",
    ),
    "do_block": State("DO $$BEGIN PERFORM set_config('myapp.tenant', '42', false); END$$", TENANT),
    "call": State("CALL auto_set_tenant_proc()", TENANT),
    "user_function": State("SELECT auto_set_tenant()", TENANT, "SELECT auto_set_tenant()"),
}

FUNCTIONS = (
    "CREATE OR REPLACE FUNCTION auto_set_tenant() RETURNS text LANGUAGE sql "
    "AS $$ SELECT set_config('myapp.tenant', '42', false) $$",
    "CREATE OR REPLACE PROCEDURE auto_set_tenant_proc() LANGUAGE plpgsql "
    "AS $$ BEGIN PERFORM set_config('myapp.tenant', '42', false); END $$",
)


def run_on_test_database(statements: Iterable[str]) -> None:
    """Run *statements* on the test database, outside every test pool."""
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)
    connection.close()


@pytest.fixture
def functions(transactional_db: None) -> None:
    run_on_test_database(FUNCTIONS)


# -- the paths by which application code sends SQL --------------------------

Path = Callable[[DatabaseWrapper, str], None]


def django_cursor(w: DatabaseWrapper, sql: str) -> None:
    with w.cursor() as cursor:
        cursor.execute(sql)


def django_executemany(w: DatabaseWrapper, sql: str) -> None:
    with w.cursor() as cursor:
        cursor.executemany(sql, [()])


def django_committed_transaction(w: DatabaseWrapper, sql: str) -> None:
    w.set_autocommit(False)
    with w.cursor() as cursor:
        cursor.execute(sql)
    w.commit()
    w.set_autocommit(True)


def multi_statement(w: DatabaseWrapper, sql: str) -> None:
    django_cursor(w, f"SELECT 1; {sql}; SELECT 2")


def comment_first(w: DatabaseWrapper, sql: str) -> None:
    django_cursor(w, f"/* app: tenant view */ -- request 42\n{sql}")


def mixed_case_and_spacing(w: DatabaseWrapper, sql: str) -> None:
    first, rest = sql.split(" ", 1)
    django_cursor(w, f"\n\t  {first.swapcase()}\n   {rest}")


def raw(w: DatabaseWrapper) -> psycopg.Connection[Any]:
    """The request's psycopg connection (checked out first, as Django does)."""
    w.ensure_connection()
    return w.connection


def raw_execute(w: DatabaseWrapper, sql: str) -> None:
    raw(w).execute(sql)


def raw_cursor_class(cls: type[Any]) -> Path:
    def run(w: DatabaseWrapper, sql: str) -> None:
        with cls(raw(w)) as cursor:
            cursor.execute(sql)

    run.__name__ = f"raw_{cls.__name__}"
    return run


def raw_transaction(w: DatabaseWrapper, sql: str) -> None:
    with raw(w).transaction():
        raw(w).execute(sql)


def raw_pipeline(w: DatabaseWrapper, sql: str) -> None:
    with raw(w).pipeline():
        raw(w).execute(sql)


def raw_executemany(w: DatabaseWrapper, sql: str) -> None:
    with raw(w).cursor() as cursor:
        cursor.executemany(sql, [()])


PATHS: list[Path] = [
    django_cursor,
    django_executemany,
    django_committed_transaction,
    multi_statement,
    comment_first,
    mixed_case_and_spacing,
    raw_execute,
    raw_cursor_class(psycopg.Cursor),
    raw_cursor_class(psycopg.ClientCursor),
    raw_cursor_class(psycopg.RawCursor),
    raw_transaction,
    raw_pipeline,
    raw_executemany,
]


# Paths that take only a query returning rows.
def django_chunked_cursor(w: DatabaseWrapper, select: str) -> None:
    cursor = w.chunked_cursor()  # a named cursor, WITH HOLD in autocommit
    cursor.execute(select)
    cursor.fetchall()
    cursor.close()


def raw_server_cursor(w: DatabaseWrapper, select: str) -> None:
    with raw(w).transaction(), raw(w).cursor(name="auto_named") as cursor:
        cursor.execute(select)
        cursor.fetchall()


def django_copy(w: DatabaseWrapper, select: str) -> None:
    with w.cursor() as cursor, cursor.copy(f"COPY ({select}) TO STDOUT") as copy:
        for _ in copy:
            pass


def raw_stream(w: DatabaseWrapper, select: str) -> None:
    for _ in raw(w).cursor().stream(select):
        pass


SELECT_PATHS: list[Path] = [django_chunked_cursor, raw_server_cursor, django_copy, raw_stream]


def leaks_nothing(make_wrapper: Make, path: Path, sql: str, look: str, **pool: Any) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, **pool})
    backend = pid(wrapper)
    fresh = fetch(wrapper, look)
    wrapper.close()

    path(wrapper, sql)
    assert wrapper.connection._dpp_clean is False  # seen on this path, before any look
    assert fetch(wrapper, look) != fresh  # the request really changed it
    wrapper.close()

    assert pid(wrapper) == backend  # the same session, reused
    assert fetch(wrapper, look) == fresh
    assert django_pooled_pg.stats(wrapper.alias).counters.resets >= 1
    wrapper.close()


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("kind", sorted(STATES))
def test_session_state_sent_through_any_path_does_not_reach_the_next_request(
    make_wrapper: Make, role: str, functions: None, kind: str, path: Path
) -> None:
    state = STATES[kind]
    leaks_nothing(make_wrapper, path, state.sql, state.look)


@pytest.mark.parametrize("path", SELECT_PATHS, ids=lambda p: p.__name__)
@pytest.mark.parametrize("kind", sorted(k for k, s in STATES.items() if s.select))
def test_session_state_set_by_a_query_through_cursors_copy_and_stream_does_not_leak(
    make_wrapper: Make, role: str, functions: None, kind: str, path: Path
) -> None:
    state = STATES[kind]
    assert state.select is not None
    leaks_nothing(make_wrapper, path, state.select, state.look)


def test_callproc_of_a_user_function_does_not_leak(make_wrapper: Make, functions: None) -> None:
    def callproc(w: DatabaseWrapper, name: str) -> None:
        with w.cursor() as cursor:
            cursor.callproc(name)

    leaks_nothing(make_wrapper, callproc, "auto_set_tenant", TENANT)


@pytest.mark.parametrize("path", PATHS + SELECT_PATHS, ids=lambda p: p.__name__)
def test_a_request_that_only_reads_sends_no_reset_through_any_path(
    make_wrapper: Make, path: Path
) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid(wrapper)
    raw = wrapper.connection
    wrapper.close()
    before = django_pooled_pg.stats(wrapper.alias).counters
    path(wrapper, "SELECT 1")
    wrapper.close()
    assert not raw._dpp_reset_pending  # nothing was sent
    after = django_pooled_pg.stats(wrapper.alias).counters
    assert (after.resets - before.resets, after.resets_skipped - before.resets_skipped) == (0, 1)


# -- cursors left open --------------------------------------------------------


def test_a_chunked_read_left_open_is_closed_by_a_reset(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    backend = pid(wrapper)
    wrapper.close()
    cursor = wrapper.chunked_cursor()  # WITH HOLD in autocommit: outlives the transaction
    cursor.execute("SELECT generate_series(1, 100)")
    assert cursor.fetchone() == (1,)
    wrapper.close()  # returned with the cursor open
    assert pid(wrapper) == backend
    assert fetch(wrapper, "SELECT count(*) FROM pg_cursors") == 0
    assert django_pooled_pg.stats(wrapper.alias).counters.resets == 1


def test_a_chunked_read_run_to_the_end_sends_no_reset(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    pid(wrapper)
    wrapper.close()
    for _ in range(3):
        django_chunked_cursor(wrapper, "SELECT generate_series(1, 100)")
        wrapper.close()
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert (counters.resets, counters.resets_skipped) == (0, 4)


# -- the second net: parameters the server reports ---------------------------


def test_a_reported_parameter_changed_behind_the_watch_is_reset(make_wrapper: Make) -> None:
    """SQL sent through the libpq object is not watched, but the server reports
    the time zone it changed (ParameterStatus), and that alone marks the session."""
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    backend = pid(wrapper)
    fresh = fetch(wrapper, "SHOW TimeZone")
    raw(wrapper).pgconn.exec_(b"SET TIME ZONE 'Asia/Tokyo'")
    assert fetch(wrapper, "SHOW TimeZone") == "Asia/Tokyo"
    wrapper.close()
    assert pid(wrapper) == backend
    assert fetch(wrapper, "SHOW TimeZone") == fresh


def test_what_auto_cannot_see_leaks_and_reset_session_true_stops_it(
    make_wrapper: Make, transactional_db: None
) -> None:
    """Documented: a trigger that changes an unreported setting, and SQL sent
    through the libpq object, are invisible to "auto"; True resets anyway."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS auto_rows (x int)")
        cursor.execute(
            "CREATE OR REPLACE FUNCTION auto_trigger() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM set_config('myapp.tenant', '42', false); RETURN NEW; END $$"
        )
        cursor.execute("DROP TRIGGER IF EXISTS auto_rows_trigger ON auto_rows")
        cursor.execute(
            "CREATE TRIGGER auto_rows_trigger BEFORE INSERT ON auto_rows "
            "FOR EACH ROW EXECUTE FUNCTION auto_trigger()"
        )
    connection.close()
    for mode, leaked in (("auto", "42"), (True, "")):
        wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "reset_session": mode})
        django_cursor(wrapper, "INSERT INTO auto_rows VALUES (1)")  # plain row write
        wrapper.close()
        assert fetch(wrapper, TENANT) == leaked
        wrapper.close()
        raw(wrapper).pgconn.exec_(b"SET work_mem = '7MB'")  # behind the watch
        wrapper.close()
        assert (fetch(wrapper, "SHOW work_mem") == "7MB") is (mode == "auto")
        wrapper.close()


def test_sequence_state_from_a_column_default_survives_a_skipped_reset(
    make_wrapper: Make, transactional_db: None
) -> None:
    """Documented: an INSERT whose serial column draws a value looks clean, and
    lastval() in the next request on that session answers with it; True forgets it."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS auto_serial (id bigserial, x int)")
    connection.close()
    for mode in ("auto", True):
        wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1, "reset_session": mode})
        pid(wrapper)
        wrapper.close()
        django_cursor(wrapper, "INSERT INTO auto_serial (x) VALUES (1)")
        wrapper.close()
        if mode == "auto":
            assert fetch(wrapper, "SELECT lastval()") >= 1
        else:
            with pytest.raises(OperationalError, match="lastval is not yet defined"):
                fetch(wrapper, "SELECT lastval()")
        wrapper.close()


# -- the engine's own settings are the starting point --------------------------


def configure_application_name(conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET application_name = 'configured'")


def test_the_engines_and_configures_own_settings_do_not_count(make_wrapper: Make) -> None:
    wrapper = make_wrapper(
        pool={
            "min_size": 0,
            "max_size": 1,
            "configure": "tests.test_reset_auto.configure_application_name",
        },
        TIME_ZONE="Asia/Tokyo",
    )
    for _ in range(3):
        assert fetch(wrapper, "SHOW application_name") == "configured"
        assert fetch(wrapper, "SHOW TimeZone") == "Asia/Tokyo"
        wrapper.close()
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert (counters.resets, counters.resets_skipped) == (0, 3)
    # After a reset, configure runs again and its SET is again the baseline.
    django_cursor(wrapper, "SET application_name = 'changed'")
    wrapper.close()
    for _ in range(2):
        assert fetch(wrapper, "SHOW application_name") == "configured"
        wrapper.close()
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert (counters.resets, counters.resets_skipped) == (1, 5)


# -- prepared statements -------------------------------------------------------


def test_prepared_statements_stay_coherent_across_skipped_and_sent_resets(
    make_wrapper: Make,
) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 0, "max_size": 1},
        options={"prepare_threshold": 0, "server_side_binding": True},
    )
    rng = random.Random(19)
    kept = dropped = 0
    previous_dirty = None  # the first round has a new session
    for _round in range(24):
        dirty = rng.random() < 0.4
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements")
            on_server = cursor.fetchone()[0]
            if previous_dirty is False:
                # The skipped reset kept the server's statements, and psycopg uses them.
                assert on_server >= 2
                kept += 1
            elif previous_dirty:
                # The reset dropped them, psycopg forgot them: only this one, prepared again.
                assert on_server == 1
                dropped += 1
            for i in range(3):
                cursor.execute("SELECT %s::int * 2", [i])
                assert cursor.fetchone()[0] == i * 2
            if dirty:
                cursor.execute("SET work_mem = '5MB'")
        wrapper.close()
        previous_dirty = dirty
    assert kept > 5 and dropped > 3
    counters = django_pooled_pg.stats(wrapper.alias).counters
    assert counters.resets > 3 and counters.resets_skipped > 5


# -- counted on the server ----------------------------------------------------


@pytest.fixture
def counting_server(django_db_blocker: Any) -> Iterator[throwaway.ThrowawayServer]:
    """A private cluster with pg_stat_statements, which counts every DISCARD ALL."""
    server = throwaway.start_private("private", shared_preload_libraries="pg_stat_statements")
    with django_db_blocker.unblock():
        yield server
    server.destroy()


def discards_on_server(server: throwaway.ThrowawayServer) -> int:
    with psycopg.connect(**server.conninfo("private"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
            "WHERE query ILIKE 'DISCARD ALL%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_orm_requests_that_read_and_write_rows_send_no_reset_counted_on_the_server(
    counting_server: throwaway.ThrowawayServer,
) -> None:
    from django.db.models import F

    from demoapp.models import Counter

    with psycopg.connect(**counting_server.conninfo("private"), autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
    alias = "counted"
    settings = private_settings(counting_server)
    settings["OPTIONS"] = {**settings["OPTIONS"], "pool": {"min_size": 0, "max_size": 1}}
    wrapper = DatabaseWrapper(settings, alias)
    connections[alias] = wrapper  # this thread's: the ORM's using() finds it
    try:
        with wrapper.schema_editor() as editor:
            editor.create_model(Counter)
        wrapper.close()
        assert discards_on_server(counting_server) == 1  # the DDL request's

        objects = Counter.objects.using(alias)
        rows = 0
        for i in range(20):
            objects.create(name=f"n{i}", hits=i)
            rows += 1
            objects.filter(name=f"n{i}").update(hits=F("hits") + 1)
            with transaction.atomic(using=alias):
                row = objects.select_for_update().get(name=f"n{i}")
                row.hits += 1
                row.save()
            assert objects.filter(hits__gte=i).count() >= 1
            assert sum(1 for _ in objects.order_by("id").iterator(chunk_size=5)) == rows
            if i % 7 == 6:
                objects.filter(name=f"n{i}").delete()
                rows -= 1
            wrapper.close()  # the end of a request
        assert discards_on_server(counting_server) == 1  # none since
        # And one request that changes the session: the server counts its reset.
        with wrapper.cursor() as cursor:
            cursor.execute("SET work_mem = '8MB'")
        wrapper.close()
        wrapper.ensure_connection()  # the checkout collects the reset's answer
        wrapper.close()
        assert discards_on_server(counting_server) == 2
        counters = django_pooled_pg.stats(alias).counters
        assert counters.resets == 2 and counters.resets_skipped >= 20
    finally:
        wrapper.close()
        wrapper.close_pool()
        del connections[alias]


# -- the hooks -------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls",
    [
        psycopg.Cursor,
        psycopg.ClientCursor,
        psycopg.RawCursor,
        psycopg.ServerCursor,
        psycopg.RawServerCursor,
    ],
    ids=lambda c: c.__name__,
)
def test_every_psycopg_cursor_class_runs_through_the_hooks(cls: type[Any]) -> None:
    watch.install()
    for owner, name in watch.HOOKED:
        if issubclass(cls, owner):
            method = getattr(cls, name)
            assert getattr(method, "__wrapped__", None) is not None, (cls, name)


def test_other_psycopg_connections_work_through_the_hooks_unmarked(
    transactional_db: None,
) -> None:
    """The hooks are process-wide: a connection of no pool goes through them untouched."""
    watch.install()
    s = connection.settings_dict
    with psycopg.connect(
        host=s["HOST"], port=s["PORT"], user=s["USER"], password=s["PASSWORD"], dbname=s["NAME"]
    ) as conn:
        conn.execute("SET work_mem = '6MB'")
        assert conn.execute("SHOW work_mem").fetchone() == ("6MB",)
        with conn.cursor() as cursor:
            cursor.executemany("SELECT %s::int", [(1,), (2,)])
            assert [r[0] for r in cursor.stream("SELECT generate_series(1, 3)")] == [1, 2, 3]
            with cursor.copy("COPY (SELECT 7) TO STDOUT") as copy:
                assert b"".join(bytes(b) for b in copy) == b"7\n"
        with conn.transaction(), conn.cursor(name="plain") as named:
            named.execute("SELECT generate_series(1, 2)")
            assert named.fetchall() == [(1,), (2,)]
        assert "_dpp_clean" not in vars(conn)


def test_reset_session_takes_auto_by_default_and_true_or_false() -> None:
    from django_pooled_pg.options import parse

    assert parse("default", True).reset_session == "auto"
    for value in ("auto", True, False):
        assert parse("default", {"reset_session": value}).reset_session is value
