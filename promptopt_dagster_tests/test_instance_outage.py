"""The Dagster instance's PostgreSQL server restarted, or stopped, in the middle of a study run
by `promptopt run` (scripted LLM, DAGSTER_PG_URL on a real server): the study either rides
through or fails cleanly, and a second `promptopt run` finishes it with the decisions of an
undisturbed run and without asking the model again for what it already answered."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from promptopt_dagster import cli
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.settings import get_settings
from promptopt_dagster.tracking.layout import experiment_name
from promptopt_dagster_tests.support import scripted as scripted_module
from promptopt_dagster_tests.support.postgres import PASSWORD, PostgresServer, database_name
from promptopt_dagster_tests.support.postgres_fixtures import postgres_server  # noqa: F401
from promptopt_dagster_tests.support.scripted import write_study
from promptopt_dagster_tests.support.scripted_cli import (
    ANSWERED_ENV,
    BLOCK_AT_ENV,
    BLOCKED_ENV,
    RELEASE_ENV,
    child_failure,
    start_blocked_child,
    use_scripted_llm,
    wait_for_marker,
)
from promptopt_dagster_tests.support.scripted_cli import answered_keys as answered_keys_in

pytestmark = pytest.mark.e2e

FAULT_AT_CALL = 3  # the primary call (of iteration 0's baseline batch) during which the fault hits


def decisions(home: Path) -> list[tuple[object, ...]]:
    records = PromptStore(str(home / "store")).records("scripted")
    return [
        (r.iteration, r.accepted, r.accepted_id, r.champion_val_score, r.stop, r.stop_reason) for r in records
    ]


def answered_keys(home: Path) -> list[str]:
    """Cache keys of the requests the scripted primary model answered for runs under `home`."""
    return [
        request.cache_key(client.backend, client.model)
        for (cache, role), client in scripted_module._CLIENTS.items()
        if cache.startswith(str(home)) and role == "primary"
        for request in client.requests
    ]


@pytest.fixture
def on_postgres(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,  # noqa: F811
) -> Iterator[Callable[[str], Path]]:
    """Returns `home(name)`: a fresh PROMPTOPT_HOME whose Dagster instance is a fresh database
    on the server, with the scripted LLM."""
    use_scripted_llm(monkeypatch)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    databases: list[str] = []

    def home(name: str) -> Path:
        url = postgres_server.create_database(template=postgres_server.dagster_template())
        databases.append(database_name(url))
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        monkeypatch.setenv("PROMPTOPT_HOME", str(tmp_path / name))
        get_settings.cache_clear()
        return tmp_path / name

    yield home
    get_settings.cache_clear()
    postgres_server.start()  # whatever a test did to it, the next test gets a running server
    for name in databases:
        postgres_server.drop_database(name)


def fault_in_primary_call(monkeypatch: pytest.MonkeyPatch, fault: Callable[[], None]) -> threading.Event:
    """Make the FAULT_AT_CALL-th primary call run `fault` before it answers; the event is set
    once it has."""
    answer, calls, done = scripted_module.primary_responder, [0], threading.Event()

    def primary(request: ChatRequest) -> str:
        calls[0] += 1
        if calls[0] == FAULT_AT_CALL:
            fault()
            done.set()
        return answer(request)

    monkeypatch.setattr(scripted_module, "primary_responder", primary)
    return done


def run_clean(on_postgres: Callable[[str], Path], study: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    clean = on_postgres("clean")
    assert cli.main(["run", str(study)]) == 0
    capsys.readouterr()
    assert len(decisions(clean)) == 2
    return clean


def assert_finished_cleanly(home: Path) -> None:
    """No run left started, each iteration decided once, one MLflow run per iteration."""
    with dg.DagsterInstance.get() as instance:
        assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        decided = instance.get_materialized_partitions(dg.AssetKey("iteration_decision"))
        assert decided == {"scripted:0000", "scripted:0001"}
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(experiment_name("scripted"))
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`promptopt.kind` = 'iteration'")
    assert sorted(r.info.run_name for r in runs) == ["iteration-0000", "iteration-0001"]


def test_a_postgres_restart_inside_an_llm_call_is_ridden_through(
    on_postgres: Callable[[str], Path],
    postgres_server: PostgresServer,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    study = write_study(tmp_path, max_iterations=2)
    clean = run_clean(on_postgres, study, capsys)

    home = on_postgres("restarted")
    old_pid = postgres_server.pid
    restarted = fault_in_primary_call(monkeypatch, postgres_server.restart)
    assert cli.main(["run", str(study)]) == 0, capsys.readouterr().err

    assert restarted.is_set() and postgres_server.pid != old_pid
    assert decisions(home) == decisions(clean)
    assert_finished_cleanly(home)
    assert len(answered_keys(home)) == len(set(answered_keys(home)))  # nothing asked twice


def test_postgres_down_while_a_run_writes_fails_it_cleanly_and_the_next_run_finishes_the_study(
    on_postgres: Callable[[str], Path],
    postgres_server: PostgresServer,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server stops while a `promptopt run` child waits in an LLM call; the call then
    answers, and the run's next writes find no database. The child must end with one clear
    error; a second `promptopt run`, once the server is back, finishes the study."""
    study = write_study(tmp_path, max_iterations=2)
    clean = run_clean(on_postgres, study, capsys)

    home = on_postgres("outage")
    marker, release, answered = tmp_path / "blocked", tmp_path / "release", tmp_path / "answered.txt"
    env = {**os.environ, BLOCKED_ENV: str(marker), BLOCK_AT_ENV: str(FAULT_AT_CALL),
           RELEASE_ENV: str(release), ANSWERED_ENV: str(answered)}
    child = start_blocked_child(study, env)
    try:
        wait_for_marker(marker, child_failure(child))
        postgres_server.stop()
        release.touch()
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        postgres_server.start()
    assert child.returncode != 0, "the child wrote through a stopped database: this tests no outage"
    assert "error: the Dagster instance's database failed" in err and "promptopt run` again" in err, err
    assert "Traceback" not in err and PASSWORD not in err
    paid_for = answered_keys_in(answered)
    assert len(paid_for) >= FAULT_AT_CALL

    assert cli.main(["run", str(study)]) == 0, capsys.readouterr().err
    assert "was left unfinished" in capsys.readouterr().err
    assert decisions(home) == decisions(clean)
    assert_finished_cleanly(home)
    asked_again = answered_keys(home)
    assert asked_again and not set(paid_for) & set(asked_again), "the model was asked again"
