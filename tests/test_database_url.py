"""DATABASE_URL: dj-database-url and django-environ (the real packages) to a working pool.

Both put a URL's query parameters into OPTIONS as flat keys, converting
only some values; ``pool_<option>`` keys are pool options in every form
they produce. ``import django_pooled_pg.schemes`` makes a URL scheme select
the engine.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import dj_database_url
import environ
import pytest
from django.core.exceptions import ImproperlyConfigured

import django_pooled_pg.schemes  # noqa: F401  (registers the URL schemes)
from django_pooled_pg.base import DatabaseWrapper
from django_pooled_pg.checks import check_pool_options
from tests.conftest import Make
from tests.helpers import db_settings

# The system check reads settings.DATABASES; Django warns that overriding it
# does not reach open connections, which the check does not use.
pytestmark = pytest.mark.filterwarnings("ignore:Overriding setting DATABASES")

QUERY = "pool_max_size=8&pool_timeout=2.5&pool_fail_fast=true"


def url(scheme: str = "postgres", query: str = QUERY) -> str:
    s = db_settings()
    return (
        f"{scheme}://{quote(s['USER'])}:{quote(s['PASSWORD'], safe='')}@{s['HOST']}:{s['PORT']}"
        f"/{quote(s['NAME'])}?{query}"
    )


def settings_from(parsed: dict[str, Any]) -> dict[str, Any]:
    """The test database's settings with what the parser gave (TEST and the rest kept)."""
    s = db_settings()
    s.update({k: v for k, v in parsed.items() if k != "OPTIONS"})
    s["OPTIONS"] = dict(parsed.get("OPTIONS", {}))
    s["PORT"] = str(s["PORT"])
    return s


def parse_with(library: str, url: str, **kwargs: Any) -> dict[str, Any]:
    if library == "dj-database-url":
        return dict(dj_database_url.parse(url, **kwargs))
    return dict(environ.Env.db_url_config(url, **kwargs))


@pytest.mark.parametrize(
    "library, options",
    [
        ("dj-database-url", {"pool_max_size": 8, "pool_timeout": "2.5", "pool_fail_fast": True}),
        ("django-environ", {"pool_max_size": 8, "pool_timeout": "2.5", "pool_fail_fast": "true"}),
    ],
)
def test_a_url_with_pool_options_gives_a_working_pool(
    make_wrapper: Make, library: str, options: dict[str, Any]
) -> None:
    parsed = parse_with(library, url(), engine="django_pooled_pg")
    assert parsed["ENGINE"] == "django_pooled_pg"
    assert parsed["OPTIONS"] == options  # what each library really produces
    wrapper = make_wrapper(settings=settings_from(parsed))
    pool = wrapper.pool
    assert (pool.max_size, pool.timeout, pool.options.fail_fast) == (8, 2.5, True)
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    wrapper.close()
    assert not any(k.startswith("pool_") for k in wrapper.get_connection_params())


@pytest.mark.parametrize("library", ["dj-database-url", "django-environ"])
@pytest.mark.parametrize("scheme", django_pooled_pg.schemes.SCHEMES)
def test_the_registered_scheme_selects_the_engine(
    make_wrapper: Make, library: str, scheme: str
) -> None:
    parsed = parse_with(library, url(scheme, "pool_max_size=3"))
    assert parsed["ENGINE"] == "django_pooled_pg"
    wrapper = make_wrapper(settings=settings_from(parsed))
    assert wrapper.pool.max_size == 3
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT 1")
    wrapper.close()


def test_dj_database_url_config_reads_the_environment(monkeypatch, make_wrapper: Make) -> None:
    monkeypatch.setenv("DATABASE_URL", url("pooled-postgres", "pool_min_size=0&pool_max_size=2"))
    parsed = dict(dj_database_url.config())
    wrapper = make_wrapper(settings=settings_from(parsed))
    assert (wrapper.pool.min_size, wrapper.pool.max_size) == (0, 2)


def test_django_environ_keeps_several_hosts_for_the_scheme() -> None:
    parsed = environ.Env.db_url_config("pooled-postgres://u:p@db1:5432,db2:5433/app")
    assert (parsed["HOST"], parsed["PORT"], parsed["NAME"]) == ("db1,db2", "5432,5433", "app")


def pool_options_of(options: dict[str, Any]) -> Any:
    s = db_settings()
    s["OPTIONS"] = {**s["OPTIONS"], "pool": True, **options}
    return DatabaseWrapper(s, "url").pool_options()


