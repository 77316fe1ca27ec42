"""One MLflow store as the tracker reaches it: its `MlflowClient`, created on first use, and the
lock that makes a find-or-create atomic when the store is on this machine's disk.

Runs (`store.py`) and prompt versions (`registry.py`) are each created once even when processes
log them at the same moment. A local store (``sqlite:///`` file, ``file:`` folder) can only be
shared by processes of one machine, so a file lock beside it serializes those creations; a store
shared by machines has no such lock, and there the convergent rule of `store.py` alone keeps one.

Also `mlflow_global_uris`, for the few MLflow calls that only read the fluent API's global URIs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

_GLOBAL_URI_LOCK = threading.RLock()
CREATION_LOCK_TIMEOUT_S = 120.0


@contextlib.contextmanager
def mlflow_global_uris(tracking_uri: str, registry_uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (needed by `mlflow.sklearn.log_model`) at our URIs for one block,
    then restore exactly what was there (module variables and environment), under one lock."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracing.provider import reset as reset_tracing

    with _GLOBAL_URI_LOCK:
        old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(registry_uri or tracking_uri)
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = old_tracking, old_registry
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_tracing()


def default_artifact_root(tracking_uri: str) -> str | None:
    """Local stores: artifacts next to the database (MLflow's default, ./mlruns, depends on the
    current directory). Servers decide themselves (``--artifacts-destination``)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def creation_lock_path(tracking_uri: str) -> Path | None:
    """The lock file serializing creations in a store on this machine's disk, beside it; None
    for stores behind a server or a database server (shared by machines)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".create.lock")
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        local = (
            url2pathname(urlparse(tracking_uri).path) if tracking_uri.startswith("file:") else tracking_uri
        )
        folder = Path(local).resolve()
        return folder.parent / f"{folder.name}.create.lock"
    return None


class StoreConnection:
    """The `MlflowClient` of one tracking URI, and its creation lock."""

    def __init__(self, tracking_uri: str, registry_uri: str, artifact_root: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self.artifact_root = artifact_root
        self._client_obj: Any = None
        lock_path = creation_lock_path(tracking_uri)
        self._creation_lock = (
            None if lock_path is None else FileLock(str(lock_path), timeout=CREATION_LOCK_TIMEOUT_S)
        )

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Hold the store's creation lock (local stores; a no-op for servers) for one find-or-create."""
        if self._creation_lock is None:
            yield
            return
        Path(self._creation_lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
        with self._creation_lock:
            yield

    @property
    def client(self) -> Any:
        """The `MlflowClient`, created on first use (a new SQLite file takes ~3 s to initialize)."""
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client_obj
