"""A real PostgreSQL server (Debian's ``postgresql`` package) for tests, and Dagster instances on it.

`PostgresServer` runs the server from a fresh temporary folder on 127.0.0.1 at a free port, with
password authentication over TCP. Its pytest fixtures are in support/postgres_fixtures.py.
`postgres_instance(url, tmp_dir)` returns a ``dg.DagsterInstance`` whose run, event-log and schedule
storages are dagster-postgres on ``url``, pooled as the CLI configures; ``tmp_dir`` is its
DAGSTER_HOME (set ``DAGSTER_HOME=tmp_dir`` for a subprocess such as ``dagster dev`` or the daemon
to get the same instance). Use it as a context manager so its storages are disposed.

Details: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import yaml
from dagster_postgres import DagsterPostgresStorage

from promptopt_dagster.instance_config import postgres_storage
from promptopt_dagster_tests.support.server_process import (
    HOST,
    ServerHandle,
    ServerProcess,
    ServerStartError,
    free_port,
)

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


def _clean_env() -> dict[str, str]:
    """Our environment without PG* variables (PGHOST, PGDATA, ... would redirect the tools)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class PostgresServer(ServerHandle):
    """One PostgreSQL server in a temporary folder, on 127.0.0.1 at a free port. `restart()` keeps
    the data and the port; open connections break."""

    stop_signal = signal.SIGINT  # PostgreSQL's fast shutdown
    stop_timeout = STOP_TIMEOUT_S

    def __init__(self, bindir: str | os.PathLike[str] | None = None) -> None:
        self.bindir = Path(bindir) if bindir is not None else find_bindir()
        self.port: int | None = None
        self.root: Path | None = None
        self._server: ServerProcess | None = None
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
                self.port = free_port()
            try:
                self._launch()
                return self
            except ServerStartError as exc:
                if "could not bind" not in exc.log and "Address already in use" not in exc.log:
                    raise
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
        if self._server is None:
            self._server = ServerProcess("postgres", log_path=self.log_path)
        self._server.start(
            cmd,
            ready=self._accepts_connections,
            timeout=START_TIMEOUT_S,
            death_signal=signal.SIGQUIT,
            **self._as_server_user(),
        )

    def _accepts_connections(self) -> bool:
        """pg_isready over TCP, as a client would connect."""
        cmd = [str(self.bindir / "pg_isready"), "-h", HOST, "-p", str(self.port), "-d", "postgres"]
        cmd += ["-U", USER, "-t", "2"]
        return subprocess.run(cmd, capture_output=True, env=_clean_env()).returncode == 0

    def close(self) -> None:
        """Stop the server and remove its temporary folder."""
        super().close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

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
            # Creating the storages creates and stamps the tables. dagster-postgres' own class,
            # not the pooled one: it keeps no connection open to the template.
            DagsterPostgresStorage(self.create_database(DAGSTER_TEMPLATE))
            self.execute(f'ALTER DATABASE "{DAGSTER_TEMPLATE}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
            self._template_ready = True
        return DAGSTER_TEMPLATE


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
    on ``url``, pooled as in the CLI's instance file (promptopt_dagster/pg_storage.py). ``tmp_dir``
    (created if missing) is its DAGSTER_HOME: the ``dagster.yaml`` goes there, and so do local
    artifacts and compute logs. ``extra_config`` adds top-level ``dagster.yaml`` keys
    (``run_coordinator``, ``concurrency``, ...). Dispose it (``with``) when done; a second instance
    on the same URL sees the same data."""
    home = Path(tmp_dir)
    home.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"storage": postgres_storage(url)}
    config.update(extra_config or {})
    config.setdefault("telemetry", {"enabled": False})
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dg.DagsterInstance.from_config(str(home))


__all__: Sequence[str] = ("PostgresServer", "database_name", "find_bindir", "postgres_instance")
