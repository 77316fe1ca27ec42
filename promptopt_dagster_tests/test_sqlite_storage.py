"""The embedded instance's storage (sqlite_storage.py): Dagster's SQLite files and layout, with
one engine per file and process and pooled connections instead of a new engine and connection
for every query."""

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from promptopt_dagster import sqlite_storage
from promptopt_dagster.instance_config import sqlite_storage as sqlite_storage_entry
from promptopt_dagster.sqlite_storage import CachedEngineSqliteStorage
from promptopt_dagster_tests.support.forked import in_forked_child

items = dg.DynamicPartitionsDefinition(name="sqlite_test_items")


@dg.asset(partitions_def=items)
def item_score(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"item": context.partition_key})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return tmp_path


def open_home(home: Path, cached: bool) -> dg.DagsterInstance:
    """DAGSTER_HOME's instance with the CLI's storage entry, or with Dagster's default."""
    config: dict = {"telemetry": {"enabled": False}}
    if cached:
        config["storage"] = sqlite_storage_entry()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dg.DagsterInstance.from_config(str(home))


def engines_under(home: Path) -> set[int]:
    """Identities of the cached engines of files under `home`."""
    return {id(engine) for (conn, _), engine in sqlite_storage._engines.items() if str(home) in conn}


def materialize(instance: dg.DagsterInstance, key: str) -> str:
    instance.add_dynamic_partitions(items.name, [key])
    result = dg.materialize([item_score], instance=instance, partition_key=key)
    assert result.success
    return result.run_id


def partitions_materialized(instance: dg.DagsterInstance) -> set[str]:
    return set(instance.get_materialized_partitions(item_score.key))


