"""Options: validated with clear errors, defaults that fit a web worker, Django's OPTIONS kept."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from psycopg_pool import ConnectionPool

import django_pooled_pg
from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.checks import check_pool_options
from django_pooled_pg.options import DEFAULT_CONNECT_TIMEOUT, OPTIONS
from tests.conftest import Make
from tests.helpers import db_settings

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"

# The checks read settings.DATABASES; Django warns that overriding it does
# not reach open connections, which these tests do not use.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

# (pool options, what the message must say)
BAD = [
    ({"max_sise": 3}, ["unknown option 'max_sise'", "Did you mean 'max_size'?"]),
    ({"reset_sesion": False}, ["Did you mean 'reset_session'?"]),
    ({"max_size": "4"}, ["['max_size'] is '4'", "an integer >= 1"]),
    ({"max_size": 0}, ["['max_size'] is 0", "an integer >= 1"]),
    ({"max_size": True}, ["['max_size'] is True", "an integer"]),
    ({"min_size": -1}, ["['min_size'] is -1", "an integer >= 0"]),
    (
        {"min_size": 5, "max_size": 2},
        ["['max_size'] is 2, smaller than min_size (5)", "max_size must be >= min_size"],
    ),
    ({"timeout": -1}, ["['timeout'] is -1", "a number of seconds > 0"]),
    ({"timeout": 0}, ["['timeout'] is 0", "> 0"]),
    ({"timeout": "x"}, ["['timeout'] is 'x'"]),
    ({"timeout": math.inf}, ["['timeout'] is inf"]),
    ({"max_lifetime": math.nan}, ["['max_lifetime'] is nan"]),
    ({"num_workers": 0}, ["['num_workers'] is 0", "an integer >= 1"]),
    ({"max_waiting": 1.5}, ["['max_waiting'] is 1.5", "an integer >= 0"]),
    ({"reset_session": "yes"}, ["['reset_session'] is 'yes'", "'auto', True or False"]),
    ({"reset_session": 1}, ["['reset_session'] is 1", "'auto', True or False"]),
    ({"reset_session": "AUTO"}, ["['reset_session'] is 'AUTO'", "'auto', True or False"]),
    ({"name": ""}, ["['name'] is ''", "a string"]),
    (
        {"check": "tests.nowhere.check"},
        ["['check'] names 'tests.nowhere.check'", "cannot be imported"],
    ),
    ({"configure": 42}, ["['configure'] is 42", "a callable"]),
    ({"server_role": "replica"}, ["['server_role'] is 'replica'", "'primary', 'standby' or"]),
    ({"drain_on_role_change": "yes"}, ["['drain_on_role_change'] is 'yes'", "True or False"]),
]


def wrapper_with(pool: Any, **overrides: Any) -> DatabaseWrapper:
    s = db_settings(**overrides)
    s["OPTIONS"] = {**s["OPTIONS"], "pool": pool}
    return DatabaseWrapper(s, "bad")


@pytest.mark.parametrize(
    "pool, says", BAD, ids=[next(iter(p)) + "=" + repr(next(iter(p.values()))) for p, _ in BAD]
)
def test_bad_option_is_named_by_pool_creation_and_by_the_check(
    pool: dict[str, Any], says: list[str]
) -> None:
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper_with(pool).pool  # noqa: B018 - creating the pool validates
    for fragment in says:
        assert fragment in str(info.value)
    with override_settings(DATABASES={"default": {**db_settings(), "OPTIONS": {"pool": pool}}}):
        errors = check_pool_options()
    assert errors and all(e.id == "django_pooled_pg.E001" for e in errors)
    assert any(all(f in e.msg for f in says) for e in errors)


@pytest.mark.parametrize("raw", [3, "yes", None, ["max_size"]])
def test_pool_setting_of_the_wrong_type(raw: Any) -> None:
    with pytest.raises(ImproperlyConfigured, match=r"must be True, False \(no pooling\) or a dict"):
        wrapper_with(raw).pool  # noqa: B018


def test_every_problem_is_reported_at_once() -> None:
    pool = {"max_sise": 3, "timeout": -1, "reset_session": "no"}
    with override_settings(DATABASES={"default": {**db_settings(), "OPTIONS": {"pool": pool}}}):
        errors = check_pool_options()
    assert len(errors) == 3


def test_plain_manage_py_check_reports_bad_options(transactional_db: None) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTPROJECT), "POOL_OPTIONS_JSON": '{"max_sise": 3}'}
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=TESTPROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "django_pooled_pg.E001" in result.stderr
    assert "Did you mean 'max_size'?" in result.stderr


def test_conn_max_age_is_rejected_with_djangos_sentence_first() -> None:
    wrapper = wrapper_with(True, CONN_MAX_AGE=60)
    with pytest.raises(ImproperlyConfigured) as info:
        wrapper.pool  # noqa: B018
    message = str(info.value)
    assert message.startswith("Pooling doesn't support persistent connections.")
    assert "max_lifetime" in message
    with override_settings(DATABASES={"default": {**db_settings(), "CONN_MAX_AGE": None}}):
        assert [e.id for e in check_pool_options()] == ["django_pooled_pg.E002"]


def test_conn_max_age_with_pooling_off_is_djangos_persistent_connection(
    transactional_db: None,
) -> None:
    """With OPTIONS["pool"] False the engine is Django's backend: CONN_MAX_AGE works."""
    settings = db_settings(CONN_MAX_AGE=60)
    settings["OPTIONS"] = {**settings["OPTIONS"], "pool": False}
    with override_settings(DATABASES={"default": settings}):
        assert check_pool_options() == []
    wrapper = wrapper_with(False, CONN_MAX_AGE=60)
    wrapper.ensure_connection()
    first = wrapper.connection
    wrapper.close_if_unusable_or_obsolete()  # what request_finished does
    assert wrapper.connection is first  # kept for 60 s, as Django does
    wrapper.close()


