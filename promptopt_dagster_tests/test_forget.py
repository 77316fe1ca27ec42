"""Forgetting a study: one operation on a real SQLite instance with real runs, never reaching
outside the store, and a forget cut short is finished later without a stale report."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from promptopt_dagster.core import prompt_store as prompt_store_module
from promptopt_dagster.driver import drive, forget_study, study_state
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.partitions import parse_key, study_iteration_key, study_iteration_keys
from promptopt_dagster.storage import UnsafePathError, join
from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline
from promptopt_dagster_tests.support.postgres import postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def instance_pipeline(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pipeline]:
    """The scripted pipeline on a persistent instance: SQLite, or a real PostgreSQL server."""
    if request.param == "sqlite":
        (tmp_path / "dagster_home").mkdir()
        with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as instance:
            yield make_pipeline(tmp_path, instance)
    else:
        url = request.getfixturevalue("postgres_db_url")
        with postgres_instance(url, tmp_path / "dagster_home") as instance:
            yield make_pipeline(tmp_path, instance)


def _run_to_the_end(p: Pipeline) -> None:
    p.store.register_study(p.study)
    drive(p.defs, p.instance, p.study.name)


@pytest.mark.e2e
def test_forget_then_rerun_starts_from_nothing_and_reports_anew(instance_pipeline: Pipeline) -> None:
    p = instance_pipeline
    _run_to_the_end(p)
    first_registration = p.store.registration_id("scripted")
    latest, reported = study_state(p.instance, p.store, "scripted")
    assert reported and latest is not None and latest.stop
    old_runs = len(p.instance.get_runs())

    forget_study(p.defs, p.instance, "scripted")

    assert p.store.studies() == []
    assert not (p.root / "studies" / "scripted").exists()
    assert not (p.root / "prompts" / "scripted").exists()
    assert "scripted" not in p.instance.get_dynamic_partitions("study")
    assert study_iteration_keys(p.instance, "scripted") == []  # its iterations leave the UI too
    assert len(p.instance.get_runs()) == old_runs  # run history is kept

    p.store.register_study(p.study)
    assert p.store.registration_id("scripted") != first_registration
    # The old materializations belong to the old registration: nothing counts as done.
    assert study_state(p.instance, p.store, "scripted") == (None, False)
    result = drive(p.defs, p.instance, "scripted")
    iterations = [r.partition_key for r in result.runs if r.job == "iteration_job"]
    assert parse_key(iterations[0]) == ("scripted", 0)  # from iteration 0 again
    assert result.runs[-1].job == "report_job"
    latest, reported = study_state(p.instance, p.store, "scripted")
    assert reported and latest is not None and latest.stop
    assert study_iteration_keys(p.instance, "scripted") == iterations


@pytest.mark.e2e
def test_a_forget_cut_short_reads_as_forgotten_and_is_finished_by_the_next_register(
    instance_pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = instance_pipeline
    _run_to_the_end(p)
    real_delete = prompt_store_module.delete
    deleted: list[str] = []

    def failing_delete(uri: str, missing_ok: bool = True) -> None:
        if len(deleted) == 2:
            raise OSError("disk went away")
        deleted.append(uri)
        real_delete(uri, missing_ok)

    monkeypatch.setattr(prompt_store_module, "delete", failing_delete)
    with pytest.raises(OSError):
        forget_study(p.defs, p.instance, "scripted")
    monkeypatch.setattr(prompt_store_module, "delete", real_delete)

    # Half the files are still there, yet the study reads as not registered: nothing can resume
    # it or print its old report.
    assert (p.root / "studies" / "scripted").exists()
    assert p.store.studies() == []
    assert not p.store.is_registered("scripted")
    with pytest.raises(StudyConfigError, match="not registered"):
        p.store.load_study("scripted")
    assert drive(p.defs, p.instance, "scripted").runs == []

    assert p.store.register_study(p.study)  # finishes the removal, then registers anew
    assert p.store.records("scripted") == []
    assert not (p.root / "studies" / "scripted" / "forgotten").exists()
    result = drive(p.defs, p.instance, "scripted")
    assert parse_key(result.runs[0].partition_key) == ("scripted", 0)
    assert result.runs[-1].job == "report_job"


@pytest.mark.e2e
def test_forgetting_an_unknown_study_is_an_error_and_changes_nothing(pipeline: Pipeline) -> None:
    p = pipeline
    _run_to_the_end(p)
    before = sorted(str(f) for f in p.root.rglob("*"))
    with pytest.raises(StudyConfigError, match="no study named 'other'.*registered: scripted"):
        forget_study(p.defs, p.instance, "other")
    assert sorted(str(f) for f in p.root.rglob("*")) == before
    assert p.store.studies() == ["scripted"]


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["..", "../..", "../../..", "a/../..", "/etc", "Scripted", "x" * 80, ""])
def test_names_that_are_not_study_names_are_refused_before_any_file_is_touched(
    pipeline: Pipeline, name: str
) -> None:
    p = pipeline
    _run_to_the_end(p)
    outside = p.root.parent / "neighbour.txt"
    outside.write_text("keep me")
    before = sorted(str(f) for f in p.root.parent.rglob("*"))
    with pytest.raises(StudyConfigError, match="is not a study name"):
        forget_study(p.defs, p.instance, name)
    with pytest.raises(StudyConfigError, match="is not a study name"):
        p.store.load_record(name, 0)
    assert sorted(str(f) for f in p.root.parent.rglob("*")) == before
    assert outside.read_text() == "keep me"


def test_paths_built_from_names_stay_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    assert join(str(root), "studies", "a", "x.json") == str(root / "studies" / "a" / "x.json")
    for parts in [("..",), ("a", "..", ".."), ("/etc/passwd",), ("gs://other/x",), ("",)]:
        with pytest.raises(UnsafePathError):
            join(str(root), *parts)
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError):
        join(str(root), "link", "secret")
    with pytest.raises(UnsafePathError):
        join("gs://bucket/prefix", "..", "other")


@pytest.mark.e2e
def test_instance_without_partition_wipe_support_is_enough(instance_pipeline: Pipeline) -> None:
    """Dagster's SQL storages cannot wipe partitions; forgetting must not need it."""
    p = instance_pipeline
    _run_to_the_end(p)
    with pytest.raises(NotImplementedError):
        p.instance.wipe_asset_partitions(dg.AssetKey("iteration_decision"), ["x"])
    forget_study(p.defs, p.instance, "scripted")
    assert p.store.studies() == []


def test_iteration_partitions_a_cut_short_forget_left_are_removed_when_the_study_runs_again(
    pipeline: Pipeline,
) -> None:
    """A forget cut short before it reached Dagster leaves the old iteration partitions; the
    study's next registration starts at iteration 0 with only that partition."""
    p = pipeline
    _run_to_the_end(p)
    assert study_iteration_keys(p.instance, "scripted") == ["scripted:0000", "scripted:0001"]
    p.store.begin_forget("scripted")  # then the process died: Dagster was never told
    p.store.register_study(p.study)  # finishes the removal of the files, registers anew

    result = drive(p.defs, p.instance, "scripted", max_runs=1)

    assert [r.partition_key for r in result.runs] == [study_iteration_key("scripted", 0)]
    assert study_iteration_keys(p.instance, "scripted") == [study_iteration_key("scripted", 0)]
