"""A server process for tests: started in its own session with its output in a log file, awaited
until it answers (a TCP port, an HTTP URL or any check) or dies, stopped by its pid.

Usage::

    server = ServerProcess("mlflow server")
    server.start(cmd, ready=http_ready(f"{url}/health"), timeout=90)
    ...
    server.stop()    # SIGTERM to its process group, SIGKILL if it outlives the timeout
    server.start(cmd, ready=...)  # again, appending to the same log
    server.close()   # stop, and remove the log file if this object made it

A start that fails (the process exits, or is not ready in time) stops the group and raises
`ServerStartError` carrying what the process logged since it was spawned. The child runs in a new
session, so a Ctrl-C in the terminal reaches pytest only, whose teardown stops it; its SIGINT and
SIGTERM are reset to their defaults (a parent started without job control ignores SIGINT, and an
ignored signal stays ignored across exec). On Linux the child also gets `death_signal` (SIGTERM
unless told otherwise) when the thread that started it dies, so a killed pytest leaves no orphan
server: start servers from a thread that lives as long as they should (pytest's main thread does).

`ServerHandle` is the base of the wrappers that hold one `ServerProcess` (GcsEmulator,
MlflowServer, PostgresServer, RedisServer, VertexServerProcess, DagsterDev): each implements
`start()` and what is its own. `Startable`, its base, is the context-manager use (start on
entering, close on leaving) that the helpers of other kinds share too (CeleryWorkers, VertexServer).
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
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

HOST = "127.0.0.1"
POLL_S = 0.05
LOG_TAIL_CHARS = 3000
PR_SET_PDEATHSIG = 1


def free_port(host: str = HOST) -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tcp_ready(port: int, host: str = HOST) -> Callable[[], bool]:
    """A readiness check: host:port accepts connections."""
    return lambda: port_open(port, host)


def http_ready(url: str, timeout: float = 1.0) -> Callable[[], bool]:
    """A readiness check: a GET on `url` answers 200."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):  # HTTPError is a URLError
            return False

    return check


def wait_port_free(port: int, host: str = HOST, timeout: float = 10.0) -> None:
    """Poll until nothing accepts connections on host:port (a stopped server's workers may hold it
    a moment longer than the leader)."""
    deadline = time.monotonic() + timeout
    while port_open(port, host, timeout=POLL_S):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} is still in use {timeout:.0f} s after the server stopped")
        time.sleep(POLL_S)


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL("libc.so.6", use_errno=True).prctl  # type: ignore[no-any-return]


# Resolved here, in the parent: a child that switched to another user (PostgreSQL as `postgres`)
# may be unable to read this interpreter's files to import anything.
_PRCTL = _load_prctl()


def _child_setup(death_signal: int | None) -> Callable[[], None]:
    """What the child runs between fork and exec: default SIGINT/SIGTERM handling, and on Linux
    `death_signal` when the starting thread dies. Only builtins and a prctl call."""

    def setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if death_signal is not None and _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, int(death_signal))

    return setup


def _killpg(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ServerStartError(RuntimeError):
    """A server exited, or was not ready in time; `log` is what it wrote since it was spawned."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(f"{message}; its log ends with:\n{log[-LOG_TAIL_CHARS:]}")
        self.log = log


class ServerStartTimeout(ServerStartError, TimeoutError):
    """The server kept running but was not ready in time."""


class ServerProcess:
    """One server process (and whatever it forks: its process group) with a log file."""

    def __init__(self, name: str, log_path: str | os.PathLike[str] | None = None) -> None:
        self.name = name
        self._own_log = log_path is None
        if log_path is None:
            fd, path = tempfile.mkstemp(prefix=f"{name.replace(' ', '-')}-", suffix=".log")
            os.close(fd)
            log_path = path
        self.log_path = Path(log_path)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.returncode: int | None = None  # of the latest process, once stopped

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError(f"{self.name} is not started; call start() first")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(
        self,
        cmd: Sequence[str],
        *,
        ready: Callable[[], object],
        timeout: float,
        every: float = POLL_S,
        death_signal: int | None = signal.SIGTERM,
        **popen_kwargs: Any,
    ) -> None:
        """Spawn `cmd` (output appended to the log; `popen_kwargs` such as env, cwd, user go to
        Popen), then poll `ready()` every `every` s until it returns something truthy. The process
        dying first, or `timeout` s passing, stops it and raises `ServerStartError`."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self._proc = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_child_setup(death_signal),
                **popen_kwargs,
            )
        try:
            self.wait_ready(ready, timeout, every)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, ready: Callable[[], object], timeout: float, every: float = POLL_S) -> None:
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} is not started; call start() first")
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with code {code} before it was ready", self.log_since_start()
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ServerStartTimeout(
                    f"{self.name} was not ready within {timeout:.0f} s", self.log_since_start()
                )
            time.sleep(every)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """`sig` to the process group; SIGKILL to it if the leader still runs `timeout` s later;
        then SIGKILL to whatever of the group outlived the leader. Returns the leader's exit code
        (None if nothing was started since the last stop)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            _killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
        _killpg(proc.pid, signal.SIGKILL)
        self.returncode = proc.returncode
        return self.returncode

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_since_start(self) -> str:
        """What the process wrote since its latest start."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        """Stop, and remove the log file if this object made it."""
        self.stop()
        if self._own_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()


class Startable:
    """A test helper used as a context manager: `start()` (returning self) on entering, `close()`
    on leaving. A subclass implements `start()` and `stop()`; `close()` is `stop()` unless the
    subclass has more to release."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ServerHandle(Startable):
    """The lifecycle of a test wrapper around one `ServerProcess`, `_server` (None until the
    subclass makes it): pid, running, stop, restart, close, log_text, and use as a context manager
    (a failed start closes). A subclass implements `start()`, returning self. `stop()` sends
    `stop_signal` to the process group by its pid, SIGKILL if the leader outlives `stop_timeout` s."""

    _server: ServerProcess | None = None
    stop_timeout: float = 10.0
    stop_signal: int = signal.SIGTERM

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.running

    @property
    def pid(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not started; call start() first")
        return self._server.pid

    @staticmethod
    def _venv_script(name: str, install_hint: str) -> str:
        """The console script `name` next to the running interpreter (the project's .venv/bin)."""
        candidate = Path(sys.executable).parent / name
        if candidate.exists():
            return str(candidate)
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; {install_hint}")

    def stop(self) -> int | None:
        """The leader's exit code (None if nothing was started since the last stop)."""
        if self._server is None:
            return None
        return self._server.stop(timeout=self.stop_timeout, sig=self.stop_signal)

    def restart(self) -> Self:
        """Stop and start again."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop, and remove the log file if the `ServerProcess` made it."""
        self.stop()
        if self._server is not None:
            self._server.close()

    def log_text(self) -> str:
        return self._server.log_text() if self._server is not None else ""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run
            raise
