"""A real PostgreSQL server (Debian's ``postgresql`` package) for tests, and Dagster instances on it.

Fixtures (import them into a test module or a conftest)::

    from promptopt_dagster_tests.support.postgres import (
        postgres_db_url, postgres_instance, postgres_server, postgres_url,
    )

- ``postgres_server`` (session): the running `PostgresServer`, started once per session. Use it to
  create more databases (`create_database`) or to restart the server (`restart`).
- ``postgres_url`` (session): ``postgresql+psycopg2://promptopt:...@127.0.0.1:PORT/promptopt``,
  an empty database shared by the whole session.
- ``postgres_db_url`` (function): a database of its own for each test, created by
  ``CREATE DATABASE ... TEMPLATE`` from a template that already holds Dagster's tables (so a
  Dagster instance on it needs no schema migration), dropped (``WITH (FORCE)``) after the test.

and the helper `postgres_instance(url, tmp_dir)`, which returns a ``dg.DagsterInstance`` whose run,
event-log and schedule storages are dagster-postgres on ``url`` (``storage: postgres:`` in a
``dagster.yaml`` written to ``tmp_dir``, which is the instance's DAGSTER_HOME: set
``DAGSTER_HOME=tmp_dir`` for a subprocess such as ``dagster dev`` or the daemon to get the same
instance). Use it as a context manager so its storages are disposed::

    def test_something(postgres_db_url, tmp_path):
        with postgres_instance(postgres_db_url, tmp_path / "dagster_home") as instance:
            dg.materialize([...], instance=instance)

How the server runs (checked with Debian 12's PostgreSQL 15):

- The binaries come from ``/usr/lib/postgresql/<version>/bin`` (the newest version there), or
  from ``$PROMPTOPT_PG_BINDIR``. ``make test`` installs Debian's ``postgresql`` when missing.
- PostgreSQL refuses to run as root: as root, ``initdb``, ``postgres`` and ``pg_ctl`` run as the
  ``postgres`` system user that the Debian package creates (the child process switches user
  itself, ``subprocess.Popen(user=...)``, so the pid we hold is the postmaster's); as any other
  user they run as that user.
- Everything lives in a fresh temporary folder (``promptopt-pg-*`` under the system temp dir):
  the data directory, the log and the unix socket directory. The server listens on 127.0.0.1 at a
  free port, never on 5432 nor in /var/run/postgresql, so a Debian cluster that may be running
  does not matter. Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
  a crash loses the data, a clean `stop`/`restart` does not.
- Password authentication (scram-sha-256) over TCP, as a real deployment would use; trust over
  the unix socket inside the temporary folder.
- Readiness is awaited with ``pg_isready`` in a bounded polling loop. `stop` runs
  ``pg_ctl stop -m fast`` and kills the postmaster by its pid if it is still alive afterwards.
  On Linux the postmaster also gets SIGQUIT (immediate shutdown) when the thread that started it
  dies, so a killed pytest leaves no server behind (its temporary folder stays, though).
- URLs name the driver, ``postgresql+psycopg2://``: SQLAlchemy 2.1 (installed here, 2.1.9) maps a
  bare ``postgresql://`` to psycopg 3, which is not installed (dagster-postgres 0.29.27 depends on
  psycopg2-binary), so Dagster fails with ``No module named 'psycopg'``. A ``dagster.yaml`` using
  ``postgres_db:`` needs ``scheme: postgresql+psycopg2`` for the same reason. `PostgresServer.dsn`
  gives the plain libpq form for psycopg2.connect or psql.
- dagster-postgres opens a new connection for every storage call (SQLAlchemy ``NullPool``); the
  server allows 300 connections.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import dagster as dg
import pytest
import yaml

HOST = "127.0.0.1"
USER = "promptopt"
PASSWORD = "promptopt-test-pw"
DATABASE = "promptopt"
# SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which dagster-postgres does not install.
SQLALCHEMY_SCHEME = "postgresql+psycopg2"
DAGSTER_TEMPLATE = "promptopt_dagster_template"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30
RUN_AS = "postgres"  # the system user Debian's package creates; used only when we are root

_SERVER_SETTINGS = {
    "listen_addresses": HOST,
    "max_connections": "300",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "logging_collector": "off",
}


def find_bindir() -> Path:
    """``$PROMPTOPT_PG_BINDIR``, else the newest ``/usr/lib/postgresql/<version>/bin`` with initdb."""
    override = os.environ.get("PROMPTOPT_PG_BINDIR")
    if override:
        return Path(override)
    candidates = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]

    def version(bindir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)

    if not candidates:
        raise FileNotFoundError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: run `make test` "
            "(it installs Debian's postgresql) or `apt-get install postgresql`, "
            "or set PROMPTOPT_PG_BINDIR"
        )
    return max(candidates, key=version)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True).prctl


# Resolved here, in the parent: the child runs `_die_with_parent` after switching to the server's
# user, who may not be able to read this interpreter's files (say, a pyenv under /root) to import.
_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """Runs in the child before exec (after it switched user): on Linux, get SIGQUIT (postgres'
    immediate shutdown) when the thread that started the server dies, so a killed pytest leaves
    no orphan server."""
    if _PRCTL is not None:
        pr_set_pdeathsig = 1
        _PRCTL(pr_set_pdeathsig, signal.SIGQUIT)


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables (PGHOST, PGDATA, ... would redirect the tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer:
    """One PostgreSQL server in a temporary folder, on 127.0.0.1 at a free port."""

    def __init__(self, bindir: str | os.PathLike[str] | None = None) -> None:
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.port: int | None = None
        self.root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._names = itertools.count(1)
        self._template_ready = False
        self._run_as: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._run_as = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise RuntimeError(
                    f"running as root, and there is no {RUN_AS!r} user to run PostgreSQL as "
                    "(Debian's postgresql package creates it)"
                ) from None

    # --- paths and commands ----------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self._root() / "data"

    @property
    def socket_dir(self) -> Path:
        return self._root() / "sock"

    @property
    def log_path(self) -> Path:
        return self._root() / "postgres.log"

    def _root(self) -> Path:
        if self.root is None:
            raise RuntimeError("the server was never started; call start() first")
        return self.root

    def _as_server_user(self) -> dict[str, Any]:
        """Popen keyword arguments that run the child as the server's user."""
        kwargs: dict[str, Any] = {"env": _clean_env(), "cwd": str(self._root())}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.pw_uid, group=self._run_as.pw_gid, extra_groups=[])
            kwargs["env"]["HOME"] = self._run_as.pw_dir
            kwargs["env"]["USER"] = kwargs["env"]["LOGNAME"] = self._run_as.pw_name
        return kwargs

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            **self._as_server_user(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stderr or result.stdout}")
        return result

    # --- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the server is not running; call start() first")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> PostgresServer:
        """initdb (first time only), then start the postmaster and wait until it accepts
        connections. A later start (see `restart`) keeps the data and the port."""
        if self.running:
            return self
        if self.root is None:
            self._initdb()
        attempts = 1 if self.port is not None else 3  # a fresh free port may be taken meanwhile
        for attempt in range(attempts):
            if self.port is None or attempt:
                self.port = _free_port()
            try:
                self._launch()
                return self
            except _PortTaken:
                continue
        raise RuntimeError(f"PostgreSQL could not bind a free port in {attempts} attempts")

    def _initdb(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="promptopt-pg-"))
        self.socket_dir.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self._run_as is not None:
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, self._run_as.pw_uid, self._run_as.pw_gid)
        try:
            self._run(
                "initdb",
                "--pgdata",
                str(self.data_dir),
                "--username",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            )
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None
            raise
        finally:
            pwfile.unlink(missing_ok=True)

    def _launch(self) -> None:
        settings = {
            **_SERVER_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        log_start = self.log_path.stat().st_size
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            process_group=0,  # a Ctrl-C in the terminal reaches pytest, whose teardown stops us
            preexec_fn=_die_with_parent,  # only a prctl call: safe between fork and exec
            **self._as_server_user(),
        )
        try:
            self._wait_ready()
        except BaseException:
            log = self.log_text()[log_start:]
            self._kill()
            if "could not bind" in log or "Address already in use" in log:
                raise _PortTaken() from None
            raise

    def _wait_ready(self) -> None:
        """Poll with pg_isready (TCP, as a client would connect) until the server accepts
        connections; fail fast if the postmaster exits."""
        deadline = time.monotonic() + START_TIMEOUT_S
        cmd = [str(self.bindir / "pg_isready"), "-h", HOST, "-p", str(self.port), "-d", "postgres"]
        cmd += ["-U", USER, "-t", "2"]
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with code {self._proc.returncode} on port {self.port}; "
                    f"log: {self.log_text()[-3000:]}"
                )
            if subprocess.run(cmd, capture_output=True, env=_clean_env()).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"postgres did not accept connections on {HOST}:{self.port} within "
                    f"{START_TIMEOUT_S:.0f} s; log: {self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; then, if the postmaster is still alive, kill it by its pid."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run(
                    "pg_ctl",
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(STOP_TIMEOUT_S),
                    timeout=STOP_TIMEOUT_S + 10,
                )
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self) -> PostgresServer:
        """Stop and start again on the same port; the data stays. Open connections break."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove its temporary folder."""
        self.stop()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, RuntimeError):
            return ""

    def __enter__(self) -> PostgresServer:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: remove the temporary folder here
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- databases -------------------------------------------------------------------------------

    def url(self, database: str = DATABASE) -> str:
        """SQLAlchemy/Dagster URL: ``postgresql+psycopg2://...`` (see the module docstring)."""
        return f"{SQLALCHEMY_SCHEME}://{self._userinfo_host()}/{database}"

    def dsn(self, database: str = DATABASE) -> str:
        """libpq URL (``postgresql://...``) for psycopg2.connect, psql, pg_dump."""
        return f"postgresql://{self._userinfo_host()}/{database}"

    def _userinfo_host(self) -> str:
        if self.port is None:
            raise RuntimeError("the server was never started; call start() first")
        return f"{USER}:{PASSWORD}@{HOST}:{self.port}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode (CREATE/DROP DATABASE need it); return its rows."""
        import psycopg2

        conn = psycopg2.connect(self.dsn(database))
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall()) if cur.description is not None else []
        finally:
            conn.close()

    def create_database(self, name: str | None = None, template: str | None = None) -> str:
        """CREATE DATABASE (a fresh name unless given), optionally copying ``template``; return
        its URL."""
        name = name or f"test_{os.getpid()}_{next(self._names)}"
        _check_identifier(name)
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            _check_identifier(template)
            sql += f' TEMPLATE "{template}"'
        self.execute(sql)
        return self.url(name)

    def ensure_database(self, name: str) -> str:
        """CREATE DATABASE unless it exists; return its URL."""
        _check_identifier(name)
        if not self.execute(f"SELECT 1 FROM pg_database WHERE datname = '{name}'"):
            self.create_database(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, disconnecting whoever is still connected (a daemon, a leaked engine)."""
        _check_identifier(name)
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def dagster_template(self) -> str:
        """The name of a database holding Dagster's (empty) tables, built once: clone it with
        ``create_database(template=...)`` to get a Dagster-ready database without migrations.
        Connections to the template are not allowed (a connected template cannot be copied)."""
        if not self._template_ready:
            self.drop_database(DAGSTER_TEMPLATE)
            url = self.create_database(DAGSTER_TEMPLATE)
            with (
                tempfile.TemporaryDirectory(prefix="promptopt-dagster-home-") as home,
                postgres_instance(url, home),
            ):
                pass  # creating the storages creates and stamps the tables
            self.execute(f'ALTER DATABASE "{DAGSTER_TEMPLATE}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
            self._template_ready = True
        return DAGSTER_TEMPLATE


class _PortTaken(Exception):
    pass


def _check_identifier(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")


def database_name(url: str) -> str:
    """The database part of a ``postgresql://...`` URL."""
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def postgres_instance(
    url: str, tmp_dir: str | os.PathLike[str], extra_config: Mapping[str, Any] | None = None
) -> dg.DagsterInstance:
    """A persistent Dagster instance whose run, event-log and schedule storages are dagster-postgres
    on ``url``. ``tmp_dir`` (created if missing) is its DAGSTER_HOME: the ``dagster.yaml`` goes
    there, and so do local artifacts and compute logs. ``extra_config`` adds top-level
    ``dagster.yaml`` keys (``run_coordinator``, ``concurrency``, ...). Dispose it (``with``) when done;
    a second instance on the same URL sees the same data."""
    home = Path(tmp_dir)
    home.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"storage": {"postgres": {"postgres_url": url}}}
    config.update(extra_config or {})
    config.setdefault("telemetry", {"enabled": False})
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dg.DagsterInstance.from_config(str(home))


# --- pytest fixtures -------------------------------------------------------------------------------


# One server per pytest process, however many modules import the fixtures: a session fixture
# imported into two test modules is two fixture definitions, each run once per session.
_shared: PostgresServer | None = None
_users = 0


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (stopped and removed at its end)."""
    global _shared, _users
    if _shared is None:
        _shared = PostgresServer().__enter__()
    _users += 1
    try:
        yield _shared
    finally:
        _users -= 1
        if _users == 0 and _shared is not None:
            _shared.close()
            _shared = None


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of an empty database shared by the whole session."""
    return postgres_server.ensure_database(DATABASE)


@pytest.fixture
def postgres_db_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a database of this test's own, with Dagster's tables already there; dropped after."""
    url = postgres_server.create_database(template=postgres_server.dagster_template())
    yield url
    postgres_server.drop_database(database_name(url))


__all__: Sequence[str] = (
    "PostgresServer",
    "database_name",
    "find_bindir",
    "postgres_db_url",
    "postgres_instance",
    "postgres_server",
    "postgres_url",
)
