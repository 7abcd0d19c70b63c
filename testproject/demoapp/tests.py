"""The test project's own tests, run by Django's runner in tests/test_creation.py."""

from django.db import connection
from django.test import TestCase, TransactionTestCase

from .models import Counter


class CounterTests(TestCase):
    def test_rows_are_written_and_read(self) -> None:
        Counter.objects.create(name="a", hits=2)
        self.assertEqual(Counter.objects.get(name="a").hits, 2)

    def test_runs_on_a_pooled_test_database(self) -> None:
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))
        self.assertIsNotNone(connection.pool)


class CounterTransactionTests(TransactionTestCase):
    def test_committed_rows_are_visible_after_a_return(self) -> None:
        Counter.objects.create(name="b")
        connection.close()  # back to the pool
        self.assertEqual(Counter.objects.filter(name="b").count(), 1)

    def test_pool_hands_out_a_connection_to_the_test_database(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            self.assertEqual(cursor.fetchone()[0], connection.settings_dict["NAME"])
