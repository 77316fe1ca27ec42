"""Dagster's SQLite storage with pooled connections: one engine per database file and process.

Dagster's own SQLite storages create an engine and a connection for every transaction.
`CachedEngineSqliteStorage` is `DagsterSqliteStorage` whose run, event-log and schedule storages
take their engines from a per-process cache (at most `MAX_ENGINES`, each keeping up to `POOL_SIZE`
idle connections). The files, tables and layout under `base_dir` are Dagster's own. The CLI selects
it in `dagster.yaml` (``module: promptopt_dagster.sqlite_storage``,
``class: CachedEngineSqliteStorage``) unless DAGSTER_PG_URL is set.

Details: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import sqlalchemy as sa
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
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
from sqlalchemy.pool import NullPool, QueuePool

from promptopt_dagster.partition_membership import PartitionMembershipCache

MAX_ENGINES = 16  # each holds up to POOL_SIZE open files (x3 with SQLite's -wal and -shm)
POOL_SIZE = 2
MAX_OVERFLOW = 8  # more connections at once under concurrency, closed when returned

_engines: OrderedDict[tuple[str, float | None], sa.Engine] = OrderedDict()
_lock = threading.Lock()
# (database URL, schema fact) pairs this process has seen true: see CachedEngineEventLogStorage
_schema_present: set[tuple[str, str]] = set()
_template: bytes | None = None  # an empty run event file made by Dagster's own code, once


def engine_for(conn_string: str, timeout: float | None = None) -> sa.Engine:
    """This process's engine for one SQLite file (`timeout`: sqlite3's busy timeout, seconds)."""
    key = (conn_string, timeout)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            # check_same_thread off: a pooled connection may serve another thread later, one
            # thread at a time (SQLite's default build serializes access anyway).
            connect_args: dict[str, Any] = {"check_same_thread": False}
            if timeout is not None:
                connect_args["timeout"] = timeout
            engine = sa.create_engine(
                conn_string,
                poolclass=QueuePool,
                pool_size=POOL_SIZE,
                max_overflow=MAX_OVERFLOW,
                connect_args=connect_args,
            )
            sa.event.listen(engine, "connect", _wal_with_normal_sync)
            _engines[key] = engine
            if len(_engines) > MAX_ENGINES:
                _engines.popitem(last=False)
        else:
            _engines.move_to_end(key)
        return engine


def _wal_with_normal_sync(dbapi_connection: Any, _record: Any) -> None:
    """WAL mode (Dagster puts each of its files in it when it creates them; here it is set on
    connecting, so that a new file's first connection has it too) and `synchronous=NORMAL`: a
    commit no longer waits for the disk (fsync); the WAL is synced at checkpoints. A crash of the
    process loses nothing committed; a power cut or an OS crash may lose the last transactions,
    never the file's consistency. A file another process holds in another journal mode keeps it,
    and SQLite's default, FULL."""
    cursor = dbapi_connection.cursor()
    try:
        if cursor.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:  # locked by another process: leave the file as it is
        pass
    finally:
        cursor.close()


def _schema_fact(key: tuple[str, str], check: Callable[[], bool]) -> bool:
    """`check()`, asked until it first says yes for `key` (database URL, fact), then known."""
    if key in _schema_present:
        return True
    if not check():
        return False
    _schema_present.add(key)
    return True


def forget_engines() -> None:
    """Drop every engine of this process, closing their idle connections."""
    with _lock:
        while _engines:
            _engines.popitem()[1].dispose()
        _schema_present.clear()


def _forget_engines_in_child() -> None:
    """A forked child must not use the parent's connections: drop the pools without closing
    them (closing would affect the parent's)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


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


class CachedEngineEventLogStorage(PartitionMembershipCache, SqliteEventLogStorage):
    @contextmanager
    def _connect(self, shard: str) -> Iterator[sa.Connection]:
        with self._db_lock:
            engine = engine_for(self.conn_string_for_shard(shard), SQLITE_BUSY_TIMEOUT_SECONDS)
            if shard not in self._initialized_dbs:  # a new run's file gets its tables first
                if shard == INDEX_SHARD_NAME or not self._create_from_template(shard):
                    self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn, conn.begin():
                yield conn

    def membership_scope(self) -> str:
        return self.conn_string_for_shard(INDEX_SHARD_NAME)

    def _create_from_template(self, shard: str) -> bool:
        """Put a copy of the empty run file at the shard's path, whole or not at all (a hard
        link of a finished temporary file). False if the file exists already (another process
        may have made it first) or the filesystem refuses hard links: Dagster's `_initdb` then
        checks or creates it as usual."""
        path = self.path_for_shard(shard)
        if os.path.exists(path):
            return False
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as handle:
                handle.write(self._run_file_template())
            os.link(tmp, path)
        except OSError:  # FileExistsError included
            return False
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return True

    def _run_file_template(self) -> bytes:
        """An empty run event file: Dagster's `_initdb` on a fresh file (its tables, WAL mode,
        the migration revision stamped), made once per process."""
        global _template
        with _lock:
            if _template is None:
                with tempfile.TemporaryDirectory() as folder:
                    path = os.path.join(folder, "template.db")
                    engine = sa.create_engine(f"sqlite:///{path}", poolclass=NullPool)
                    self._initdb(engine)
                    engine.dispose()  # the last connection closed: the WAL is folded into the file
                    with open(path, "rb") as handle:
                        _template = handle.read()
            return _template

    # Schema checks. Dagster asks them before most statements (whether the partitions table
    # exists before each partition lookup, whether asset_keys has a column before each asset
    # write), and its `has_table` builds a new engine and connection for every answer: about 150
    # of the 600 statements of an iteration. Migrations only add tables, columns and completed
    # index migrations, so a yes is kept per index file and process.

    def has_table(self, table_name: str) -> bool:
        # Without `_db_lock`, as Dagster's: it is asked while this thread holds an index connection.
        conn_string = self.conn_string_for_shard(INDEX_SHARD_NAME)

        def check() -> bool:
            engine = engine_for(conn_string, SQLITE_BUSY_TIMEOUT_SECONDS)
            with engine.connect() as conn:
                return bool(engine.dialect.has_table(conn, table_name))

        return _schema_fact((conn_string, f"table {table_name}"), check)

    def _has_asset_key_col_on_connection(self, conn: sa.Connection, column_name: str) -> bool:
        return _schema_fact(
            (str(conn.engine.url), f"asset_keys column {column_name}"),
            partial(super()._has_asset_key_col_on_connection, conn, column_name),
        )

    def has_secondary_index(self, name: str) -> bool:
        return _schema_fact(
            (self.conn_string_for_shard(INDEX_SHARD_NAME), f"secondary index {name}"),
            partial(super().has_secondary_index, name),
        )

    def wipe(self) -> None:
        """Deletes the run files: the engines go first, so no connection writes to a deleted file."""
        with self._db_lock:
            forget_engines()
        super().wipe()


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
