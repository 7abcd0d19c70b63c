"""Run by Django's runner and by pytest-django (tests/test_runners.py).

Each test reports what it saw to ``$RP_OUT`` (one JSON line per test), so
the outer test can check the runner really used pooled test databases.
"""

import json
import os
from urllib.request import urlopen

from django.contrib.staticfiles.testing import StaticLiveServerTestCase
from django.db import connection, connections
from django.test import LiveServerTestCase, TestCase, TransactionTestCase

from .models import Note


def backend_pid(alias="default"):
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid(), current_database()")
        return cursor.fetchone()


def report(**fields):
    if path := os.environ.get("RP_OUT"):
        with open(path, "a") as out:
            worker = os.environ.get("PYTEST_XDIST_WORKER")
            out.write(json.dumps({"pid": os.getpid(), "worker": worker, **fields}) + "\n")


class PooledTestCase(TestCase):
    databases = {"default", "other"}

    def test_reads_and_writes_a_pooled_test_database(self):
        Note.objects.create(text="a")
        self.assertEqual(Note.objects.count(), 1)
        self.assertIsNotNone(connection.pool)
        pid, dbname = backend_pid()
        other_pid, other_db = backend_pid("other")
        self.assertNotEqual(dbname, other_db)
        self.assertTrue(dbname.startswith("test_"))
        report(test="testcase", db=dbname, other_db=other_db, settings_name=connection.settings_dict["NAME"])

    def test_mirror_alias_reads_the_default_test_database(self):
        self.assertEqual(connections["twin"].settings_dict["NAME"], connection.settings_dict["NAME"])


class PooledTransactionTestCase(TransactionTestCase):
    databases = {"default", "twin"}

    def test_connection_is_reused_after_close(self):
        first, dbname = backend_pid()
        opened = connection.pool.get_stats().get("connections_num", 0)
        for _ in range(5):
            connection.close()  # back to the pool
            backend_pid()
        # Checked out again from the pool: no new session was opened.
        self.assertEqual(connection.pool.get_stats().get("connections_num", 0), opened)
        report(test="transactiontestcase", db=dbname)

    def test_committed_rows_are_seen_through_a_second_alias(self):
        Note.objects.create(text="committed")
        # "twin" mirrors default: the same test database through its own pool.
        self.assertEqual(Note.objects.using("twin").filter(text="committed").count(), 1)


class LiveServerMixin:
    def test_live_server_thread_checks_out_and_sees_committed_rows(self):
        Note.objects.create(text="live")
        mine, dbname = backend_pid()
        with urlopen(self.live_server_url + "/notes/", timeout=30) as response:
            data = json.load(response)
        self.assertEqual(data["texts"], ["live"])
        self.assertTrue(data["pooled"])
        self.assertNotEqual(data["backend_pid"], mine)  # its own connection
        report(test=type(self).__name__, db=dbname, server_backend_pid=data["backend_pid"])

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()  # stops the live server thread
        pool = connection.pool
        held = [c for c in pool._leased if c is not connection.connection]
        report(test=cls.__name__ + ".after_stop", leased_by_others=len(held))
        assert not held, "the live server thread kept its connection"


class PooledLiveServerTestCase(LiveServerMixin, LiveServerTestCase):
    pass


class PooledStaticLiveServerTestCase(LiveServerMixin, StaticLiveServerTestCase):
    pass
