"""Who holds the pool: each checkout charged to its view, task, command or caller."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

import django_pooled_pg
from django_pooled_pg import holders
from django_pooled_pg.errors import PoolExhausted
from django_pooled_pg.observability.records import MAX_HOLDERS, OTHER, TALLY_EVERY, AliasRecord
from django_pooled_pg.observability.report import top_holders
from tests.conftest import Make
from tests.helpers import TESTPROJECT, CheckedThread, wait_until, wsgi_get


def held(alias: str) -> dict[str, Any]:
    """This process's holders of *alias*, by name."""
    return {h.holder: h for h in django_pooled_pg.stats(alias).holders}


def checkouts_of(alias: str, holder: str) -> int:
    h = held(alias).get(holder)
    return h.checkouts if h is not None else 0


def asgi_get(path: str) -> Any:
    """One request through Django's real ASGI handler; the JSON body."""
    from django.core.handlers.asgi import ASGIHandler

    sent: list[dict[str, Any]] = []

    async def run() -> None:
        received = False

        async def receive() -> dict[str, Any]:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.sleep(3600)  # no disconnect while the response goes out
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        await ASGIHandler()(scope, receive, send)

    asyncio.run(run())
    assert sent[0]["status"] == 200, sent
    return json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


# -- requests: the resolved view ------------------------------------------------


def test_a_request_is_charged_to_its_resolved_view(transactional_db: None) -> None:
    before = checkouts_of("default", "demoapp.views.hit")
    for _ in range(3):
        wsgi_get("/hit/")
    after = held("default")["demoapp.views.hit"]
    assert after.checkouts == before + 3
    assert after.hold.count == after.checkouts and after.hold.sum > 0


def test_an_async_view_is_charged_to_itself_through_asgi(transactional_db: None) -> None:
    before = checkouts_of("default", "demoapp.async_views.athread")
    asgi_get("/athread/")
    assert checkouts_of("default", "demoapp.async_views.athread") == before + 1


