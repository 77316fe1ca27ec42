"""A real Redis server (Debian's ``redis-server``) for tests: the Celery broker and result backend.

It listens on 127.0.0.1 at a free port, keeps nothing on disk (no RDB snapshot, no AOF; its
working folder is a fresh temporary one), and is a `ServerProcess` (support/server_process.py):
started in its own session, awaited until it answers PING, stopped by its pid (SIGTERM, which
Redis handles as a clean shutdown). ``make redis`` installs the package when it is missing.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from pathlib import Path

from promptopt_dagster_tests.support.server_process import HOST, ServerHandle, ServerProcess, free_port

START_TIMEOUT_S = 20.0


def find_redis_server() -> str:
    """The ``redis-server`` binary on PATH, or Debian's under /usr/bin."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if not found:
        raise FileNotFoundError(
            "redis-server not found: run `make redis` (installs Debian's redis-server) "
            "or `apt-get install redis-server`"
        )
    return found


def answers_ping(port: int, host: str = HOST) -> bool:
    """Whether a Redis server on host:port answers an inline PING: +PONG, or -NOAUTH when it
    wants a password first (it is up either way)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer(ServerHandle):
    """One ``redis-server`` process on 127.0.0.1 at a free port, with nothing persisted; with
    `password`, clients must authenticate (``requirepass``) and `url` carries it."""

    _server: ServerProcess

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self._dir = Path(tempfile.mkdtemp(prefix="promptopt-redis-"))
        self._server = ServerProcess("redis-server", log_path=self._dir / "redis.log")

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/{db}"

    def start(self) -> RedisServer:
        cmd = [
            find_redis_server(),
            "--bind",
            HOST,
            "--port",
            str(self.port),
            "--dir",
            str(self._dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            *(["--requirepass", self.password] if self.password else []),
        ]
        self._server.start(cmd, ready=lambda: answers_ping(self.port), timeout=START_TIMEOUT_S)
        return self

    def close(self) -> None:
        """Stop it and remove its temporary folder."""
        super().close()
        shutil.rmtree(self._dir, ignore_errors=True)
