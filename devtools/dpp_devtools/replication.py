"""A throwaway primary and its streaming-replication standby, for failover tests.

``start_pair(dbname, synchronous=...)`` starts a primary (a ``ThrowawayServer``
with a database *dbname*), copies it with ``pg_basebackup -R`` (the copy
knows how to reach the primary: ``primary_conninfo`` and ``standby.signal``),
starts the copy as a hot standby on a port of its own and waits until it
streams (and, when synchronous, until the primary counts it as its
synchronous standby). Both run as the unprivileged server user, with the
same password authentication (scram-sha-256 over TCP) as every throwaway
server; initdb's pg_hba already admits replication connections from the
loopback address.

``promote()`` ends the standby's recovery (``pg_promote``, which returns once
the server accepts writes); ``stop()``/``start()`` on either server as on any
throwaway server.

Synchronous replication: the primary gets, through ``ALTER SYSTEM`` (``postgresql.auto.conf``) before the copy,
``synchronous_standby_names='*'``, loaded once the standby streams (until
then every commit would wait). pg_basebackup copies that file, so the
standby inherits the setting and, once promoted, would wait forever on every
commit for a standby it does not have: the standby's command line clears it
(``-c`` wins over the files).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from .throwaway import NoPostgreSQL, ThrowawayServer, find_bindir

#: Server settings of a primary that replicates (the throwaway server's own
#: fsync=off stays: no test crashes the operating system).
PRIMARY_SETTINGS = {
    "wal_level": "replica",
    "max_wal_senders": "5",
    "full_page_writes": "on",
    "wal_keep_size": "256MB",
    # A commit is acknowledged once written locally (the throwaway server's
    # default, off, would add up to wal_writer_delay to the loss window).
    "synchronous_commit": "on",
}


def server_tool(bindir: Path, name: str) -> Path:
    """*name* (pg_basebackup, ...) beside the server binaries.

    ``initdb`` on PATH may be a link into the real directory (Debian's
    /usr/lib/postgresql/N/bin), which holds the client tools.
    """
    for directory in (bindir, Path(os.path.realpath(bindir / "initdb")).parent):
        if (directory / name).is_file():
            return directory / name
    raise NoPostgreSQL(f"{name} was not found beside the PostgreSQL server binaries in {bindir}.")


@dataclass
class StandbyServer(ThrowawayServer):
    """A hot standby made from *primary* by ``pg_basebackup -R``."""

    primary: ThrowawayServer | None = None

    def init(self) -> None:
        assert self.primary is not None
        self.password = self.primary.password  # the same cluster, the same roles
        self._prepare().unlink()  # no password file: pg_basebackup reads PGPASSWORD
        cmd = [
            str(server_tool(self.bindir, "pg_basebackup")),
            "-D",
            str(self.datadir),
            "-h",
            self.primary.host,
            "-p",
            str(self.primary.port),
            "-U",
            self.primary.user,
            "-R",  # standby.signal and primary_conninfo (with the password)
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-sync",
        ]
        result = subprocess.run(
            self._as_server_user(cmd),
            capture_output=True,
            text=True,
            cwd=self._tmp,
            env={**os.environ, "PGPASSWORD": self.primary.password, "PGAPPNAME": "standby"},
        )
        if result.returncode:
            raise NoPostgreSQL(f"pg_basebackup failed:\n{result.stdout}\n{result.stderr}")


@dataclass
class ReplicatedPair:
    """A primary and its standby; each a throwaway server to stop and start."""

    primary: ThrowawayServer
    standby: StandbyServer
    synchronous: bool
    dbname: str
    #: Set by promote(): the monotonic time the standby accepted writes.
    promoted_at: float | None = field(default=None)

    def connect(self, server: ThrowawayServer, dbname: str | None = None) -> Any:
        return psycopg.connect(
            **server.conninfo(dbname or self.dbname), autocommit=True, connect_timeout=5
        )

    def wait_streaming(self, timeout: float = 60) -> None:
        """Return once the primary streams to the standby (as its synchronous one, if so)."""
        end = time.monotonic() + timeout
        query = "SELECT state, sync_state FROM pg_stat_replication"
        with self.connect(self.primary, "postgres") as conn:
            while time.monotonic() < end:
                rows = conn.execute(query).fetchall()
                want = "sync" if self.synchronous else "async"
                if any(state == "streaming" and sync == want for state, sync in rows):
                    return
                time.sleep(0.05)
        raise AssertionError(f"the standby did not start streaming within {timeout} s: {rows}")

    def promote(self) -> float:
        """Make the standby a primary; returns when it accepts writes (monotonic time)."""
        with self.connect(self.standby, "postgres") as conn:
            row = conn.execute("SELECT pg_promote(wait => true, wait_seconds => 60)").fetchone()
            if not row or not row[0]:
                raise AssertionError("the standby was not promoted within 60 s")
            while conn.execute("SELECT pg_is_in_recovery()").fetchone() != (False,):
                time.sleep(0.01)
        self.promoted_at = time.monotonic()
        return self.promoted_at

    def replay_lag_bytes(self) -> int | None:
        """How far the standby's replay is behind the primary's WAL (bytes), per the primary."""
        with self.connect(self.primary, "postgres") as conn:
            row = conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint "
                "FROM pg_stat_replication"
            ).fetchone()
        return None if row is None else int(row[0])

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Return once the standby has replayed everything the primary wrote so far."""
        with self.connect(self.primary, "postgres") as conn:
            target = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        end = time.monotonic() + timeout
        with self.connect(self.standby, "postgres") as conn:
            while time.monotonic() < end:
                row = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s) >= 0", [target]
                ).fetchone()
                if row and row[0]:
                    return
                time.sleep(0.02)
        raise AssertionError(f"the standby did not replay up to {target} within {timeout} s")

    def destroy(self) -> None:
        try:
            self.standby.destroy()
        finally:
            self.primary.destroy()


def start_pair(dbname: str, *, synchronous: bool = False) -> ReplicatedPair:
    """A primary with a database *dbname* and a streaming standby; call destroy() after."""
    bindir = find_bindir()
    settings = dict(PRIMARY_SETTINGS)
    primary = ThrowawayServer(bindir=bindir, settings=settings)
    primary.init()
    standby: StandbyServer | None = None
    try:
        primary.start()
        primary.createdb(dbname)
        if synchronous:  # written now, copied by pg_basebackup, loaded below
            with psycopg.connect(**primary.conninfo("postgres"), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
        standby = StandbyServer(
            bindir=bindir,
            primary=primary,
            # Its own, whatever the copied files say (see the module doc).
            settings={"synchronous_standby_names": "", "hot_standby": "on"},
        )
        standby.init()
        standby.start()
        pair = ReplicatedPair(primary, standby, synchronous, dbname)
        if synchronous:
            with pair.connect(primary, "postgres") as conn:
                conn.execute("SELECT pg_reload_conf()")
        pair.wait_streaming()
    except BaseException:
        if standby is not None:
            standby.destroy()
        primary.destroy()
        raise
    return pair