@pytest.mark.parametrize("writer_cached", [True, False])
def test_a_home_written_by_either_storage_is_read_by_the_other(home: Path, writer_cached: bool) -> None:
    with open_home(home, writer_cached) as writer:
        run_id = materialize(writer, "a")
    with open_home(home, not writer_cached) as reader:
        run = reader.get_run_by_id(run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.SUCCESS
        assert partitions_materialized(reader) == {"a"}
        assert len(reader.all_logs(run_id)) > 5  # the run's own event file
        materialize(reader, "b")
    with open_home(home, writer_cached) as again:
        assert partitions_materialized(again) == {"a", "b"}


def test_every_file_keeps_one_engine_however_many_queries_and_instances(home: Path) -> None:
    with open_home(home, cached=True) as instance:
        assert isinstance(instance.get_ref().storage, CachedEngineSqliteStorage)
        run_id = materialize(instance, "a")
        engines = engines_under(home)
        # runs, schedules, the event index and the run's own event file
        assert len(engines) >= 4
        for _ in range(20):
            instance.get_run_by_id(run_id)
            instance.all_logs(run_id)
            partitions_materialized(instance)
        assert engines_under(home) == engines
    with open_home(home, cached=True) as second:
        assert partitions_materialized(second) == {"a"}
        assert engines_under(home) == engines  # a second instance of the process shares them


def test_the_engine_cache_is_bounded(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_storage, "MAX_ENGINES", 3)
    monkeypatch.setattr(sqlite_storage, "_engines", type(sqlite_storage._engines)())
    urls = [f"sqlite:///{home / f'db{i}.sqlite'}" for i in range(5)]
    first = sqlite_storage.engine_for(urls[0])
    for url in urls[1:]:
        sqlite_storage.engine_for(url)
    assert len(sqlite_storage._engines) == 3
    assert sqlite_storage.engine_for(urls[0]) is not first  # dropped as least recently used, made again
    assert sqlite_storage.engine_for(urls[4]) is sqlite_storage.engine_for(urls[4])


@pytest.fixture
def connects() -> Iterator[list[str]]:
    """The database of every new SQLite connection any pool of this process opens."""
    opened: list[str] = []

    def count(dbapi_connection: sqlite3.Connection, record: object) -> None:
        opened.append(dbapi_connection.execute("PRAGMA database_list").fetchone()[2])

    sa.event.listen(sa.pool.Pool, "connect", count)
    yield opened
    sa.event.remove(sa.pool.Pool, "connect", count)


def test_queries_reuse_open_connections(home: Path, connects: list[str]) -> None:
    with open_home(home, cached=True) as instance:
        run_id = materialize(instance, "a")
        opened = len(connects)
        for _ in range(20):
            instance.get_run_by_id(run_id)
            instance.all_logs(run_id)
            partitions_materialized(instance)
        # Dagster's own storage opens one connection per query: 60+ here
        assert len(connects) - opened <= len(engines_under(home)) * sqlite_storage.POOL_SIZE


@pytest.fixture
def statements() -> Iterator[list[str]]:
    """Every SQL statement any engine of this process executes, whitespace collapsed."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        seen.append(" ".join(statement.split()))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


SCHEMA_CHECKS = ('PRAGMA main.table_info("dynamic_partitions")', 'PRAGMA main.table_xinfo("asset_keys")')


@pytest.mark.parametrize("cached", [True, False])
def test_schema_checks_are_answered_once_per_file(home: Path, statements: list[str], cached: bool) -> None:
    """Dagster checks the partitions table before each partition lookup and the asset_keys
    columns before each asset write; the CLI's storage asks each once per file and process."""
    with open_home(home, cached) as instance:
        materialize(instance, "a")
        statements.clear()
        materialize(instance, "b")
        checks = [s for s in statements if s in SCHEMA_CHECKS]
    # at most the creation of the new run's own file; Dagster's storage asks before each lookup
    assert len(checks) <= 1 if cached else len(checks) > 3, checks


def test_connections_to_wal_files_commit_without_waiting_for_the_disk(home: Path) -> None:
    """synchronous=NORMAL (1) on every pooled connection to a file in WAL mode: Dagster puts each
    of its files in WAL mode."""
    with open_home(home, cached=True) as instance:
        run_id = materialize(instance, "a")
        for _ in range(3):  # connections opened after each file's first
            instance.all_logs(run_id)
            partitions_materialized(instance)
        checked = 0
        for (conn_string, _), engine in list(sqlite_storage._engines.items()):
            if str(home) not in conn_string:
                continue
            with engine.connect() as conn:
                mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
                sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
            assert mode == "wal" and sync == 1, (conn_string, mode, sync)
            checked += 1
        assert checked >= 4


@pytest.mark.parametrize("other", ["cached", "dagster"])
def test_idle_pooled_connections_block_no_other_process(home: Path, other: str) -> None:
    """While this process holds idle connections to every file, another process (a forked
    child, on either storage) writes the same home, and this process reads its writes at once."""
    with open_home(home, cached=True) as instance:
        materialize(instance, "mine")
        for key in ("theirs", "again"):

            def write(key: str = key) -> bool:
                with open_home(home, cached=other == "cached") as theirs:
                    theirs.add_dynamic_partitions(items.name, [key])
                    return dg.materialize([item_score], instance=theirs, partition_key=key).success

            assert in_forked_child(write) == (True, 0)
            assert key in partitions_materialized(instance)
        materialize(instance, "mine-after")
        assert partitions_materialized(instance) == {"mine", "theirs", "again", "mine-after"}


def test_a_forked_child_opens_its_own_connections(home: Path) -> None:
    with open_home(home, cached=True) as instance:
        materialize(instance, "a")

        def read() -> list[str]:
            with open_home(home, cached=True) as theirs:
                return sorted(partitions_materialized(theirs))

        answer, exitcode = in_forked_child(read)
        assert answer == ["a"] and exitcode == 0
        materialize(instance, "b")  # the parent's connections still work
        assert partitions_materialized(instance) == {"a", "b"}


def test_wipe_drops_the_engines_before_deleting_the_files(home: Path) -> None:
    with open_home(home, cached=True) as instance:
        run_id = materialize(instance, "a")
        assert any(run_id in conn for conn, _ in sqlite_storage._engines)
        instance.wipe()
        assert instance.get_run_by_id(run_id) is None
        assert not any(run_id in conn for conn, _ in sqlite_storage._engines)  # its file is gone
        materialize(instance, "b")
        assert partitions_materialized(instance) == {"b"}


def schema_of(path: Path) -> tuple[list[tuple[str, str, str]], list[tuple[str]]]:
    """A SQLite file's tables and indexes, and its migration revision."""
    with sqlite3.connect(path) as conn:
        objects = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        revision = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    return objects, revision


def test_a_new_runs_event_file_is_a_copy_of_the_one_dagster_makes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, statements: list[str]
) -> None:
    """Dagster creates every table and stamps the revision in each new run's file (about 33 ms);
    the CLI's storage copies an empty file Dagster's code made once in this process."""
    files = {}
    for cached in (False, True):
        home = tmp_path / str(cached)
        home.mkdir()
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        with open_home(home, cached) as instance:
            materialize(instance, "a")
            statements.clear()
            run_id = materialize(instance, "b")
            created = [s for s in statements if s.startswith("CREATE TABLE")]
            assert (created == []) if cached else created, created
            assert len(instance.all_logs(run_id)) > 5
        files[cached] = home / "history" / "runs" / f"{run_id}.db"
    assert schema_of(files[True]) == schema_of(files[False])


def test_a_run_file_another_process_made_first_is_kept(home: Path) -> None:
    with open_home(home, cached=True) as instance:
        storage = instance.event_log_storage
        assert isinstance(storage, sqlite_storage.CachedEngineEventLogStorage)
        path = Path(storage.path_for_shard("theirs"))
        path.write_bytes(b"")
        assert not storage._create_from_template("theirs")
        assert path.read_bytes() == b""
        assert storage._create_from_template("mine")
        assert schema_of(Path(storage.path_for_shard("mine")))[1] != []
        assert not list(path.parent.glob("*.tmp"))


def test_without_hard_links_a_run_file_is_made_by_dagster(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(sqlite_storage.os, "link", refuse)
    with open_home(home, cached=True) as instance:
        run_id = materialize(instance, "a")
        assert len(instance.all_logs(run_id)) > 5
        assert not list((home / "history" / "runs").glob("*.tmp"))
