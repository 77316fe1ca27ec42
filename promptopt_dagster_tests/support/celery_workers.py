"""`dagster-celery worker` processes for tests: each started with the shipped worker config
(deploy/celery/worker.yaml, broker and backend from the environment), awaited until Celery logs
that it is ready, stopped by its pid.

Each worker is a `ServerProcess` (support/server_process.py) whose session leader is the
``dagster-celery worker start`` command; it runs ``celery worker`` as a child, and Celery's pool
forks the processes that execute the steps: all of them share the leader's process group, so
``os.getpgid(pid)`` of a step's process names the worker that ran it, and `stop` ends them all.
The worker command needs DAGSTER_HOME in `env` (it writes its Celery config module, broker URL
included, under it) and ``celery`` on PATH (the venv's bin folder, put first here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from promptopt_dagster_tests.support.server_process import ServerProcess, Startable

REPO = Path(__file__).resolve().parents[2]
WORKER_CONFIG = REPO / "deploy" / "celery" / "worker.yaml"
START_TIMEOUT_S = 120.0  # a worker imports dagster and celery; slow on a loaded machine
STOP_TIMEOUT_S = 20.0


class CeleryWorkers(Startable):
    """`count` workers named ``<prefix>-<i>``, each running one step at a time (concurrency 1)."""

    def __init__(self, count: int, env: Mapping[str, str], prefix: str = "promptopt-test",
                 cwd: str | os.PathLike[str] | None = None, config: Path = WORKER_CONFIG) -> None:
        bindir = str(Path(sys.executable).parent)
        # This checkout first on PYTHONPATH: the workers import the code the test runs.
        pythonpath = [str(REPO), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        self.env = {
            **env,
            "PATH": os.pathsep.join([bindir, env.get("PATH", os.defpath)]),
            "PYTHONPATH": os.pathsep.join(pythonpath),
        }
        self.names = [f"{prefix}-{i}" for i in range(count)]
        self.cwd = cwd
        self.config = config
        self._bindir = bindir
        self._servers = [ServerProcess(f"celery worker {name}") for name in self.names]

    @property
    def pids(self) -> dict[int, str]:
        """Each running worker's pid (its process group) and name."""
        return {server.pid: name for server, name in zip(self._servers, self.names, strict=True)
                if server.running}

    def start(self) -> CeleryWorkers:
        try:
            for server, name in zip(self._servers, self.names, strict=True):
                cmd = [
                    str(Path(self._bindir) / "dagster-celery"), "worker", "start",
                    "-A", "dagster_celery.app",
                    "-y", str(self.config),
                    "-n", name,
                    "--", "--concurrency=1", "--without-gossip", "--without-mingle",
                ]
                # spawned together, awaited below: each start costs seconds of imports
                server.start(cmd, ready=lambda: True, timeout=START_TIMEOUT_S, env=self.env, cwd=self.cwd)
            for server, name in zip(self._servers, self.names, strict=True):
                server.wait_ready(self._ready(server, name), timeout=START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ready(server: ServerProcess, name: str) -> Callable[[], bool]:
        """Celery logs "<name>@<host> ready." once it consumes from the broker."""
        return lambda: f"{name}@" in server.log_since_start() and " ready." in server.log_since_start()

    def logs(self) -> dict[str, str]:
        return {name: server.log_text() for server, name in zip(self._servers, self.names, strict=True)}

    def stop(self) -> None:
        for server in self._servers:
            server.stop(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        for server in self._servers:
            server.close()
