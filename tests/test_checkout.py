"""Checkout and return: one pool per alias and settings, shared by threads."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction
from django.db.backends.signals import connection_created
from psycopg_pool import ConnectionPool

import django_pooled_pg
from django_pooled_pg.pool import DjangoPool
from tests.conftest import Make
from tests.helpers import CheckedThread, run_in_thread, wsgi_get


def backend_pid(wrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def test_engine_pools_without_any_pool_option(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool=True)
    assert isinstance(wrapper.pool, ConnectionPool)
    assert isinstance(wrapper.pool, DjangoPool)
    # What Django reads to decide whether a connection is pooled.
    assert connection.settings_dict["OPTIONS"]["pool"]


def test_returned_connection_is_reused(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    first = backend_pid(wrapper)
    wrapper.close()
    assert wrapper.connection is None
    assert backend_pid(wrapper) == first
    stats = wrapper.pool.get_stats()
    assert stats["connections_num"] == 1


def test_copy_shares_the_pool(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 2})
    twin = wrapper.copy()
    assert twin.pool is wrapper.pool
    backend_pid(wrapper)
    backend_pid(twin)
    assert wrapper.connection is not twin.connection
    twin.close()


def test_threads_share_one_pool(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 3})
    pools = set()
    pids = set()
    barrier = threading.Barrier(3)

    def work() -> None:
        twin = wrapper.copy()  # what each thread's connections[alias] is
        pids.add(backend_pid(twin))
        pools.add(id(twin.pool))
        barrier.wait(10)  # all three hold a connection at once
        twin.close()

    threads = [CheckedThread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(pools) == 1
    assert len(pids) == 3
    assert wrapper.pool.get_stats()["pool_size"] == 3
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0


@pytest.mark.django_db(transaction=True)
def test_atomic_block_keeps_its_connection() -> None:
    seen = set()
    with transaction.atomic():
        for _ in range(3):
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid(), txid_current()")
                seen.add(cursor.fetchone())
            # Other threads check out and return meanwhile.
            run_in_thread(lambda: wsgi_get("/ping/"))
    assert len(seen) == 1  # one connection, one transaction


@pytest.mark.django_db(transaction=True)
def test_request_returns_connection_to_pool() -> None:
    pool = connection.pool
    pids = {wsgi_get("/ping/")["backend_pid"] for _ in range(5)}
    # Returned at the end of each request (close_old_connections), reused.
    assert connection.connection is None
    assert django_pooled_pg.stats("default").live.in_use == 0
    assert len(pids) <= pool.max_size


def test_new_settings_give_a_new_pool(make_wrapper: Make, admin) -> None:
    admin.execute("DROP DATABASE IF EXISTS pooled_other")
    admin.execute("CREATE DATABASE pooled_other")
    try:
        wrapper = make_wrapper(pool={"max_size": 2})
        old_pool = wrapper.pool
        backend_pid(wrapper)
        wrapper.close()
        wrapper.settings_dict["NAME"] = "pooled_other"  # as the test runner does
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            assert cursor.fetchone()[0] == "pooled_other"
        assert wrapper.pool is not old_pool
        assert old_pool.closed
        wrapper.close()
        wrapper.close_pool()
    finally:
        admin.execute("DROP DATABASE IF EXISTS pooled_other WITH (FORCE)")


def test_connection_created_is_sent_on_every_checkout(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1})
    seen = []

    def receiver(sender, connection, **kwargs):
        if connection is wrapper:
            seen.append(connection.connection.info.backend_pid)

    connection_created.connect(receiver)
    try:
        for _ in range(3):
            backend_pid(wrapper)
            wrapper.close()
    finally:
        connection_created.disconnect(receiver)
    assert len(seen) == 3
    assert len(set(seen)) == 1  # the same physical connection each time


# What Django's connect() sets on the wrapper (BaseDatabaseWrapper.connect).
# Every attribute of the wrapper is compared, so that a field a new Django
# sets in connect() is compared too; these differ between any two connects.
CONNECT_VOLATILE = {"close_at", "_dpp_generation"}


def connect_state(wrapper) -> dict:
    state = {k: v for k, v in vars(wrapper).items() if k not in CONNECT_VOLATILE}
    state["close_at is set"] = wrapper.close_at is not None
    state["connection.autocommit"] = wrapper.connection.autocommit
    state["connection.isolation_level"] = wrapper.connection.isolation_level
    return state


def dirty(wrapper) -> None:
    """What a previous request can leave on the wrapper."""
    wrapper.in_atomic_block = True
    wrapper.needs_rollback = True
    wrapper.errors_occurred = True
    wrapper.closed_in_transaction = True
    wrapper.savepoint_ids = ["s1"]
    wrapper.atomic_blocks = ["a"]
    wrapper.run_on_commit = [("s1", print, False)]
    wrapper.health_check_done = False


@pytest.mark.parametrize(
    ("settings", "options"),
    [({}, {}), ({"AUTOCOMMIT": False}, {}), ({}, {"isolation_level": 3})],
    ids=["defaults", "autocommit off", "serializable"],
)
def test_checkout_leaves_the_wrapper_as_djangos_connect_does(
    make_wrapper: Make, settings: dict, options: dict
) -> None:
    """The lean connect() for pooled wrappers skips work, never state."""
    from django.db.backends.base.base import BaseDatabaseWrapper

    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1}, options=options, **settings)
    seen = []

    def receiver(sender, connection, **kwargs):
        if connection is wrapper:
            seen.append(connection.connection)

    connection_created.connect(receiver)
    try:
        states = []
        for connect in (type(wrapper).connect, BaseDatabaseWrapper.connect):
            dirty(wrapper)
            connect(wrapper)
            states.append(connect_state(wrapper))
            backend_pid(wrapper)
            wrapper.in_atomic_block = False  # dirty() set it: let close() return it
            wrapper.close()
            assert wrapper.connection is None
    finally:
        connection_created.disconnect(receiver)
    ours, djangos = states
    assert ours == djangos
    assert ours["autocommit"] is (settings.get("AUTOCOMMIT") is not False)
    assert len(seen) == 2 and seen[0] is seen[1]  # sent at each checkout, one connection


def test_a_subclass_get_new_connection_is_still_called(make_wrapper: Make) -> None:
    base = make_wrapper(pool={"min_size": 0, "max_size": 1})
    calls = []

    class Custom(type(base)):  # type: ignore[misc]
        def get_new_connection(self, conn_params):
            calls.append(conn_params)
            return super().get_new_connection(conn_params)

    wrapper = Custom(base.settings_dict, base.alias)
    try:
        first = backend_pid(wrapper)
        wrapper.close()
        assert backend_pid(wrapper) == first
    finally:
        wrapper.close()
    # Once per checkout, with Django's parameters for the alias (the pool
    # itself was given its own once).
    assert [c["dbname"] for c in calls] == [wrapper.settings_dict["NAME"]] * 2


def test_pool_is_created_lazily(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"max_size": 2})
    pool = wrapper.pool
    assert not pool._opened  # nothing opened until a connection is needed
    run_in_thread(lambda: None)
    backend_pid(wrapper)
    assert pool._opened


def test_django_sees_what_the_engine_does(make_wrapper: Make) -> None:
    """Feature flags and test skips read OPTIONS["pool"]; Django's own pool never exists."""
    from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

    skip = "Pool does implicit health checks"
    pooled = make_wrapper(pool=True)
    pooled.settings_dict["OPTIONS"].pop("pool")
    pooled = type(pooled)(pooled.settings_dict, "implicit")  # ENGINE alone, no "pool" key
    assert pooled.settings_dict["OPTIONS"]["pool"] is True
    assert skip in pooled.features.django_test_skips
    backend_pid(pooled)
    pooled.close()
    pooled.close_pool()
    plain = make_wrapper(pool=False)
    assert plain.pool is None
    assert skip not in plain.features.django_test_skips
    assert DjangoWrapper._connection_pools == {}


