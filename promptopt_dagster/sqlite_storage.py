"""Dagster's SQLite storage, reusing one SQLAlchemy engine per database file.

Dagster's SQLite storages create a new engine for every connection (a run's events, the event
index, runs, schedules) and dispose of it after one use. An engine is cheap to connect with
but costly to create, and each new one starts with an empty statement cache, so every query is
compiled again: an iteration of the scripted study spends about a quarter of its orchestration
there (`benchmarks/orchestration_overhead.py`). `CachedEngineSqliteStorage` is
`DagsterSqliteStorage` whose three storages take their engines from a per-process cache:

- the engines still use `NullPool`, so every use opens and closes its own SQLite connection as
  Dagster's do (no connection outlives a use, none is shared between threads or processes);
- one engine per database file, at most `MAX_ENGINES` (a run's events have their own file; the
  least recently used engine is dropped);
- the files, tables and layout under `base_dir` are Dagster's own: a home written by either
  class is read by the other.

Select it in `dagster.yaml` (the CLI writes this unless DAGSTER_PG_URL is set)::

    storage:
      custom:
        module: promptopt_dagster.sqlite_storage
        class: CachedEngineSqliteStorage
        config:
          base_dir:
            env: DAGSTER_HOME
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData
from sqlalchemy.pool import NullPool

MAX_ENGINES = 64

_engines: OrderedDict[tuple[str, float | None], sa.Engine] = OrderedDict()
_lock = threading.Lock()


def engine_for(conn_string: str, timeout: float | None = None) -> sa.Engine:
    """This process's engine for one SQLite file (`timeout`: sqlite3's busy timeout, seconds)."""
    key = (conn_string, timeout)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            connect_args = {} if timeout is None else {"timeout": timeout}
            engine = sa.create_engine(conn_string, poolclass=NullPool, connect_args=connect_args)
            _engines[key] = engine
            if len(_engines) > MAX_ENGINES:
                _engines.popitem(last=False)
        else:
            _engines.move_to_end(key)
        return engine


class CachedEngineRunStorage(SqliteRunStorage):
    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        with engine_for(self._conn_string).connect() as conn, conn.begin():
            yield conn


class CachedEngineScheduleStorage(SqliteScheduleStorage):
    @contextmanager
    def connect(self) -> Iterator[sa.Connection]:
        with engine_for(self._conn_string).connect() as conn, conn.begin():
            yield conn


class CachedEngineEventLogStorage(SqliteEventLogStorage):
    @contextmanager
    def _connect(self, shard: str) -> Iterator[sa.Connection]:
        with self._db_lock:
            engine = engine_for(self.conn_string_for_shard(shard), SQLITE_BUSY_TIMEOUT_SECONDS)
            if shard not in self._initialized_dbs:  # a new run's file gets its tables first
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn


class CachedEngineSqliteStorage(DagsterSqliteStorage):
    """`DagsterSqliteStorage` with engines reused per file (module docstring)."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None) -> None:
        self.base_dir = base_dir
        self._run_storage = CachedEngineRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = CachedEngineEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = CachedEngineScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        super(DagsterSqliteStorage, self).__init__()  # DagsterStorage's, not the Dagster classes'

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> CachedEngineSqliteStorage:
        return cls.from_local(inst_data=inst_data, **config_value)
