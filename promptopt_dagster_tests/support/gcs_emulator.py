"""A real Google Cloud Storage emulator (`gcp-storage-emulator`) for tests, on 127.0.0.1.

Usage::

    with GcsEmulator(bucket="promptopt-test") as emu:
        os.environ.update(emu.env())
        ...  # gs://promptopt-test/... now goes to the emulator

or, in a test module, ``from promptopt_dagster_tests.support.gcs_emulator import gcs_emulator``
(a session-scoped fixture that sets the environment for the whole session and yields the
`GcsEmulator`). How clients reach it: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from promptopt_dagster_tests.support.server_process import (
    HOST,
    ServerHandle,
    ServerProcess,
    free_port,
    http_ready,
)

# Must precede the first `import gcsfs` (see above); harmless if the caller already set it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


class GcsEmulator(ServerHandle):
    """One `gcp-storage-emulator` process with a default bucket (support/server_process.py).
    `restart()` keeps the port; in-memory data is lost (only the empty default bucket exists
    afterwards) unless the emulator was created with `data_dir`. `stop()` escalates to SIGKILL after 5 s."""

    _server: ServerProcess
    stop_timeout = STOP_TIMEOUT_S

    def __init__(
        self,
        bucket: str = "promptopt-test",
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.bucket = bucket
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self.port = port or free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self._server = ServerProcess("gcp-storage-emulator")

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> GcsEmulator:
        """Start it and wait until its default bucket answers 200."""
        if self.running:
            return self
        storage = ["--in-memory"] if self.data_dir is None else []
        cmd = [
            self._venv_script("gcp-storage-emulator", "install the dev extras: pip install -e '.[dev]'"),
            *([] if self.data_dir is None else [f"--data-dir={self.data_dir}"]),
            "start",
            f"--host={HOST}",
            f"--port={self.port}",
            *storage,
            f"--default-bucket={self.bucket}",
            "--quiet",
        ]
        ready = http_ready(f"{self.endpoint}/storage/v1/b/{self.bucket}")
        self._server.start(cmd, ready=ready, timeout=START_TIMEOUT_S)
        return self

    # --- client configuration ------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment a client process needs to use this emulator (gcsfs and google-cloud-storage)."""
        return {
            "STORAGE_EMULATOR_HOST": self.endpoint,
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def uri(self, *parts: str) -> str:
        """gs:// URI in the default bucket, e.g. ``emu.uri("runs", "a.json")``."""
        return "/".join([f"gs://{self.bucket}", *parts])


def clear_gcsfs_cache() -> None:
    """Forget cached gcsfs filesystems (and subclasses'), so the next one uses the current env."""
    import gcsfs.core

    pending: list[type] = [gcsfs.core.GCSFileSystem]
    while pending:
        cls = pending.pop()
        cls.clear_instance_cache()  # type: ignore[attr-defined]
        pending.extend(cls.__subclasses__())


@contextlib.contextmanager
def emulator_environment(emulator: GcsEmulator) -> Iterator[GcsEmulator]:
    """Point clients at `emulator` for the duration of the block, then restore the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in emulator.env().items():
            mp.setenv(key, value)
        clear_gcsfs_cache()
        try:
            yield emulator
        finally:
            clear_gcsfs_cache()


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[GcsEmulator]:
    """A session-wide emulator with bucket "promptopt-test"; the environment points at it while
    the session runs. Tests that stop or restart an emulator should start their own instead."""
    with GcsEmulator() as emulator, emulator_environment(emulator):
        yield emulator
