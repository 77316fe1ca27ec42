"""A real `mlflow server` process for tests, on 127.0.0.1, started in its own session.

Usage::

    with MlflowServer(f"sqlite:///{tmp}/mlflow.db", f"{tmp}/artifacts") as server:
        tracker = MlflowTracker(server.url)
        ...
        server.stop()   # an outage
        server.start()  # back on the same port, same store

Measured on 2 cores (mlflow 3.17): ~7 s from spawn to a 200 on /health with one uvicorn worker
(the default is 4), ~3 s to stop. The server also starts a job runner (huey consumers: seven
more processes) unless ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``; tests need none of it, so it
is switched off. The whole process group is signalled on stop, so no worker is left behind.
"""

from __future__ import annotations

import os
import time

from promptopt_dagster_tests.support.server_process import (
    HOST,
    ServerHandle,
    ServerProcess,
    free_port,
    http_ready,
    wait_port_free,
)

START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


class MlflowServer(ServerHandle):
    """One `mlflow server` with proxied artifacts (``--serve-artifacts``)."""

    _server: ServerProcess
    stop_timeout = STOP_TIMEOUT_S

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str | os.PathLike[str],
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = str(artifacts_destination)
        self.port = port or free_port()
        self.workers = workers
        self.url = f"http://{HOST}:{self.port}"
        self._server = ServerProcess("mlflow server")
        self.startup_seconds: float | None = None

    def start(self) -> MlflowServer:
        """Start it and wait until /health answers 200."""
        if self.running:
            return self
        cmd = [
            self._venv_script("mlflow", "pip install mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            self.artifacts_destination,
            "--workers",
            str(self.workers),
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            env.pop(key, None)
        started = time.monotonic()
        self._server.start(cmd, ready=http_ready(f"{self.url}/health"), timeout=START_TIMEOUT_S, env=env)
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after a timeout, and wait until the port
        is free again (workers may outlive the leader by a moment)."""
        code = super().stop()
        if code is not None:
            wait_port_free(self.port, timeout=STOP_TIMEOUT_S)
        return code
