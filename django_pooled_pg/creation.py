"""Test databases: no pooled connection may hold the database being changed."""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql.creation import DatabaseCreation as PostgreSQLDatabaseCreation

from . import registry


class DatabaseCreation(PostgreSQLDatabaseCreation):
    def _close_pooled_connections_to(self, *dbnames: str) -> None:
        """Close every pool of this process connected to one of *dbnames*.

        Whichever alias opened them: two aliases may name one database, and
        CREATE DATABASE ... TEMPLATE, DROP DATABASE fail while any session
        is connected ("being accessed by other users").
        """
        s = self.connection.settings_dict
        host, port = s["HOST"], str(s["PORT"])
        names = set(dbnames)
        from django.db import connections

        # This thread's wrappers give their leases back first, so that the
        # pool's close() finds them idle and closes them.
        for conn in connections.all(initialized_only=True):
            cs = conn.settings_dict
            if (cs["HOST"], str(cs["PORT"]), cs["NAME"]) in {(host, port, n) for n in names}:
                conn.close()
        registry.close_matching(
            lambda p: p.database[0] == host and p.database[1] == port and p.database[2] in names
        )

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        self._close_pooled_connections_to(self._get_test_db_name())  # type: ignore[attr-defined]
        return super()._create_test_db(verbosity, autoclobber, keepdb)  # type: ignore[misc]

    def _clone_test_db(self, suffix: Any, verbosity: int, keepdb: bool = False) -> None:
        source = self.connection.settings_dict["NAME"]
        target = self.get_test_db_clone_settings(suffix)["NAME"]
        self._close_pooled_connections_to(source, target)
        super()._clone_test_db(suffix, verbosity, keepdb)  # type: ignore[misc]

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        self._close_pooled_connections_to(test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]
