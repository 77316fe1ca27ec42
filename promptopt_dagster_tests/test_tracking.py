"""MlflowTracker against a SQLite store and against a real `mlflow server`, including an outage."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from promptopt_dagster.tracking import (
    CHAMPION_ALIAS,
    PENDING_PREFIX,
    MlflowTracker,
    TrackingError,
    experiment_name,
    prompt_name,
)
from promptopt_dagster_tests.support.mlflow_server import MlflowServer

FAKE_GOOGLE_TOKEN = "ya29." + "a0AfB_byC" * 5


@pytest.fixture(scope="module")
def sqlite_tracker(tmp_path_factory: pytest.TempPathFactory) -> MlflowTracker:
    root = tmp_path_factory.mktemp("mlflow-sqlite")
    return MlflowTracker(f"sqlite:///{root}/mlflow.db", outbox_path=root / "outbox.jsonl")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(f"sqlite:///{root}/mlflow.db", root / "artifacts") as server:
        yield server


def check_core(tracker: MlflowTracker, study: str) -> None:
    """What every store must do: experiment per study, parent + nested runs, metrics by step,
    params, tags, artifacts, idempotent run creation, prompt versions and the champion alias."""
    client = tracker.client
    parent = tracker.iteration_run(
        study, 3, params={"temperature": 0.0, "model": "qwen"}, tags={"stage": "x"}
    )
    assert not parent.startswith(PENDING_PREFIX)
    assert tracker.iteration_run(study, 3) == parent, "re-materializing must reuse the iteration run"
    other = tracker.iteration_run(study, 4)
    assert other != parent

    exp = client.get_experiment_by_name(experiment_name(study))
    assert exp is not None
    run = client.get_run(parent)
    assert run.info.experiment_id == exp.experiment_id
    assert run.info.run_name == "iteration-0003"
    assert run.data.params == {"temperature": "0.0", "model": "qwen"}
    assert run.data.tags["stage"] == "x"

    cand = tracker.candidate_run(parent, "abc123", params={"strategy": "shorten"})
    assert tracker.candidate_run(parent, "abc123") == cand
    assert tracker.candidate_run(parent, "def456") != cand
    cand_run = client.get_run(cand)
    assert cand_run.data.tags["mlflow.parentRunId"] == parent
    assert cand_run.data.tags["promptopt.iteration"] == "0003"
    assert cand_run.data.params["strategy"] == "shorten"

    for step, score in enumerate([0.2, 0.5, 0.7]):
        tracker.log_metrics(cand, {"exact_match": score, "f1": score / 2}, step=step)
    history = client.get_metric_history(cand, "exact_match")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.2),
        (1, 0.5),
        (2, 0.7),
    ]

    tracker.log_params(cand, {"long": "x" * 7000})
    assert len(client.get_run(cand).data.params["long"]) == 6000
    tracker.log_params(cand, {"strategy": "restate_task"})  # immutable: kept, warned, no exception
    assert client.get_run(cand).data.params["strategy"] == "shorten"

    tracker.set_tags(cand, {"accepted": True, "note": "better on val"})
    tracker.log_text(cand, "system: be brief", "prompt/system.txt")
    df = pd.DataFrame(
        {"input": ["1+1", "2+2"], "expected": ["2", "4"], "got": ["2", "5"], "score": [1.0, 0.0]}
    )
    tracker.log_table(cand, df, "predictions.json")
    tracker.log_table(cand, df, "predictions.json")  # replaced, not appended
    tracker.log_table(cand, df, "tables/predictions.parquet")
    tracker.end_run(cand, "FINISHED")

    run = client.get_run(cand)
    assert run.data.tags["accepted"] == "true" and run.data.tags["note"] == "better on val"
    assert run.info.status == "FINISHED"
    arts = {a.path for a in client.list_artifacts(cand)} | {
        a.path for a in client.list_artifacts(cand, "prompt")
    }
    assert {"predictions.json", "prompt/system.txt"} <= arts
    back = pd.read_json(client.download_artifacts(cand, "predictions.json", _tmp(tracker)), orient="split")
    assert len(back) == 2 and back["score"].tolist() == [1.0, 0.0]
    parquet = pd.read_parquet(client.download_artifacts(cand, "tables/predictions.parquet", _tmp(tracker)))
    assert parquet["got"].tolist() == ["2", "5"]
    assert {"path": "predictions.json", "type": "table"} in json.loads(
        run.data.tags["mlflow.loggedArtifacts"]
    )

    v1 = tracker.register_prompt(study, "You are precise.", "Q: {question}\nA:", "seed", tags={"score": 0.5})
    v2 = tracker.register_prompt(study, "", "Reply with only the number. Q: {question}", "iteration 1")
    assert (v1, v2) == (1, 2)
    assert tracker.load_champion(study) is None
    tracker.set_champion(study, v1)
    champ = tracker.load_champion(study)
    assert champ is not None and champ.version == 1
    assert (champ.system_prompt, champ.output_prompt) == ("You are precise.", "Q: {question}\nA:")
    assert champ.tags["score"] == "0.5" and champ.commit_message == "seed"
    tracker.set_champion(study, v2)
    champ = tracker.load_champion(study)
    assert champ is not None and (champ.version, champ.system_prompt) == (2, "")
    latest = tracker.load_prompt(study)
    assert latest is not None and latest.version == 2
    v3 = tracker.register_prompt(study, "s", "o {x}", champion=True)
    assert client.get_prompt_version_by_alias(prompt_name(study), CHAMPION_ALIAS).version == v3

    url = tracker.run_url(cand)
    assert url is not None and url.endswith(f"#/experiments/{exp.experiment_id}/runs/{cand}")


def _tmp(tracker: MlflowTracker) -> str:
    path = tracker.outbox_path.parent / f"dl-{time.monotonic_ns()}"
    path.mkdir(parents=True)
    return str(path)


def test_sqlite_store(sqlite_tracker: MlflowTracker) -> None:
    check_core(sqlite_tracker, "sqlite-study")
    assert sqlite_tracker.run_url(sqlite_tracker.iteration_run("sqlite-study", 3)).startswith(
        "#/experiments/"
    )
    assert sqlite_tracker.pending() == []


def test_studies_get_separate_experiments(sqlite_tracker: MlflowTracker) -> None:
    a = sqlite_tracker.iteration_run("study-a", 1)
    b = sqlite_tracker.iteration_run("study-b", 1)
    client = sqlite_tracker.client
    assert client.get_run(a).info.experiment_id != client.get_run(b).info.experiment_id
    assert prompt_name("study-a") != prompt_name("study-b")


def test_secrets_are_never_logged(sqlite_tracker: MlflowTracker, caplog: pytest.LogCaptureFixture) -> None:
    run = sqlite_tracker.iteration_run("secrets", 1)
    settings = {
        "GOOGLE_API_KEY": "AIza" + "x" * 35,
        "api_token": "abc",
        "db_password": "hunter2",
        "GOOGLE_APPLICATION_CREDENTIALS": "/home/me/sa.json",
        "clientSecret": "s3",
        "innocent_looking": FAKE_GOOGLE_TOKEN,
        "max_tokens": 64,
        "partition_key": "0001",
        "temperature": 0.2,
    }
    with caplog.at_level(logging.DEBUG):
        sqlite_tracker.log_params(run, settings)
        sqlite_tracker.set_tags(run, settings)
        sqlite_tracker.log_text(run, f"Authorization uses {FAKE_GOOGLE_TOKEN} here", "notes.txt")
        sqlite_tracker.log_table(run, pd.DataFrame({"api_key": ["k"], "x": [1]}), "t.json")
    data = sqlite_tracker.client.get_run(run).data
    assert set(data.params) == {"max_tokens", "partition_key", "temperature"}
    assert {"max_tokens", "partition_key", "temperature"} <= set(data.tags)
    assert not {"GOOGLE_API_KEY", "api_token", "db_password", "clientSecret", "innocent_looking"} & set(
        data.tags
    )
    text = Path(sqlite_tracker.client.download_artifacts(run, "notes.txt", _tmp(sqlite_tracker))).read_text()
    assert FAKE_GOOGLE_TOKEN not in text and "[REDACTED]" in text
    table = Path(sqlite_tracker.client.download_artifacts(run, "t.json", _tmp(sqlite_tracker))).read_text()
    assert "api_key" not in table
    for value in ("hunter2", FAKE_GOOGLE_TOKEN, "AIza" + "x" * 35, "/home/me/sa.json"):
        assert value not in caplog.text


def test_bad_inputs_fail_clearly(sqlite_tracker: MlflowTracker) -> None:
    with pytest.raises(TrackingError, match="cannot name an MLflow run"):
        sqlite_tracker.candidate_run("whatever", "bad id with 'quotes'")
    run = sqlite_tracker.iteration_run("bad-inputs", 1)
    with pytest.raises(TrackingError, match=r"\.json or \.parquet"):
        sqlite_tracker.log_table(run, pd.DataFrame({"a": [1]}), "table.csv")
    with pytest.raises(TrackingError, match="FINISHED"):
        sqlite_tracker.end_run(run, "DONE")


def test_sklearn_model_logged_to_tracker_uri_and_globals_restored(
    sqlite_tracker: MlflowTracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from sklearn.linear_model import LinearRegression

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:///nonexistent/elsewhere")
    before = mlflow.get_tracking_uri()
    run = sqlite_tracker.iteration_run("model-log", 1)
    sqlite_tracker.log_sklearn_model(run, LinearRegression().fit([[0.0], [1.0]], [0.0, 1.0]), name="lr")
    assert mlflow.get_tracking_uri() == before
    assert os.environ["MLFLOW_TRACKING_URI"] == "file:///nonexistent/elsewhere"
    models = sqlite_tracker.client.search_logged_models(
        experiment_ids=[sqlite_tracker.experiment_id("model-log")]
    )
    assert [m.name for m in models] == ["lr"] and models[0].source_run_id == run


@pytest.mark.e2e
def test_server_store(mlflow_server: MlflowServer) -> None:
    tracker = MlflowTracker(
        mlflow_server.url, outbox_path=Path(mlflow_server.artifacts_destination) / "ob.jsonl"
    )
    check_core(tracker, "server-study")
    assert tracker.run_url(tracker.iteration_run("server-study", 3)).startswith(
        f"{mlflow_server.url}/#/experiments/"
    )
    assert requests.get(f"{mlflow_server.url}/health", timeout=5).status_code == 200
    # the artifacts went through the server's proxy into --artifacts-destination
    assert list(Path(mlflow_server.artifacts_destination).rglob("predictions.json"))


@pytest.mark.e2e
def test_outage_queues_then_replays(
    mlflow_server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = MlflowTracker(mlflow_server.url, outbox_path=tmp_path / "outbox.jsonl", retry_after_s=60)
    before = tracker.iteration_run("outage", 1)
    tracker.log_metrics(before, {"score": 0.1}, step=0)

    mlflow_server.stop()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        same = tracker.iteration_run("outage", 1)  # exists on the server, but we cannot know yet
        new = tracker.iteration_run("outage", 2, params={"k_candidates": 4})
        assert tracker.iteration_run("outage", 2) == new, "idempotent while queued too"
        cand = tracker.candidate_run(new, "c1", params={"strategy": "shorten"})
        tracker.log_metrics(cand, {"score": 0.9}, step=2)
        tracker.log_metrics(before, {"score": 0.4}, step=1)
        tracker.log_table(cand, pd.DataFrame({"got": ["a"], "score": [1.0]}), "predictions.json")
        tracker.end_run(cand, "FINISHED")
        assert tracker.register_prompt("outage", "sys", "out {q}", "queued", champion=True) is None
        from sklearn.dummy import DummyRegressor

        tracker.log_sklearn_model(cand, DummyRegressor().fit([[0.0]], [0.5]), name="meta_model")
    assert time.monotonic() - started < 10, "an outage must not block the pipeline"
    assert all(x.startswith(PENDING_PREFIX) for x in (same, new, cand))
    assert len(tracker.pending()) == 9
    assert "queued" in caplog.text and "outbox.jsonl" in caplog.text
    assert tracker.run_url(cand) is None
    assert tracker.flush() == 0  # still down: nothing replayed, nothing lost
    with pytest.raises(TrackingError, match="unreachable"):
        tracker.load_champion("outage")

    mlflow_server.start()
    assert tracker.flush() == 9
    assert tracker.pending() == []
    assert tracker.resolve(same) == before, "replayed creation found the existing run"
    real_new, real_cand = tracker.resolve(new), tracker.resolve(cand)
    assert not real_cand.startswith(PENDING_PREFIX)
    client = tracker.client
    assert client.get_run(real_new).data.params == {"k_candidates": "4"}
    cand_run = client.get_run(real_cand)
    assert cand_run.data.tags["mlflow.parentRunId"] == real_new
    assert cand_run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(real_cand, "score")] == [0.9]
    assert sorted(m.value for m in client.get_metric_history(before, "score")) == [0.1, 0.4]
    assert "predictions.json" in {a.path for a in client.list_artifacts(real_cand)}
    champ = tracker.load_champion("outage")
    assert champ is not None and champ.output_prompt == "out {q}"
    assert [m.name for m in client.search_logged_models([tracker.experiment_id("outage")])] == ["meta_model"]
    # placeholders keep working after the replay, also in a fresh tracker sharing the outbox
    tracker.log_metrics(cand, {"score": 1.0}, step=3)
    assert len(client.get_metric_history(real_cand, "score")) == 2
    other = MlflowTracker(mlflow_server.url, outbox_path=tmp_path / "outbox.jsonl")
    assert other.resolve(cand) == real_cand


def test_unreachable_server_is_detected_fast(tmp_path: Path) -> None:
    from promptopt_dagster_tests.support.server_process import free_port as _free_port

    tracker = MlflowTracker(f"http://127.0.0.1:{_free_port()}", outbox_path=tmp_path / "ob.jsonl")
    started = time.monotonic()
    run = tracker.iteration_run("nowhere", 1)
    tracker.log_metrics(run, {"a": 1.0})
    assert time.monotonic() - started < 5
    assert run.startswith(PENDING_PREFIX) and len(tracker.pending()) == 2
    assert tracker.flush() == 0 and len(tracker.pending()) == 2
