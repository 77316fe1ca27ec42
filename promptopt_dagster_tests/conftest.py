"""Shared fixtures (a scripted pipeline on an ephemeral Dagster instance) and two settings for the
whole test process: no GCE metadata lookups, and SQLite without fsync."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

# Test support's helpers assert too: their failures show values, as a test's own asserts do.
pytest.register_assert_rewrite("promptopt_dagster_tests.support")

from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline  # noqa: E402
from promptopt_dagster_tests.support.vertex_server import VertexServer  # noqa: E402

# No test uses credentials from a GCE metadata server. Without this, gcsfs asks it for a token
# (with back-off: ~15 s where there is none) whenever a gs:// filesystem is built without the
# emulator. Set before google-auth is first imported: it reads the variable at import.
os.environ.setdefault("NO_GCE_CHECK", "true")
# MLflow links each registered prompt to its experiment in a non-daemon thread that retries a
# stopped test server with backoff (7 tries by default), one thread at a time, so the test process
# could not exit for minutes after its last test. The product's own setting for HTTP trackers
# (resources.MlflowTrackerResource) is 2 tries; tests that set it restore this value.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")


@event.listens_for(Engine, "connect")
def _sqlite_without_fsync(dbapi_connection: Any, connection_record: Any) -> None:
    """Every SQLite database opened through SQLAlchemy in this process (Dagster instances, MLflow
    stores) skips fsync on commit: a killed process loses nothing, a crashed machine may, which
    no test needs. On a busy disk this halves the time of a study on a SQLite Dagster instance."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA synchronous=OFF")
        cursor.close()


@pytest.fixture
def vertex_server() -> Iterator[VertexServer]:
    """The fake Vertex server (support/vertex_server.py), started for the test and stopped after."""
    with VertexServer() as srv:
        yield srv


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    """The scripted pipeline (support/pipeline.py) on an in-memory Dagster instance: runs, events
    and partitions are lost with it, and a study takes a quarter of the time it takes on a SQLite
    instance. Tests about persistence make their own instance."""
    with dg.DagsterInstance.ephemeral(tempdir=str(tmp_path / "dagster")) as instance:
        yield make_pipeline(tmp_path, instance)