def test_conn_settings_changed_on_a_live_pool_keep_it(make_wrapper: Make) -> None:
    """Django's own tests change these on live pooled aliases."""
    wrapper = make_wrapper(pool={"max_size": 2})
    pool = wrapper.pool
    wrapper.settings_dict["CONN_MAX_AGE"] = 10
    wrapper.settings_dict["CONN_HEALTH_CHECKS"] = True
    assert wrapper.pool is pool


def custom_check(conn: psycopg.Connection[Any]) -> None:
    pass


def test_health_check_follows_django(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool=True)
    wrapper.settings_dict["CONN_HEALTH_CHECKS"] = False
    assert wrapper.pool._check is None
    wrapper.close_pool()
    wrapper.settings_dict["CONN_HEALTH_CHECKS"] = True
    assert wrapper.pool._check is ConnectionPool.check_connection
    wrapper.close_pool()
    for enabled in (True, False):
        wrapper.settings_dict["OPTIONS"]["pool"] = {"check": "tests.test_validation.custom_check"}
        wrapper.settings_dict["CONN_HEALTH_CHECKS"] = enabled
        assert wrapper.pool._check is custom_check
        wrapper.close_pool()


def test_pool_options_are_not_mutated(make_wrapper: Make) -> None:
    options = {"min_size": 0, "max_size": 2}
    wrapper = make_wrapper(pool=options)
    assert wrapper.pool is not None
    assert options == {"min_size": 0, "max_size": 2}


def test_defaults_fit_a_web_worker(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool=True, alias="defaults")
    pool = wrapper.pool
    defaults = {o.name: o.default for o in OPTIONS}
    assert (pool.min_size, pool.max_size) == (defaults["min_size"], defaults["max_size"])
    assert pool.timeout == defaults["timeout"] == 10.0  # under gunicorn's 30 s
    assert pool.max_idle == defaults["max_idle"]
    assert pool.max_lifetime == defaults["max_lifetime"]
    assert pool.num_workers == defaults["num_workers"]
    assert pool.name == "defaults"
    assert pool.kwargs()["connect_timeout"] == DEFAULT_CONNECT_TIMEOUT  # per attempt (startup.py)
    given = make_wrapper(pool=True, options={"connect_timeout": 17})
    assert given.pool.kwargs()["connect_timeout"] == 17


def test_small_max_size_alone_works(make_wrapper: Make) -> None:
    for size in (1, 2):
        wrapper = make_wrapper(pool={"max_size": size})
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        assert wrapper.pool.min_size <= size == wrapper.pool.max_size


# -- credentials --------------------------------------------------------------

_calls: list[str] = []


def token() -> str:
    from django.db import connection

    _calls.append("called")
    return str(connection.settings_dict["PASSWORD"])


@pytest.mark.parametrize("how", ["PASSWORD", "password_provider", "dotted"])
def test_rotating_credentials_are_fetched_per_new_connection(make_wrapper: Make, how: str) -> None:
    _calls.clear()
    pool: dict[str, Any] = {"min_size": 0, "max_size": 2}
    overrides: dict[str, Any] = {}
    if how == "PASSWORD":
        overrides["PASSWORD"] = token
    elif how == "password_provider":
        pool["password_provider"] = token
        overrides["PASSWORD"] = ""
    else:
        pool["password_provider"] = "tests.test_validation.token"
        overrides["PASSWORD"] = ""
    wrapper = make_wrapper(pool=pool, **overrides)
    for _ in range(5):  # one physical connection, reused
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper.close()
    assert len(_calls) == 1
    twin = wrapper.copy()
    with wrapper.cursor(), twin.cursor():  # a second physical connection
        pass
    twin.close()
    assert len(_calls) == 2