def test_pool_false_connects_and_closes(make_wrapper: Make, admin) -> None:
    plain = make_wrapper(pool=False)
    first = backend_pid(plain)
    raw = plain.connection
    plain.close()
    assert raw.closed
    assert backend_pid(plain) != first


@pytest.mark.django_db(transaction=True, databases=["default", "small"])
def test_close_all_returns_every_alias_connection() -> None:
    """What Django runs at the end of a management command and in tests."""
    from django.db import connections

    aliases = ("default", "small")
    for alias in aliases:
        with connections[alias].cursor() as cursor:
            cursor.execute("SELECT 1")
    assert all(django_pooled_pg.stats(alias).live.in_use for alias in aliases)
    connections.close_all()
    assert not any(django_pooled_pg.stats(alias).live.in_use for alias in aliases)


def test_two_aliases_on_one_database_have_pools_of_their_own(make_wrapper: Make) -> None:
    first = make_wrapper(pool={"min_size": 0, "max_size": 1})
    second = make_wrapper(pool={"min_size": 0, "max_size": 1})
    assert first.settings_dict["NAME"] == second.settings_dict["NAME"]
    assert first.pool is not second.pool
    pid = backend_pid(first)
    assert backend_pid(second) != pid  # each alias has its own max_size of 1
    first.close()
    first.close_pool()
    assert first.pool is not None and second.pool is not None
    second.close()
    backend_pid(second)  # unaffected by the other alias's close_pool()
