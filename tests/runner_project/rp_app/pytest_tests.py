"""pytest-django's own fixtures on the pooled engine (collected by pytest only).

Run from tests/test_runners.py, which reads what they report (see probe).
"""

import json
from urllib.request import urlopen

import pytest
from django.db import connection

from .models import Note
from .probe import in_use, reopen, report, session


@pytest.mark.django_db
def test_db_fixture_uses_a_pooled_test_database():
    Note.objects.create(text="x")
    assert connection.pool is not None
    _, dbname, oid = session()
    assert dbname == connection.settings_dict["NAME"]
    report(test="pytest_db", db=dbname, oid=oid)


@pytest.mark.django_db(transaction=True)
def test_transactional_db_gets_the_same_session_back_after_close():
    assert connection.pool is not None
    _, dbname, oid = session()
    seen = reopen()
    assert seen["new_connections"] == 0  # every reopen was a checkout
    assert set(seen["paused"]) == {seen["own"]}  # the same session each time
    report(test="pytest_transactional_db", db=dbname, oid=oid, reopen=seen)


@pytest.mark.django_db(transaction=True)
def test_live_server_fixture_returns_its_connection(live_server):
    Note.objects.create(text="from pytest")
    mine, dbname, oid = session()
    with urlopen(live_server.url + "/notes/", timeout=30) as response:
        data = json.load(response)
    assert data["texts"] == ["from pytest"]
    assert data["db"] == dbname
    assert data["backend_pid"] != mine
    connection.close()
    used = in_use(connection.pool)  # the request thread gave its connection back
    assert used == 0
    report(
        test="pytest_live_server",
        db=dbname,
        oid=oid,
        test_pid=mine,
        server_pid=data["backend_pid"],
        texts=data["texts"],
        in_use=used,
    )
