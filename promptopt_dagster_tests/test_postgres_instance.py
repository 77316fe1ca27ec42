"""Dagster on a real PostgreSQL server (support/postgres.py): the same code on SQLite and on
Postgres, a database per test, data that outlives the instance object and a server restart."""

from pathlib import Path

import dagster as dg
import pytest
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from promptopt_dagster.pg_storage import POOL_SIZE, PooledPostgresStorage
from promptopt_dagster_tests.support.forked import in_forked_child
from promptopt_dagster_tests.support.postgres import PostgresServer, database_name, postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
    postgres_url,  # noqa: F401
)

pytestmark = pytest.mark.e2e

studies = dg.DynamicPartitionsDefinition(name="pg_test_studies")


@dg.asset(partitions_def=studies)
def study_score(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"study": context.partition_key, "score": 0.75})


def open_instance(backend: str, url: str | None, home: Path) -> dg.DagsterInstance:
    """A persistent instance on either backend; SQLite keeps its data under ``home``."""
    if backend == "postgres":
        assert url is not None
        return postgres_instance(url, home)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return dg.DagsterInstance.from_config(str(home))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_dynamic_partitions_and_materializations_persist(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("postgres_db_url") if backend == "postgres" else None
    first_home = tmp_path / "home"
    with open_instance(backend, url, first_home) as instance:
        if backend == "postgres":
            assert isinstance(instance.run_storage, PostgresRunStorage)
            assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
            assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        assert instance.get_runs() == []  # a fresh database: nothing from other tests

        instance.add_dynamic_partitions(studies.name, ["alpha", "beta"])
        result = dg.materialize([study_score], instance=instance, partition_key="alpha")
        assert result.success

        records = instance.fetch_materializations(study_score.key, limit=10).records
        assert len(records) == 1
        materialization = records[0].asset_materialization
        assert materialization is not None
        assert materialization.partition == "alpha"
        assert materialization.metadata["study"].value == "alpha"
        assert materialization.metadata["score"].value == 0.75

        instance.delete_dynamic_partition(studies.name, "beta")
        assert list(instance.get_dynamic_partitions(studies.name)) == ["alpha"]
        run_id = result.run_id

    # A new instance object: on Postgres even with another DAGSTER_HOME, so the data is in the server.
    second_home = tmp_path / "home2" if backend == "postgres" else first_home
    with open_instance(backend, url, second_home) as reopened:
        assert list(reopened.get_dynamic_partitions(studies.name)) == ["alpha"]
        assert not reopened.has_dynamic_partition(studies.name, "beta")
        run = reopened.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        records = reopened.fetch_materializations(study_score.key, limit=10).records
        assert [r.asset_materialization.partition for r in records if r.asset_materialization] == ["alpha"]


def test_each_test_gets_its_own_database(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
    postgres_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    assert database_name(postgres_db_url) != database_name(postgres_url)
    other = postgres_server.create_database(template=postgres_server.dagster_template())
    try:
        with postgres_instance(postgres_db_url, tmp_path / "a") as mine:
            mine.add_dynamic_partitions(studies.name, ["only-here"])
        with postgres_instance(other, tmp_path / "b") as theirs:
            assert list(theirs.get_dynamic_partitions(studies.name)) == []
    finally:
        postgres_server.drop_database(database_name(other))
    names = {row[0] for row in postgres_server.execute("SELECT datname FROM pg_database")}
    assert database_name(other) not in names


def test_data_survives_a_server_restart(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    with postgres_instance(postgres_db_url, tmp_path / "home") as instance:
        instance.add_dynamic_partitions(studies.name, ["kept"])
    old_pid = postgres_server.pid
    postgres_server.restart()
    assert postgres_server.pid != old_pid
    with postgres_instance(postgres_db_url, tmp_path / "home") as instance:
        assert list(instance.get_dynamic_partitions(studies.name)) == ["kept"]


def connections_to(server: PostgresServer, url: str) -> int:
    """Sessions the server has open on `url`'s database (idle pooled ones included)."""
    [(count,)] = server.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database_name(url)}'"
    )
    return int(count)


def test_instances_of_one_process_share_a_bounded_pool_and_outlive_a_restart(
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """dagster-postgres would connect once per query; the pooled storage keeps at most POOL_SIZE
    sessions however many instances the process opens (a Celery worker opens one per step),
    hands its class to other processes through the instance ref, and replaces the connections a
    server restart dropped instead of failing the next query."""
    for i in range(12):
        with postgres_instance(postgres_db_url, tmp_path / f"home{i}") as instance:
            assert isinstance(instance.get_ref().storage, PooledPostgresStorage)
            instance.add_dynamic_partitions(studies.name, [f"s{i}"])
            assert instance.has_dynamic_partition(studies.name, f"s{i}")
    assert 1 <= connections_to(postgres_server, postgres_db_url) <= POOL_SIZE

    with postgres_instance(postgres_db_url, tmp_path / "kept") as instance:
        assert len(instance.get_dynamic_partitions(studies.name)) == 12
        postgres_server.restart()
        assert connections_to(postgres_server, postgres_db_url) == 0
        instance.add_dynamic_partitions(studies.name, ["after-restart"])  # same instance, same pool
        assert instance.has_dynamic_partition(studies.name, "after-restart")


def test_a_forked_child_opens_its_own_connections(
    postgres_db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A child forked after the parent used the pool must not talk over the parent's sockets."""
    with postgres_instance(postgres_db_url, tmp_path / "parent") as instance:
        instance.add_dynamic_partitions(studies.name, ["from-parent"])

        def query() -> list[str]:
            with postgres_instance(postgres_db_url, tmp_path / "child") as theirs:
                return sorted(theirs.get_dynamic_partitions(studies.name))

        answer, exitcode = in_forked_child(query)
        assert answer == ["from-parent"] and exitcode == 0
        instance.add_dynamic_partitions(studies.name, ["after-fork"])  # the parent's pool still works
        assert sorted(instance.get_dynamic_partitions(studies.name)) == ["after-fork", "from-parent"]


@pytest.mark.parametrize("second_limit", [3, 5])
def test_a_pool_set_up_by_two_processes_at_once_gets_the_default_limit(
    postgres_db_url: str,  # noqa: F811
    tmp_path: Path,
    second_limit: int,
) -> None:
    """The second of two runs that both found no limit row for the pool (each saw none before
    the other wrote it) inserts after the first committed: dagster-postgres then fails the run
    with InFailedSqlTransaction. The pooled storage ends with the second's default in force."""

    def pools(limit: int) -> dict:
        return {"concurrency": {"pools": {"default_limit": limit, "granularity": "op"}}}

    with (
        postgres_instance(postgres_db_url, tmp_path / "first", pools(3)) as first,
        postgres_instance(postgres_db_url, tmp_path / "second", pools(second_limit)) as second,
    ):
        assert first.event_log_storage.initialize_concurrency_limit_to_default("llm")
        assert second.event_log_storage.initialize_concurrency_limit_to_default("llm")
        info = second.event_log_storage.get_concurrency_info("llm")
        assert (info.limit, info.slot_count) == (second_limit, second_limit)
