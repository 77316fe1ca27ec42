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

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the starting thread dies, so a killed pytest
    leaves no orphan server. Only the session leader gets it; it then stops its workers."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _mlflow_executable() -> str:
    candidate = Path(sys.executable).parent / "mlflow"
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"the mlflow console script is not next to {sys.executable}; pip install mlflow")


class MlflowServer:
    """One `mlflow server` with proxied artifacts (``--serve-artifacts``)."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_destination: str | os.PathLike[str],
        port: int | None = None,
        workers: int = 1,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = str(artifacts_destination)
        self.port = port or _free_port()
        self.workers = workers
        self.url = f"http://{HOST}:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("the MLflow server is not running; call start() first")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        if self.running:
            return self
        cmd = [
            _mlflow_executable(),
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
        self._proc = subprocess.Popen(
            cmd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # only a prctl call: safe between fork and exec
        )
        self._wait_ready()
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with code {self._proc.returncode} on port {self.port}; "
                    f"log: {self.log_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"mlflow server did not answer on {self.url}/health within {START_TIMEOUT_S:.0f} s"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group (it is the session leader), SIGKILL after a
        timeout, and wait until the port is free again."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        # Workers may outlive the leader by a moment; make sure none keeps the port.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._wait_port_free()

    def _wait_port_free(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                if sock.connect_ex((HOST, self.port)) != 0:
                    return
            time.sleep(0.05)
        raise TimeoutError(
            f"port {self.port} is still in use {STOP_TIMEOUT_S:.0f} s after stopping the server"
        )

    def log_text(self) -> str:
        return Path(self._log.name).read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        self.stop()
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