def test_callable_password_without_pool(make_wrapper: Make) -> None:
    _calls.clear()
    wrapper = make_wrapper(pool=False, PASSWORD=token)
    for _ in range(2):
        with wrapper.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper.close()
    assert len(_calls) == 2


# -- Django's other OPTIONS ---------------------------------------------------


def one(wrapper: DatabaseWrapper, sql: str) -> Any:
    with wrapper.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def test_libpq_options_reach_the_session(make_wrapper: Make, admin) -> None:
    wrapper = make_wrapper(
        pool={"min_size": 0, "max_size": 1},
        options={
            "application_name": "pooled-options",
            "sslmode": "disable",
            "keepalives": 1,
            "keepalives_idle": 30,
            "options": "-c statement_timeout=1234",
        },
    )
    for _ in range(2):  # and again after a reset
        assert one(wrapper, "SHOW statement_timeout") == "1234ms"
        # The user's name first, then which process and alias (see server.py).
        assert one(wrapper, "SHOW application_name").startswith("pooled-options dpp:")
        wrapper.close()


def test_server_side_binding_and_prepare_threshold(make_wrapper: Make) -> None:
    wrapper = make_wrapper(
        pool={"max_size": 1}, options={"server_side_binding": True, "prepare_threshold": 2}
    )
    with wrapper.cursor() as cursor:
        assert not isinstance(cursor.cursor, psycopg.ClientCursor)
        assert wrapper.connection.prepare_threshold == 2


def test_invalid_isolation_level_is_rejected_before_checkout(make_wrapper: Make) -> None:
    wrapper = make_wrapper(pool={"max_size": 1}, options={"isolation_level": 99})
    with pytest.raises(ImproperlyConfigured, match="Invalid transaction isolation level 99"):
        wrapper.ensure_connection()
    assert django_pooled_pg.stats(wrapper.alias).live.in_use == 0


# -- secrets ------------------------------------------------------------------

SECRET = "s3cret-WRONG-pass"


def test_passwords_never_appear(make_wrapper: Make, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrapper = make_wrapper(pool={"max_size": 1, "timeout": 1}, PASSWORD=SECRET)
    with pytest.raises(Exception) as info:
        wrapper.ensure_connection()
    texts = [str(info.value), repr(info.value), repr(wrapper.pool), str(wrapper.pool.get_stats())]
    bad = wrapper_with({"max_sise": 1}, PASSWORD=SECRET)
    with pytest.raises(ImproperlyConfigured) as config_error:
        bad.pool  # noqa: B018
    texts.append(str(config_error.value))
    good = make_wrapper(pool={"max_size": 1})
    with good.cursor():
        texts += [repr(good.connection), repr(good.pool)]
    texts += [r.getMessage() for r in caplog.records]
    password = str(good.settings_dict["PASSWORD"])
    for text in texts:
        assert SECRET not in text
        assert password not in text


def test_tcp_settings_have_defaults_that_options_override(make_wrapper: Make) -> None:
    """A vanished peer is noticed in about a minute, not hours; OPTIONS win."""
    from django_pooled_pg.options import DEFAULT_TCP_SETTINGS

    wrapper = make_wrapper(pool={"max_size": 1})
    wrapper.ensure_connection()
    params = wrapper.connection.info.get_parameters()
    for key, value in DEFAULT_TCP_SETTINGS.items():
        assert params[key] == str(value), key
    custom = make_wrapper(
        pool={"max_size": 1}, options={"keepalives_idle": 7, "tcp_user_timeout": 0}
    )
    custom.ensure_connection()
    params = custom.connection.info.get_parameters()
    assert params["keepalives_idle"] == "7"
    assert params["tcp_user_timeout"] == "0"
    assert params["keepalives_count"] == "3"


@pytest.mark.parametrize(
    "role, target",
    [("primary", "standby"), ("primary", "read-only"), ("standby", "read-write")],
)
def test_a_server_role_that_contradicts_target_session_attrs_is_refused(
    role: str, target: str
) -> None:
    wrapper = wrapper_with({"server_role": role}, OPTIONS={"target_session_attrs": target})
    with pytest.raises(ImproperlyConfigured) as caught:
        wrapper.pool_options()
    message = str(caught.value)
    assert f"['server_role'] is {role!r}" in message
    assert f"['target_session_attrs'] is {target!r}" in message


@pytest.mark.parametrize(
    "target, role",
    [
        (None, "primary"),
        ("read-write", "primary"),
        ("primary", "primary"),
        ("standby", "standby"),
        ("read-only", "any"),
        ("prefer-standby", "any"),
        ("any", "any"),
    ],
)
def test_the_server_role_follows_target_session_attrs(
    make_wrapper: Make, target: str | None, role: str
) -> None:
    options = {} if target is None else {"target_session_attrs": target}
    pool = make_wrapper(options=options).pool
    assert pool.role == role and pool.config.server_role == role
