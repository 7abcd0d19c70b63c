"""The django-debug-toolbar panel, with the real toolbar on the test project."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.test import Client

from tests.helpers import wsgi_get


@pytest.fixture
def toolbar(settings: Any, transactional_db: None) -> None:
    settings.DEBUG = True
    settings.STATIC_URL = "/static/"  # before the apps: staticfiles reads it as it loads
    settings.INSTALLED_APPS = [
        *settings.INSTALLED_APPS,
        "django.contrib.staticfiles",
        "debug_toolbar",
    ]
    settings.TEMPLATES = [
        {"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}
    ]
    settings.MIDDLEWARE = [
        "debug_toolbar.middleware.DebugToolbarMiddleware",
        "django_pooled_pg.middleware.HolderMiddleware",
    ]
    settings.ROOT_URLCONF = "tests.toolbar_urls"
    settings.DEBUG_TOOLBAR_PANELS = ["django_pooled_pg.toolbar.PoolPanel"]
    settings.DEBUG_TOOLBAR_CONFIG = {
        "SHOW_TOOLBAR_CALLBACK": lambda request: True,
        "IS_RUNNING_TESTS": False,
    }


def render_panel(request_id: str) -> str:
    response = Client().get(
        "/__debug__/render_panel/", {"request_id": request_id, "panel_id": "PoolPanel"}
    )
    assert response.status_code == 200, response.content[:500]
    return str(json.loads(response.content)["content"])


def newest_request_id() -> str:
    from debug_toolbar.store import get_store  # imports the app's models: once installed

    return str(list(get_store().request_ids())[-1])


def cells(html: str) -> list[list[str]]:
    return [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", html)]


def test_the_panel_shows_each_checkout_of_the_request_and_the_pools(toolbar: None) -> None:
    served = wsgi_get("/ping/")  # the real handler: the connection goes back at the end
    html = render_panel(newest_request_id())
    rows = [r for r in cells(html) if len(r) == 7]
    checkouts = [r for r in rows if r[0] == "default" and r[1] == "demoapp.views.ping"]
    assert len(checkouts) == 1, html
    alias, holder, waited, held, reset, fresh, backend_pid = checkouts[0]
    assert waited.endswith(("µs", "ms")) and held.endswith(("µs", "ms")), checkouts[0]
    assert reset in ("sent", "skipped"), checkouts[0]  # it came back after the response
    assert fresh in ("new", "reused")
    assert int(backend_pid) == served["backend_pid"]
    states = [r for r in rows if r[0] == "default" and r[1] in ("start", "end")]
    assert [r[1] for r in states][-1] == "end", html
    end = next(r for r in states if r[1] == "end")
    assert int(end[4]) == 1  # in use at the end: returned only after the response


def test_a_request_that_changed_nothing_shows_the_reset_skipped(toolbar: None) -> None:
    # /hit/ only reads and writes rows: with reset_session="auto" nothing is sent.
    wsgi_get("/hit/")
    html = render_panel(newest_request_id())
    (row,) = [r for r in cells(html) if len(r) == 7 and r[1] == "demoapp.views.hit"]
    assert row[4] == "skipped", row
