"""A throwaway PgBouncer in front of a PostgreSQL server, for tests and benchmarks.

``ThrowawayPgBouncer(server_conninfo, mode="transaction")`` writes a
configuration in a temporary directory, starts Debian's ``pgbouncer`` on a
free loopback port (as the unprivileged server user when run as root:
PgBouncer refuses to run as root), and stops it. Clients authenticate with
scram-sha-256, as they would against PostgreSQL; PgBouncer logs in to the
server with the same user and password (its auth file holds the password,
so it can answer the server's SCRAM challenge).

Everything else is PgBouncer's default configuration, as a user would meet
it (no ``ignore_startup_parameters``, ``server_reset_query = DISCARD ALL``):
extra settings are passed as keywords (``default_pool_size=4``). The admin
console (database ``pgbouncer``) is open to the same user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import IO, Any

from mirakuru.exceptions import ProcessFinishedWithError

from .servers import free_port
from .throwaway import LoginExecutor, as_user, conninfo

HOW_TO_GET_PGBOUNCER = (
    "No pgbouncer binary was found (looked on PATH and in /usr/sbin). "
    "Install it: Debian/Ubuntu 'apt-get install pgbouncer', macOS 'brew install pgbouncer'."
)


class NoPgBouncer(RuntimeError):
    """PgBouncer is not installed."""


def find_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise NoPgBouncer(HOW_TO_GET_PGBOUNCER)
    return found


def _quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


class ThrowawayPgBouncer:
    """One PgBouncer process in front of one server, in a temporary directory."""

    def __init__(self, server: dict[str, str], mode: str = "transaction", **settings: Any) -> None:
        if mode not in ("session", "transaction", "statement"):
            raise ValueError(f"pool mode {mode!r}: one of session, transaction, statement")
        self.server = dict(server)  # host, port, user, password (dbname ignored)
        self.mode = mode
        self.settings = settings
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = server["user"]
        self.password = server["password"]
        self.binary = find_pgbouncer()
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            self._run_as = pwd.getpwnam(os.environ.get("PGSERVER_USER", "postgres"))
        self._tmp = Path(tempfile.mkdtemp(prefix="django-pooled-pg-pgbouncer-"))
        self._executor: LoginExecutor | None = None
        self._log: IO[bytes] | None = None
        self._write_config()

    @property
    def logfile(self) -> Path:
        return self._tmp / "pgbouncer.log"

    def _write_config(self) -> None:
        auth = self._tmp / "userlist.txt"
        auth.write_text(f"{_quote(self.user)} {_quote(self.password)}\n")
        options = {
            "listen_addr": self.host,
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": auth,
            "pool_mode": self.mode,
            "admin_users": self.user,
            "stats_users": self.user,
            "pidfile": self._tmp / "pgbouncer.pid",
            **self.settings,
        }
        lines = [
            "[databases]",
            f"* = host={self.server['host']} port={self.server['port']}",
            "",
            "[pgbouncer]",
            *(f"{k} = {v}" for k, v in options.items()),
        ]
        config = self._tmp / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        if self._run_as is not None:
            for p in (self._tmp, auth, config):
                os.chown(p, self._run_as.pw_uid, self._run_as.pw_gid)
            os.chmod(self._tmp, 0o700)
        os.chmod(auth, 0o600)

    def _argv(self) -> list[str]:
        return as_user(self._run_as, [self.binary, str(self._tmp / "pgbouncer.ini")])

    def conninfo(self, dbname: str) -> dict[str, str]:
        """libpq settings of a client of this PgBouncer."""
        return conninfo(self, dbname)

    def start(self) -> None:
        if self._log is None or self._log.closed:
            self._log = open(self.logfile, "ab")  # noqa: SIM115 - lives as long as the process
        self._executor = LoginExecutor(
            self._argv(),
            self.conninfo("postgres"),
            timeout=30,
            sleep=0.02,
            stop_signal=signal.SIGINT,  # "safe shutdown"; SIGTERM closes at once
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._executor.start()

    def stop(self, immediate: bool = False) -> None:
        """Stop PgBouncer: at once (SIGTERM, clients cut off) or safely (SIGINT)."""
        if self._executor is not None and self._executor.running():
            sig = signal.SIGTERM if immediate else signal.SIGINT
            # PgBouncer exits 1 on SIGTERM ("got SIGTERM, fast exit").
            with contextlib.suppress(ProcessFinishedWithError):
                self._executor.stop(stop_signal=sig)

    def restart(self, immediate: bool = True) -> None:
        self.stop(immediate)
        self.start()

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run a command on the admin console (``SHOW POOLS``, ``PAUSE``, ...): rows by column."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(
            **self.conninfo("pgbouncer"), autocommit=True, row_factory=dict_row
        ) as conn:
            cursor = conn.execute(command)
            return cursor.fetchall() if cursor.description else []

    def server_connections(self, dbname: str) -> int:
        """Server connections PgBouncer holds for *dbname* (SHOW POOLS, every state)."""
        states = ("sv_active", "sv_idle", "sv_used", "sv_tested", "sv_login")
        return sum(
            sum(int(row[s]) for s in states)
            for row in self.admin("SHOW POOLS")
            if row["database"] == dbname
        )

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def destroy(self) -> None:
        try:
            self.stop(immediate=True)
        finally:
            if self._log is not None:
                self._log.close()
            shutil.rmtree(self._tmp, ignore_errors=True)
