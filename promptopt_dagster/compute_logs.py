"""Dagster's local compute logs, copied to their files and to the console by a thread.

For every capture (each in-process run, each step on a worker) Dagster's `LocalComputeLogManager`
points stdout and stderr at files and starts four processes to show them on the console as
well: a `tail -F` per stream and a Python process per tail that kills it if the run's process
dies. On 2 cores that is about 30 ms of an iteration's orchestration and 50 ms of CPU per step.

`ThreadedComputeLogManager` keeps Dagster's files, layout and reading side, and captures the
same output, native writes included: each stream's file descriptor is pointed at a pipe, and a
thread of this process copies what arrives to the stream's file and to the console. Nothing
outlives the process. A child process started during a capture writes into the same pipe; if it
outlives the capture, the thread goes on copying its output until it exits.

Select it in `dagster.yaml` (the CLI writes this)::

    compute_logs:
      module: promptopt_dagster.compute_logs
      class: ThreadedComputeLogManager
      config:
        dagster_home:
          env: DAGSTER_HOME

The files go where Dagster's default manager puts them, DAGSTER_HOME/storage.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Generator, Iterator, Sequence
from typing import IO, Any

from dagster import Field, Float, StringSource
from dagster._config.config_schema import UserConfigSchema
from dagster._core.storage.compute_log_manager import CapturedLogContext, ComputeIOType
from dagster._core.storage.local_compute_log_manager import IO_TYPE_EXTENSION, LocalComputeLogManager
from dagster._serdes import ConfigurableClassData
from dagster._utils import ensure_file, touch_file

# How long the end of a capture waits for the copy to drain; only a child process that still
# holds the pipe makes it wait that long.
DRAIN_TIMEOUT_S = 2.0
CHUNK = 65536


def _fileno(stream: IO[Any]) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # pytest's capsys, closed or in-memory streams
        return None


def _copy(source: int, path: str, console: int) -> None:
    """Copy the pipe `source` to the file at `path` and to the descriptor `console` until every
    writer has closed it; a console that fails (closed terminal) is dropped, the file is not."""
    console_ok = True
    try:
        with open(path, "ab", buffering=0) as log_file:
            while chunk := os.read(source, CHUNK):
                log_file.write(chunk)
                if console_ok:
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(console, view) :]
                    except OSError:
                        console_ok = False
    finally:
        os.close(source)
        os.close(console)


@contextlib.contextmanager
def tee_stream(stream: IO[Any], path: str) -> Iterator[None]:
    """While open, everything written to `stream`'s file descriptor (by Python, native code or
    child processes) goes to `path` as well as where it went before."""
    ensure_file(path)
    fd = _fileno(stream)
    if fd is None:  # no descriptor to point elsewhere: Dagster captures nothing here either
        yield
        return
    stream.flush()
    read_end, write_end = os.pipe()
    console = os.dup(fd)
    saved = os.dup(fd)
    name = f"compute-log {os.path.basename(path)}"
    copier = threading.Thread(target=_copy, args=(read_end, path, console), name=name, daemon=True)
    copier.start()
    os.dup2(write_end, fd)
    os.close(write_end)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            stream.flush()
        os.dup2(saved, fd)  # the pipe's last writer here is gone: the copy reads to its end
        os.close(saved)
        copier.join(DRAIN_TIMEOUT_S)


class ThreadedComputeLogManager(LocalComputeLogManager):
    """`LocalComputeLogManager` whose capture needs no processes (module docstring)."""

    def __init__(
        self,
        dagster_home: str,
        polling_timeout: float | None = None,
        inst_data: ConfigurableClassData | None = None,
    ) -> None:
        super().__init__(os.path.join(dagster_home, "storage"), polling_timeout, inst_data)

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        return {"dagster_home": StringSource, "polling_timeout": Field(Float, is_required=False)}

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> ThreadedComputeLogManager:
        return cls(inst_data=inst_data, **config_value)

    @contextlib.contextmanager
    def capture_logs(self, log_key: Sequence[str]) -> Generator[CapturedLogContext, None, None]:
        if os.name == "nt":
            with super().capture_logs(log_key) as context:
                yield context
            return
        outpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDOUT])
        errpath = self.get_captured_local_path(log_key, IO_TYPE_EXTENSION[ComputeIOType.STDERR])
        with tee_stream(sys.stdout, outpath), tee_stream(sys.stderr, errpath):
            yield CapturedLogContext(log_key)
        touch_file(self.complete_artifact_path(log_key))  # Dagster's mark of a finished capture
