"""The one error the tracking package raises on purpose."""

from __future__ import annotations

from promptopt_dagster.errors import StorageError


class TrackingError(StorageError):
    """MLflow refused a call or cannot be reached for a read (writes are queued instead)."""