@pytest.mark.parametrize(
    "flat, option, value",
    [
        ({"pool_timeout": "2.5"}, "timeout", 2.5),
        ({"pool_timeout": 3}, "timeout", 3.0),
        ({"pool_max_size": "8"}, "max_size", 8),
        ({"pool_fail_fast": "false"}, "fail_fast", False),
        ({"pool_fail_fast": "False"}, "fail_fast", False),
        ({"pool_fail_fast": 0}, "fail_fast", False),
        ({"pool_stats": "on"}, "stats", True),
        ({"pool_leak_timeout": "none"}, "leak_timeout", None),
        ({"pool_leak_timeout": "None"}, "leak_timeout", None),
        ({"pool_log_waits_over": "0.5"}, "log_waits_over", 0.5),
        ({"pool_reset_session": "auto"}, "reset_session", "auto"),
        ({"pool_reset_session": "true"}, "reset_session", True),
        ({"pool_reset_session": False}, "reset_session", False),
        ({"pool_pgbouncer": "session"}, "pgbouncer", "session"),
        ({"pool_name": "web"}, "name", "web"),
        ({"pool_check": "django_pooled_pg.options.libpq_keywords"}, "check", None),
    ],
)
def test_every_form_a_url_parser_produces_is_accepted(
    flat: dict[str, Any], option: str, value: Any
) -> None:
    got = getattr(pool_options_of(flat), option)
    if option == "check":
        assert callable(got)
    else:
        assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "flat, says",
    [
        (
            {"pool_timeout": "-1"},
            ["['OPTIONS']['pool_timeout'] is -1.0", "a number of seconds > 0"],
        ),
        ({"pool_max_size": "eight"}, ["['OPTIONS']['pool_max_size'] is 'eight'", "an integer"]),
        (
            {"pool_fail_fast": "maybe"},
            ["['OPTIONS']['pool_fail_fast'] is 'maybe'", "True or False"],
        ),
        (
            {"pool_max_sise": 3},
            ["unknown pool option 'pool_max_sise'", "Did you mean 'pool_max_size'?"],
        ),
        (
            {"pool_max_size": 3, "pool": {"max_size": 4}},
            ["['OPTIONS']['pool_max_size'] and", "['OPTIONS']['pool']['max_size'] both set"],
        ),
        (
            {"sslmod": "require"},
            ["['OPTIONS'] has 'sslmod'", "not a connection parameter libpq knows", "'sslmode'"],
        ),
        ({"max_size": 8}, ["['OPTIONS'] has 'max_size'", "Did you mean 'pool_max_size'?"]),
    ],
)
def test_bad_flat_keys_and_unknown_libpq_options_are_named_at_once(
    flat: dict[str, Any], says: list[str]
) -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        pool_options_of(flat)
    for text in says:
        assert text in str(caught.value)


def test_the_system_check_names_an_unknown_libpq_option(settings) -> None:
    s = db_settings()
    s["OPTIONS"] = {**s["OPTIONS"], "pool": True, "pool_max_size": 2, "sslmod": "require"}
    settings.DATABASES = {**settings.DATABASES, "url": s}
    messages = [m.msg for m in check_pool_options() if "DATABASES['url']" in m.msg]
    assert len(messages) == 1 and "'sslmod'" in messages[0], messages


def test_a_libpq_typo_is_a_configuration_error_not_an_outage(make_wrapper: Make) -> None:
    """Before: ServerUnavailable ("invalid connection option ... The pool keeps retrying")."""
    wrapper = make_wrapper(options={"connect_timout": 2})
    with pytest.raises(
        ImproperlyConfigured, match="'connect_timout'.*Did you mean 'connect_timeout'"
    ):
        wrapper.ensure_connection()


@pytest.mark.parametrize(
    "query, option, value",
    [
        ("pool_reset_session=0", "reset_session", False),
        ("pool_reset_session=1", "reset_session", True),
        ("pool_reset_session=auto", "reset_session", "auto"),
        ("pool_name=2024", "name", "2024"),
        ("pool_fail_fast=1", "fail_fast", True),
        ("pool_leak_timeout=none", "leak_timeout", None),
        ("pool_pgbouncer_admin=false", "pgbouncer_admin", None),
        ("pool_pgbouncer_admin=1", "pgbouncer_admin", True),
    ],
)
@pytest.mark.parametrize("library", ["dj-database-url", "django-environ"])
def test_what_each_library_really_gives_is_read(
    library: str, query: str, option: str, value: Any
) -> None:
    parsed = parse_with(library, url("postgres", query), engine="django_pooled_pg")
    got = getattr(pool_options_of(parsed["OPTIONS"]), option)
    assert got == value and type(got) is type(value), (parsed["OPTIONS"], got)


@pytest.mark.parametrize("library", ["dj-database-url", "django-environ"])
def test_pool_false_in_a_url_turns_pooling_off(library: str) -> None:
    parsed = parse_with(library, url("postgres", "pool=false"), engine="django_pooled_pg")
    wrapper = DatabaseWrapper(settings_from(parsed), "url")
    assert wrapper.pooled is False and wrapper.pool is None


def test_an_error_between_two_options_names_the_keys_written() -> None:
    with pytest.raises(ImproperlyConfigured) as caught:
        pool_options_of({"pool_min_size": "5", "pool_max_size": "2"})
    assert "['OPTIONS']['pool_max_size'] is 2, smaller than min_size" in str(caught.value)


def test_an_unknown_key_set_to_none_is_left_out_as_psycopg_leaves_it() -> None:
    assert pool_options_of({"not_a_libpq_key": None}).max_size == 10


def test_a_subclass_may_take_options_of_its_own() -> None:
    class IamWrapper(DatabaseWrapper):
        non_libpq_options = frozenset({"iam_region"})

    s = db_settings()
    s["OPTIONS"] = {**s["OPTIONS"], "pool": True, "iam_region": "eu-west-1"}
    assert IamWrapper(s, "iam").pool_options().max_size == 10
    with pytest.raises(ImproperlyConfigured, match="'iam_region'"):
        DatabaseWrapper(s, "plain").pool_options()


def test_the_system_check_names_a_libpq_typo_with_pooling_off(settings) -> None:
    s = db_settings()
    s["OPTIONS"] = {**s["OPTIONS"], "pool": False, "sslmod": "require"}
    settings.DATABASES = {**settings.DATABASES, "nopool": s}
    messages = [m.msg for m in check_pool_options() if "DATABASES['nopool']" in m.msg]
    assert len(messages) == 1 and "'sslmod'" in messages[0], messages
