"""Dagster's PostgreSQL storage with pooled connections, shared by every instance of a process.

dagster-postgres opens a new connection for every query, and an iteration makes hundreds.
`PooledPostgresStorage` is `DagsterPostgresStorage` whose run, event-log and schedule storages
share one engine per database URL and process (at most `POOL_SIZE` idle connections, `MAX_OVERFLOW`
more under concurrency). Its config is `storage: postgres:`'s. The CLI selects it in `dagster.yaml`
(``module: promptopt_dagster.pg_storage``, ``class: PooledPostgresStorage``) when DAGSTER_PG_URL is
set.

Details: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import psycopg2.errors
import sqlalchemy as sa
from dagster._core.storage.event_log.schema import ConcurrencyLimitsTable
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config

from promptopt_dagster.partition_membership import PartitionMembershipCache

POOL_SIZE = 2
MAX_OVERFLOW = 8
POOL_RECYCLE_S = 3600  # reconnect hourly, under server-side idle timeouts

_engines: dict[str, sa.Engine] = {}
_checked: set[str] = set()  # URLs whose tables an instance of this process has checked
_lock = threading.Lock()


def shared_engine(postgres_url: str) -> sa.Engine:
    """This process's pooled engine for `postgres_url`."""
    with _lock:
        engine = _engines.get(postgres_url)
        if engine is not None:
            return engine
        engine = create_pg_engine(
            postgres_url,
            None,
            isolation_level="AUTOCOMMIT",
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            pool_recycle=POOL_RECYCLE_S,
            pool_pre_ping=True,
        )
        _engines[postgres_url] = engine
        return engine


def _forget_engines_in_child() -> None:
    """A forked child must not use the parent's sockets: drop the pools without closing them
    (closing would end the parent's sessions too)."""
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()
    _checked.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


class PooledPostgresEventLogStorage(PartitionMembershipCache, PostgresEventLogStorage):
    def membership_scope(self) -> str:
        return self.postgres_url

    def initialize_concurrency_limit_to_default(self, concurrency_key: str) -> bool:
        """Dagster's, safe when another process sets up the same pool at the same moment.

        The first step of a run to claim a slot in a pool without a limit row writes the
        instance's default limit: an insert, and on a unique violation an update in the same
        transaction. PostgreSQL has aborted that transaction at the violation, so the update
        fails (InFailedSqlTransaction) and the run with it: of eight studies started at once on a
        fresh instance, one failed that way. The update and the slots then go in a new
        transaction.
        """
        try:
            return super().initialize_concurrency_limit_to_default(concurrency_key)
        except sa.exc.InternalError as error:
            default_limit = self._instance.global_op_concurrency_default_limit
            if not isinstance(error.orig, psycopg2.errors.InFailedSqlTransaction) or default_limit is None:
                raise
        with self.index_transaction() as conn:
            conn.execute(
                ConcurrencyLimitsTable.update()
                .values(limit=default_limit)
                .where(
                    sa.and_(
                        ConcurrencyLimitsTable.c.concurrency_key == concurrency_key,
                        ConcurrencyLimitsTable.c.limit != default_limit,
                    )
                )
            )
            self._allocate_concurrency_slots(conn, concurrency_key, default_limit)
        return True


class PooledPostgresStorage(DagsterPostgresStorage):
    """`DagsterPostgresStorage` on this process's pooled engine for its URL (module docstring)."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        if token_provider is not None:
            super().__init__(postgres_url, should_autocreate_tables, inst_data, token_provider)
            return
        engine = shared_engine(postgres_url)
        # dagster-postgres checks (and creates) the tables in every new instance; once per
        # process and URL is enough.
        create = should_autocreate_tables and postgres_url not in _checked
        # DagsterPostgresStorage.__init__'s fields, with the event log storage above
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        self._run_storage = PostgresRunStorage(postgres_url, create)
        self._event_log_storage = PooledPostgresEventLogStorage(postgres_url, create)
        self._schedule_storage = PostgresScheduleStorage(postgres_url, create)
        super(DagsterPostgresStorage, self).__init__()
        if should_autocreate_tables:
            _checked.add(postgres_url)
        for storage in (self._run_storage, self._event_log_storage, self._schedule_storage):
            storage._engine = engine  # the attribute dagster-postgres' own optimize_for_webserver sets

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
