"""Dynamic partition lookups (partition_membership.py) on both storages the CLI writes: a yes
is asked once per TTL, a no every time, and a delete made here is seen at once."""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from promptopt_dagster import partition_membership
from promptopt_dagster.instance_config import sqlite_storage as sqlite_storage_entry
from promptopt_dagster_tests.support.postgres import postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
    postgres_url,  # noqa: F401
)

NAME = "membership_test"


@pytest.fixture
def lookups() -> Iterator[list[str]]:
    """Every partition lookup statement any engine of this process executes."""
    seen: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        flat = " ".join(statement.split())
        if flat.startswith("SELECT dynamic_partitions.partition FROM dynamic_partitions"):
            seen.append(flat)

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    yield seen
    sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    moment = [1000.0]
    monkeypatch.setattr(partition_membership, "clock", lambda: moment[0])
    return moment


def sqlite_home(home: Path, cached: bool) -> dg.DagsterInstance:
    config: dict = {"telemetry": {"enabled": False}}
    if cached:
        config["storage"] = sqlite_storage_entry()
    home.mkdir(exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return dg.DagsterInstance.from_config(str(home))


def sqlite_pair(tmp_path: Path) -> tuple[dg.DagsterInstance, dg.DagsterInstance]:
    """The CLI's storage, and Dagster's own on the same files (standing for another process)."""
    return sqlite_home(tmp_path, cached=True), sqlite_home(tmp_path, cached=False)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def test_a_yes_is_kept_a_no_is_not_and_deletes_are_seen(
    backend: str, tmp_path: Path, lookups: list[str], now: list[float], request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        url = request.getfixturevalue("postgres_db_url")
        mine = postgres_instance(url, tmp_path / "mine")
        # dagster-postgres' own storage on the same database
        (tmp_path / "theirs").mkdir()
        config = {"storage": {"postgres": {"postgres_url": url}}, "telemetry": {"enabled": False}}
        (tmp_path / "theirs" / "dagster.yaml").write_text(yaml.safe_dump(config))
        theirs = dg.DagsterInstance.from_config(str(tmp_path / "theirs"))
    else:
        mine, theirs = sqlite_pair(tmp_path)
    with mine, theirs:
        mine.add_dynamic_partitions(NAME, ["a"])
        lookups.clear()
        assert all(mine.has_dynamic_partition(NAME, "a") for _ in range(10))
        assert len(lookups) == 1

        assert not mine.has_dynamic_partition(NAME, "b")
        theirs.add_dynamic_partitions(NAME, ["b"])
        assert mine.has_dynamic_partition(NAME, "b")  # a no was not kept

        mine.delete_dynamic_partition(NAME, "a")
        assert not mine.has_dynamic_partition(NAME, "a")  # its own delete: at once

        theirs.delete_dynamic_partition(NAME, "b")
        assert mine.has_dynamic_partition(NAME, "b")  # another's delete: within the TTL, still yes
        now[0] += partition_membership.MEMBERSHIP_TTL_S
        assert not mine.has_dynamic_partition(NAME, "b")
        assert mine.get_dynamic_partitions(NAME) == []


def test_wipe_forgets_the_partitions_seen(tmp_path: Path, now: list[float]) -> None:
    with sqlite_home(tmp_path, cached=True) as instance:
        instance.add_dynamic_partitions(NAME, ["a"])
        assert instance.has_dynamic_partition(NAME, "a")
        instance.wipe()
        assert not instance.has_dynamic_partition(NAME, "a")
