"""The wrapper's Django API answers as Django's own postgresql backend does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from django.core.exceptions import SynchronousOnlyOperation
from django.db.backends.postgresql.base import DatabaseWrapper as DjangoWrapper

import django_pooled_pg
from tests.conftest import Make
from tests.helpers import db_settings

#: Keys Django's get_connection_params() adds for its own connect(), which a
#: plain psycopg.connect() does not take as connection options.
DJANGO_ONLY = ("cursor_factory", "context", "prepare_threshold")


def _connect(params: dict[str, Any]) -> psycopg.Connection[Any]:
    return psycopg.connect(**{k: v for k, v in params.items() if k not in DJANGO_ONLY})


def test_get_connection_params_reach_the_configured_database(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"max_size": 1})
    params = wrapper.get_connection_params()
    djangos = DjangoWrapper(db_settings(), "plain").get_connection_params()
    assert params.keys() == djangos.keys()
    assert {k: v for k, v in params.items() if k != "context"} == {
        k: v for k, v in djangos.items() if k != "context"
    }
    # Not the pool's startup options, which server-side poolers refuse.
    assert "options" not in params
    with _connect(params) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
    assert name == (wrapper.settings_dict["NAME"],)


def counting_password() -> tuple[Callable[[], str], list[int]]:
    """A callable PASSWORD giving the test database's password, and its calls."""
    password = db_settings()["PASSWORD"]
    calls: list[int] = []

    def provide() -> str:
        calls.append(1)
        return str(password)

    return provide, calls


def test_get_connection_params_call_a_callable_password(make_wrapper: Make) -> None:
    provide, calls = counting_password()
    password = provide()
    calls.clear()
    wrapper = make_wrapper(pool={"max_size": 1}, PASSWORD=provide)
    params = wrapper.get_connection_params()
    assert params["password"] == password and calls == [1]
    with _connect(params) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_get_connection_params_use_the_password_provider(make_wrapper: Make) -> None:
    password = db_settings()["PASSWORD"]
    wrapper = make_wrapper(pool={"max_size": 1, "password_provider": lambda: password}, PASSWORD="")
    params = wrapper.get_connection_params()
    assert params["password"] == password
    with _connect(params) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_checkout_does_not_build_connection_params(make_wrapper: Make) -> None:
    """The pool was given its parameters once: a callable PASSWORD is called per connection."""
    provide, calls = counting_password()
    wrapper = make_wrapper(pool={"min_size": 0, "max_size": 1}, PASSWORD=provide)
    for _ in range(5):
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper.close()
    assert calls == [1]  # one physical connection, five checkouts


def test_connect_from_an_event_loop_raises_as_djangos_does(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"max_size": 1})
    djangos = DjangoWrapper(db_settings(), "plain")

    async def from_the_loop(w: Any) -> None:
        w.connect()

    for w in (djangos, wrapper):
        with pytest.raises(SynchronousOnlyOperation):
            asyncio.run(from_the_loop(w))
    assert wrapper.connection is None
    with wrapper.cursor() as cursor:  # from sync code, as ever
        cursor.execute("SELECT 1")
    wrapper.close()
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0


def test_options_replaced_without_a_pool_key_still_pool(make_wrapper: Make) -> None:
    """Django's own tests replace OPTIONS wholesale; no "pool" key means pooled, as on creation."""
    wrapper = make_wrapper(pool={"max_size": 1})
    wrapper.settings_dict["OPTIONS"] = {}
    assert wrapper.pooled and wrapper.pool_options().max_size == 10
    with wrapper.chunked_cursor() as cursor:
        cursor.execute("SELECT g FROM generate_series(1, 3) g")
        assert cursor.fetchall() == [(1,), (2,), (3,)]
    wrapper.close()