class QueryFirstMiddleware:
    """A middleware that queries before the URL is resolved (as auth or tenancy do)."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return self.get_response(request)


def test_a_checkout_made_before_the_view_is_known_is_charged_to_the_view(
    transactional_db: None, settings: Any
) -> None:
    settings.MIDDLEWARE = [
        "django_pooled_pg.middleware.HolderMiddleware",
        f"{__name__}.QueryFirstMiddleware",
    ]
    before = checkouts_of("default", "demoapp.views.ping")
    unresolved = checkouts_of("default", "(unresolved request)")
    wsgi_get("/ping/")
    assert checkouts_of("default", "demoapp.views.ping") == before + 1
    assert checkouts_of("default", "(unresolved request)") == unresolved


def test_without_the_middleware_a_request_is_charged_to_unknown(
    transactional_db: None, settings: Any
) -> None:
    settings.MIDDLEWARE = []
    before = checkouts_of("default", holders.UNKNOWN)
    by_view = checkouts_of("default", "demoapp.views.ping")
    wsgi_get("/ping/")
    assert checkouts_of("default", holders.UNKNOWN) == before + 1
    assert checkouts_of("default", "demoapp.views.ping") == by_view


def test_holders_stack_finds_the_view_of_a_request_without_the_middleware(
    transactional_db: None, settings: Any
) -> None:
    settings.MIDDLEWARE = []
    options = connection.settings_dict["OPTIONS"]
    saved = options.get("pool")
    connection.close()
    # Other options, another pool of the alias (this one, for the test only).
    options["pool"] = {**(saved if isinstance(saved, dict) else {}), "holders": "stack"}
    try:
        before = checkouts_of("default", "demoapp.views.ping")
        wsgi_get("/ping/")
        assert django_pooled_pg.stats("default").config.holders == "stack"
        assert checkouts_of("default", "demoapp.views.ping") == before + 1
    finally:
        connection.close()
        if saved is None:
            del options["pool"]
        else:
            options["pool"] = saved


# -- other holders: named blocks, the stack, commands ----------------------------


def test_holders_stack_finds_the_caller_outside_a_request(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"max_size": 2, "holders": "stack"})

    def export_rows() -> None:
        w.ensure_connection()
        w.close()

    export_rows()
    name = f"{__name__}.test_holders_stack_finds_the_caller_outside_a_request.<locals>.export_rows"
    assert checkouts_of(w.alias, name) == 1


def test_a_named_block_is_its_own_holder(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"max_size": 2})
    with holders.holding("nightly export"):
        w.ensure_connection()
        w.close()
    assert checkouts_of(w.alias, "nightly export") == 1


def test_by_default_a_checkout_without_a_known_holder_is_unknown(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"max_size": 2})
    w.ensure_connection()
    w.close()
    assert set(held(w.alias)) == {holders.UNKNOWN}
    assert django_pooled_pg.stats(w.alias).config.holders is True


def test_holders_false_charges_nobody(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"max_size": 2, "holders": False})
    with holders.holding("someone"):
        w.ensure_connection()
        w.close()
    stats = django_pooled_pg.stats(w.alias)
    assert stats.counters.checkouts == 1 and stats.holders == []


def test_a_management_command_is_its_own_holder(transactional_db: None) -> None:
    code = (
        "from django.db import connection\n"
        "import django_pooled_pg, json\n"
        "connection.ensure_connection(); connection.close()\n"
        "print(json.dumps([h.holder for h in django_pooled_pg.stats('default').holders]))\n"
    )
    s = connection.settings_dict
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=TESTPROJECT,
        env={
            **os.environ,
            "PYTHONPATH": str(TESTPROJECT),
            "PGHOST": s["HOST"],
            "PGPORT": str(s["PORT"]),
            "PGUSER": s["USER"],
            "PGPASSWORD": s["PASSWORD"],
            "PGDATABASE": s["NAME"],
            "DATABASE_URL": "",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["command shell"]


def test_command_names_come_from_the_ways_django_runs_commands() -> None:
    assert holders.command_from_argv(["manage.py", "migrate", "--plan"]) == "command migrate"
    assert holders.command_from_argv(["/usr/bin/django-admin", "check"]) == "command check"
    main = os.path.join("site-packages", "django", "__main__.py")
    assert holders.command_from_argv([main, "shell"]) == "command shell"
    assert holders.command_from_argv(["manage.py"]) is None
    assert holders.command_from_argv(["manage.py", "--version"]) is None
    assert holders.command_from_argv(["gunicorn", "proj.wsgi"]) is None


# -- wait caused, exhaustion and leaks --------------------------------------------


def test_the_wait_a_holder_causes_is_charged_to_it(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 10})
    holding = threading.Event()

    def slow() -> None:
        other = w.copy()  # same alias and pool, this thread's wrapper
        with holders.holding("slow report"):
            other.ensure_connection()
            holding.set()
            time.sleep(0.4)
            other.close()

    t = CheckedThread(target=slow)
    t.start()
    assert holding.wait(10)
    with holders.holding("quick page"):
        asked = time.monotonic()
        w.ensure_connection()  # waits for the slow report's connection
        queued = time.monotonic() - asked
        w.close()
    t.join(10)
    assert queued > 0.2
    by = held(w.alias)
    # The one queued checkout waited for the one held connection. (The slow
    # report's own checkout waited for a connect: charged to nobody.)
    assert by["slow report"].wait_caused == pytest.approx(queued, rel=0.05, abs=0.01)
    assert by["quick page"].wait_caused == 0


def test_pool_exhausted_names_the_holders_of_the_connections_in_use(make_wrapper: Make) -> None:
    w = make_wrapper(pool={"min_size": 0, "max_size": 1, "timeout": 0.3})
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        other = w.copy()
        with holders.holding("reports.views.export_csv"):
            other.ensure_connection()
            holding.set()
            done.wait(10)
            other.close()

    t = CheckedThread(target=hold)
    t.start()
    try:
        assert holding.wait(10)
        with pytest.raises(PoolExhausted) as info:
            w.ensure_connection()
        message = str(info.value)
        assert "Held by: reports.views.export_csv (" in message, message
        assert "max_size=1, in use=1" in message
    finally:
        done.set()
        t.join(10)


def test_the_leak_report_names_the_holder(
    make_wrapper: Make, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="django_pooled_pg")
    w = make_wrapper(pool={"min_size": 0, "max_size": 1, "leak_timeout": 0.2})
    with holders.holding("tasks.rebuild_index"):
        w.ensure_connection()

    def reports() -> list[str]:
        return [r.getMessage() for r in caplog.records if "checked out for" in r.getMessage()]

    # Counted, then logged (with the stack): wait for the log.
    wait_until(reports, timeout=5, message="the leak report")
    w.close()
    found = reports()
    assert len(found) == 1 and " by tasks.rebuild_index (" in found[0], found
    assert held(w.alias)["tasks.rebuild_index"].leaks == 1


# -- bounded, merged, shown -------------------------------------------------------


def test_a_process_keeps_a_bounded_number_of_holders() -> None:
    record = AliasRecord("bounded")
    for i in range(MAX_HOLDERS + 50):
        record.held_by(holders.Holder(f"module.view_{i}"), 0.001)
    record.tally()
    assert len(record.holders) == MAX_HOLDERS
    assert record.holders[OTHER].checkouts == 51  # all past the first MAX_HOLDERS - 1
    assert sum(t.checkouts for t in record.holders.values()) == MAX_HOLDERS + 50


def test_a_listing_keeps_the_top_holders_and_sums_the_rest() -> None:
    record = AliasRecord("top")
    for i in range(30):
        for _ in range(i + 1):
            record.held_by(holders.Holder(f"view_{i}"), 0.01 * (i + 1))
    listed = top_holders(record.snapshot(None, record_config()).holders, "checkouts", 5)
    assert [h.holder for h in listed] == [f"view_{i}" for i in (29, 28, 27, 26, 25)] + [OTHER]
    assert listed[-1].checkouts == sum(range(1, 26))


def test_returned_holds_are_tallied_in_batches_and_at_every_snapshot() -> None:
    record = AliasRecord("batched")
    cell = holders.Holder("(unresolved request)")
    record.held_by(cell, 0.5)
    cell.name = "shop.views.cart"  # named after the early checkout came back
    assert record.holders == {}  # a return only appends
    stats = record.snapshot(None, record_config())
    assert [(h.holder, h.checkouts, h.hold.sum) for h in stats.holders] == [
        ("shop.views.cart", 1, 0.5)
    ]
    for _ in range(TALLY_EVERY):
        record.held_by(cell, 0.001)
    assert record.holders["shop.views.cart"].checkouts == 1 + TALLY_EVERY  # no snapshot needed


def record_config() -> Any:
    from django_pooled_pg.observability.records import PoolConfig

    return PoolConfig("h:5432/db", "u", 0, 1, 1.0, 0, 1.0, 1.0, "auto", True, None)


def test_poolstats_holders_as_table_json_and_prometheus(transactional_db: None) -> None:
    for _ in range(2):
        wsgi_get("/hit/")
    connection.ensure_connection()  # outside a request: (unknown)
    connection.close()
    out = StringIO()
    call_command("poolstats", "--holders", "--local", "--database", "default", stdout=out)
    table = out.getvalue()
    assert "holder" in table and "wait caused" in table
    assert any(line.strip().startswith("demoapp.views.hit ") for line in table.splitlines())
    # It says what (unknown) is and how to name it.
    assert "(unknown): checkouts outside a request" in table, table
    assert "holders='stack' names their callers" in table

    out = StringIO()
    call_command(
        "poolstats", "--holders", "--json", "--local", "--sort", "checkouts", "--top", "3",
        stdout=out,
    )  # fmt: skip
    doc = json.loads(out.getvalue())
    rows = doc["aliases"]["default"]
    assert doc["sort"] == "checkouts" and len(rows) <= 4
    assert [r["checkouts"] for r in rows[:3]] == sorted(
        (r["checkouts"] for r in rows[:3]), reverse=True
    )
    hit = next(r for r in rows if r["holder"] == "demoapp.views.hit")
    assert set(hit) == {"holder", "checkouts", "hold", "wait_caused", "leaks"}

    out = StringIO()
    call_command("poolstats", "--format", "prometheus", "--local", "--no-server", stdout=out)
    samples = {
        (s.name, s.labels.get("holder")): s.value
        for f in text_string_to_metric_families(out.getvalue())
        for s in f.samples
        if s.labels.get("alias") == "default"
    }
    assert samples[("django_pooled_pg_holder_checkouts", "demoapp.views.hit")] >= 2
    assert ("django_pooled_pg_holder_hold_seconds", "demoapp.views.hit") in samples
    holder_series = {h for (name, h) in samples if name == "django_pooled_pg_holder_checkouts"}
    assert len(holder_series) <= 21  # HOLDER_LABELS and "(other)"


def test_poolstats_holders_bad_arguments_are_command_errors(transactional_db: None) -> None:
    with pytest.raises(CommandError, match="--sort is 'size'; it must be one of: hold, wait"):
        call_command("poolstats", "--holders", "--sort", "size", "--local")
    with pytest.raises(CommandError, match="--top is '0'; it must be an integer >= 1"):
        call_command("poolstats", "--holders", "--top", "0", "--local")
    with pytest.raises(CommandError, match="--sort and --top go with --holders"):
        call_command("poolstats", "--sort", "wait", "--local")


def test_the_holders_option_is_validated(make_wrapper: Make) -> None:
    from django.core.exceptions import ImproperlyConfigured

    w = make_wrapper(pool={"holders": "yes"})
    with pytest.raises(
        ImproperlyConfigured, match=r"\['holders'\] is 'yes'.*True, 'stack' or False"
    ):
        w.ensure_connection()
