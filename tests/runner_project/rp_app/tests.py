"""Django test classes, run by Django's runner and by pytest-django.

Run from tests/test_runners.py, which reads what they report (see probe).
"""

import json
from urllib.request import urlopen

from django.contrib.staticfiles.testing import StaticLiveServerTestCase
from django.db import connection, connections
from django.test import LiveServerTestCase, TestCase, TransactionTestCase

from .models import Note
from .probe import in_use, reopen, report, server_session, session


class PooledTestCase(TestCase):
    databases = {"default", "other"}

    def test_reads_and_writes_a_pooled_test_database(self):
        Note.objects.create(text="a")
        self.assertEqual(Note.objects.count(), 1)
        self.assertIsNotNone(connection.pool)
        self.assertIsNotNone(connections["other"].pool)
        _, dbname, oid = session()
        _, other_db, _ = session("other")
        self.assertEqual(dbname, connection.settings_dict["NAME"])
        self.assertEqual(other_db, connections["other"].settings_dict["NAME"])
        self.assertNotEqual(dbname, other_db)
        report(test="testcase", db=dbname, oid=oid, other_db=other_db)

    def test_mirror_alias_uses_the_default_test_database(self):
        self.assertEqual(
            connections["twin"].settings_dict["NAME"], connection.settings_dict["NAME"]
        )


class PooledTransactionTestCase(TransactionTestCase):
    databases = {"default", "twin"}

    def test_closed_connection_comes_back_from_the_pool(self):
        self.assertIsNotNone(connection.pool)
        _, dbname, oid = session()
        seen = reopen()
        self.assertEqual(seen["new_connections"], 0)  # every reopen was a checkout
        self.assertEqual(set(seen["paused"]), {seen["own"]})  # the same session each time
        report(test="transactiontestcase", db=dbname, oid=oid, reopen=seen)

    def test_committed_rows_are_seen_through_a_second_alias(self):
        Note.objects.create(text="committed")
        # "twin" mirrors default: the same test database through its own pool.
        self.assertEqual(Note.objects.using("twin").filter(text="committed").count(), 1)


class LiveServerChecks:
    """The live server's request threads check out and return their own connections."""

    server_pid = None

    def test_live_server_view_reads_committed_rows_on_its_own_session(self):
        Note.objects.create(text="live")  # committed: TransactionTestCase
        mine, dbname, oid = session()
        with urlopen(self.live_server_url + "/notes/", timeout=30) as response:
            data = json.load(response)
        self.assertEqual(data["texts"], ["live"])
        self.assertEqual(data["db"], dbname)
        self.assertTrue(data["pooled"])
        self.assertNotEqual(data["backend_pid"], mine)
        type(self).server_pid = data["backend_pid"]
        report(
            test=type(self).__name__,
            db=dbname,
            oid=oid,
            test_pid=mine,
            server_pid=data["backend_pid"],
            texts=data["texts"],
        )

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()  # stops the live server
        connection.close()  # this thread's too: nothing may stay checked out
        report(
            test=cls.__name__ + ".after_stop",
            in_use=in_use(connection.pool),
            server_pid=cls.server_pid,
            server_session=server_session(cls.server_pid) if cls.server_pid else None,
        )


class PooledLiveServerTestCase(LiveServerChecks, LiveServerTestCase):
    pass


class PooledStaticLiveServerTestCase(LiveServerChecks, StaticLiveServerTestCase):
    def test_live_server_view_reads_committed_rows_on_its_own_session(self):
        with urlopen(self.live_server_url + "/static/rp_app/hello.txt", timeout=30) as response:
            self.assertEqual(response.read().strip(), b"hello")  # the static files handler
        super().test_live_server_view_reads_committed_rows_on_its_own_session()
