"""MLflow tracking, the Prompt Registry and the meta-model wired into the Dagster graph: the
scripted pipeline driven through the sensors against a SQLite store and a real `mlflow server`,
an outage that loses nothing, and the optimizer with and without the meta-model."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from promptopt_dagster.core.meta_model import (
    MetaModel,
    history_from_store,
    load_from_store,
    ranker_for,
    ranking_plan,
    save_to_store,
)
from promptopt_dagster.core.proposal import propose_candidates
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.definitions import ASSETS, TRACKING_ASSETS
from promptopt_dagster.driver import drive
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.tracking import (
    CHAMPION_ALIAS,
    MlflowTracker,
    experiment_name,
    mlflow_global_uris,
    prompt_name,
)
from promptopt_dagster_tests.support.mlflow_server import MlflowServer
from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline, with_tracking
from promptopt_dagster_tests.support.scripted import optimizer_responder, primary_responder


def pipeline_in(folder: Path, instance: dg.DagsterInstance, **overrides: object) -> Pipeline:
    folder.mkdir(parents=True, exist_ok=True)
    return make_pipeline(folder, instance, **overrides)  # type: ignore[arg-type]


def latest_metadata(p: Pipeline, asset: str, study: str, iteration: int) -> dict[str, object]:
    [record] = p.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=[str(study_iteration_key(study, iteration))]
        ),
        limit=1,
    ).records
    assert record.asset_materialization is not None
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@pytest.fixture(autouse=True)
def _fast_mlflow_http_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """What MlflowTrackerResource sets for servers, set here so the test leaves no global behind."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(f"sqlite:///{root}/mlflow.db", root / "artifacts") as server:
        yield server


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (a new MLflow schema costs seconds); studies differ by name."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow-sqlite') / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", pytest.param("server", marks=pytest.mark.e2e)])
def tracking_uri(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_uri"))
    return str(request.getfixturevalue("mlflow_server").url)


@pytest.mark.e2e
def test_the_driven_study_is_in_mlflow_runs_metrics_artifacts_and_prompt_registry(
    pipeline: Pipeline, tracking_uri: str, tmp_path: Path
) -> None:
    # Studies share the server's store: a name of its own keeps the assertions exact.
    name = f"tracked_{tmp_path.name[-12:].lower().replace('-', '_')}".strip("_")
    p = pipeline_in(tmp_path / "p", pipeline.instance, name=name)
    p = with_tracking(p, tracking_uri, tmp_path / "outbox.jsonl")
    p.store.register_study(p.study)
    result = drive(p.defs, p.instance, name)
    assert [r.job for r in result.runs] == ["iteration_job", "iteration_job", "report_job"]
    records = p.store.records(name)

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name(name))
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = sorted(
        (r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.run_name
    )
    assert [r.info.run_name for r in parents] == ["iteration-0000", "iteration-0001"]
    for iteration, (parent, record) in enumerate(zip(parents, records, strict=True)):
        assert parent.info.status == "FINISHED"
        params, tags = parent.data.params, parent.data.tags
        assert params["iteration"] == str(iteration)
        assert params["prompt_id"] == record.incumbent_id
        assert len(params["prompt_hash"]) == 16
        assert params["temperature"] == "0.0" and params["primary_model"].startswith("local:")
        assert params["study.target_metric"] == "exact_match" and params["study.patience"] == "1"
        assert tags["dagster.partition"] == str(study_iteration_key(name, iteration))
        assert tags["dagster.asset_key"] == "iteration_tracking"
        assert p.instance.get_run_by_id(tags["dagster.run_id"]) is not None
        # metrics on every split, usage, the decision and the bandit, all at step = iteration
        for key in (
            "incumbent.val.exact_match",
            "incumbent.train.f1",
            "llm_calls",
            "llm_tokens",
            "llm_cost_usd",
            "llm_latency_mean_s",
            "val_score",
            "bandit.add_format_rule.pulls",
            "bandit.add_format_rule.mean_reward",
        ):
            assert key in parent.data.metrics, key
            [point] = client.get_metric_history(parent.info.run_id, key)
            assert point.step == iteration
        assert parent.data.metrics["val_score"] == pytest.approx(record.champion_val_score)
        assert parent.data.metrics["llm_calls"] == record.calls
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "prompts")}
        artifacts |= {a.path for a in client.list_artifacts(parent.info.run_id, "optimizer")}
        assert {
            "predictions.json",
            "prompts/incumbent.json",
            "prompts/champion.json",
            "optimizer/failures.json",
            "bandit.json",
        } <= artifacts
        failures = json.loads(
            Path(
                client.download_artifacts(parent.info.run_id, "optimizer/failures.json", str(tmp_path))
            ).read_text()
        )
        assert {c["candidate_id"] for c in failures["proposals"]} == {
            c.candidate_id for c in record.candidates
        }
        assert all(c["rationale"] for c in failures["proposals"])
        if iteration == 0:
            assert failures["failures"] and "expected" in failures["failures"][0]
        table = json.loads(
            Path(client.download_artifacts(parent.info.run_id, "predictions.json", str(tmp_path))).read_text()
        )
        assert {"prediction", "reference", "score", "exact_match"} <= set(table["columns"])

        # nested runs: one per candidate, scored per split at the same step
        nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert {r.data.params["prompt_id"] for r in nested} == {c.candidate_id for c in record.candidates}
        for run in nested:
            assert run.data.params["parent_id"] == record.incumbent_id
            assert run.data.params["system_prompt"] is not None and run.data.tags["promptopt.strategy"]
            [train] = client.get_metric_history(run.info.run_id, "train.exact_match")
            assert train.step == iteration
            assert "predictions.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
            assert 1 <= run.data.metrics["screened_rows"] <= p.study.minibatch_size
        accepted = [r for r in nested if r.data.metrics["accepted"] == 1.0]
        assert len(accepted) == int(record.accepted)
        if record.accepted:
            assert accepted[0].data.metrics["val_score"] == pytest.approx(record.champion_val_score)

    # Prompt Registry: the seed, then the accepted prompt, with champion on the best
    versions = client.search_prompt_versions(prompt_name(name))
    versions = sorted(getattr(versions, "prompt_versions", versions), key=lambda v: int(v.version))
    assert versions[0].commit_message.startswith("seed prompt, val ")
    assert len(versions) == 1 + sum(r.accepted for r in records)
    assert all("val_score" in v.tags for v in versions)
    # What a user does to ship it (the URIs set for this block only: no ./mlflow.db left behind).
    with mlflow_global_uris(tracking_uri, tracking_uri):
        shipped = mlflow.genai.load_prompt(f"prompts:/{prompt_name(name)}@{CHAMPION_ALIAS}")
    champion = records[-1].champion
    assert shipped.template[0]["content"] == champion.system_prompt
    assert shipped.template[-1]["content"] == champion.output_prompt
    accepted_at = max(r.iteration for r in records if r.accepted)
    proposals = p.defs.load_asset_value(
        "candidate_prompts", partition_key=str(study_iteration_key(name, accepted_at)), instance=p.instance
    )["candidates"]
    winner = next(c for c in proposals if c["prompt"]["id"] == records[accepted_at].accepted_id)
    head, _, body = shipped.commit_message.partition("\n\n")
    assert head.startswith(f"iteration {accepted_at}: {winner['strategy']}") and " → " in head
    assert body == winner["rationale"].strip()

    # Re-materializing the tracking step reuses its runs and registers no duplicate version.
    dg.materialize(
        [*ASSETS, *TRACKING_ASSETS],
        selection=["iteration_tracking"],
        partition_key=str(study_iteration_key(name, 1)),
        instance=p.instance,
        resources=dict(p.defs.resources),
    )
    again = client.search_runs([exp.experiment_id], max_results=100)
    assert len(again) == len(runs)
    versions_again = client.search_prompt_versions(prompt_name(name))
    assert len(getattr(versions_again, "prompt_versions", versions_again)) == len(versions)

    # Dagster metadata links to the run; the meta-model was retrained and logged
    meta = latest_metadata(p, "iteration_tracking", name, 1)
    assert str(meta["mlflow_run"]).endswith(f"/runs/{parents[1].info.run_id}")
    assert meta["mlflow_status"] == "logged"
    mm = latest_metadata(p, "meta_model", name, 1)
    assert mm["rows"] == sum(len(r.candidates) for r in records)
    assert "cv_status" in mm and "mlflow_run" in mm


@pytest.mark.e2e
def test_an_mlflow_outage_loses_nothing_and_is_replayed(
    pipeline: Pipeline, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    mlflow_server.stop()  # down for the whole study: it still finishes, its writes queued
    try:
        p = with_tracking(pipeline, mlflow_server.url, tmp_path / "outbox.jsonl")
        p.store.register_study(p.study)
        result = drive(p.defs, p.instance, "scripted")
        assert [r.job for r in result.runs] == ["iteration_job", "iteration_job", "report_job"]
        assert p.store.records("scripted")[-1].stop  # the optimization itself is complete
        meta = latest_metadata(p, "iteration_tracking", "scripted", 1)
        assert "queued" in str(meta["mlflow_status"]) and meta["mlflow_run"] == "queued (MLflow unreachable)"
        tracker = MlflowTracker(mlflow_server.url, outbox_path=tmp_path / "outbox.jsonl")
        queued = len(tracker.pending())
        assert queued > 10
    finally:
        mlflow_server.start()  # back on the same port: the outbox is replayed in order
    assert tracker.flush() == queued and tracker.pending() == []
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    exp = client.get_experiment_by_name(experiment_name("scripted"))
    runs = client.search_runs([exp.experiment_id])
    assert {r.info.run_name for r in runs} >= {"iteration-0000", "iteration-0001"}
    champion = tracker.load_champion("scripted")
    assert champion is not None
    assert champion.system_prompt == p.store.records("scripted")[-1].champion.system_prompt


# --- the optimizer with and without the meta-model ---------------------------------------------


def fitted_model(rows: int = 40) -> MetaModel:
    """A meta-model that learnt 'naming the labels helps' (the scripted primary model's rule)."""
    rng = random.Random(0)
    history = []
    for i in range(rows):
        names_labels = i % 2 == 0
        system = rng.choice(["Classify the review.", "Be brief.", "Read carefully."])
        if names_labels:
            system += " Answer with exactly one of: negative, positive."
        history.append(
            {
                "study": f"s{i % 3}",
                "system_prompt": system,
                "output_prompt": "{review}",
                "parent_score": 0.0,
                "score": (0.9 if names_labels else 0.1) + rng.gauss(0, 0.03),
            }
        )
    model = MetaModel().fit(pd.DataFrame(history))
    model.cross_validate()
    return model


def test_propose_candidates_without_a_ranker_is_unchanged_and_with_one_keeps_the_best(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    data = load_study_data(p.study)
    incumbent = p.study.seed_prompt_state()
    rows = data.iteration_rows(0)
    # a non-zero incumbent: at zero the optimizer widens its search (see the pipeline test below)
    scored = rows.assign(prediction="meh", reference=rows["label"], score=0.5)
    optimizer = p.llm.inner("optimizer")
    plain = propose_candidates(optimizer, data, incumbent, scored, [], 0)
    again = propose_candidates(optimizer, data, incumbent, scored, [], 0, ranker=None, overgenerate=3)
    assert [c.prompt.id for c in again.candidates] == [c.prompt.id for c in plain.candidates]
    assert len(plain.candidates) == p.study.candidates_per_iteration

    model = fitted_model()
    ranked = propose_candidates(
        optimizer,
        data,
        incumbent,
        scored,
        [],
        0,
        ranker=ranker_for(model, 0.0),
        overgenerate=2,
        keep=1,
    )
    [best] = ranked.candidates
    assert "one of:" in best.prompt.system_prompt  # the candidate that actually helps
    assert best.prompt.metadata["predicted_score"] > 0.5


@pytest.mark.e2e
def test_pipeline_with_a_trusted_meta_model_screens_fewer_candidates(tmp_path: Path) -> None:
    def first_iteration(folder: Path, with_model: bool) -> tuple[dict[str, object], dict[str, object]]:
        with dg.instance_for_test() as instance:
            p = pipeline_in(folder, instance, cache_enabled=False, candidates_per_iteration=4)
            p.llm.inner("primary").responder = primary_responder
            p.llm.inner("optimizer").responder = optimizer_responder
            if with_model:
                save_to_store(
                    fitted_model(),
                    str(p.root),
                    {"useful": True, "min_spearman": 0.3, "overgenerate": 2, "keep_fraction": 0.5},
                )
            p.store.register_study(p.study)
            drive(p.defs, p.instance, "scripted", max_runs=1)
            return (
                latest_metadata(p, "candidate_prompts", "scripted", 0),
                latest_metadata(p, "candidate_predictions", "scripted", 0),
            )

    plain_prompts, plain_preds = first_iteration(tmp_path / "plain", with_model=False)
    ranked_prompts, ranked_preds = first_iteration(tmp_path / "ranked", with_model=True)
    # the seed scores zero, so the plain optimizer widens its search beyond 4
    assert plain_prompts["count"] > 4 and plain_prompts["meta_model"] == "no meta-model yet"
    assert ranked_prompts["count"] == 2 and str(ranked_prompts["meta_model"]).startswith("meta-model ranks")
    assert int(ranked_preds["llm_calls"]) < int(plain_preds["llm_calls"])


@pytest.mark.e2e
def test_meta_model_asset_trains_on_every_study_and_gates_on_cv_quality(
    tmp_path: Path, sqlite_uri: str
) -> None:
    with dg.instance_for_test() as instance:
        # Both studies in one prompt store, so the model sees the history across studies.
        shared = pipeline_in(tmp_path / "shared_p", instance, name="alpha", max_iterations=1)
        p = with_tracking(shared, sqlite_uri, tmp_path / "outbox.jsonl", min_spearman=2.0)
        p.store.register_study(p.study)
        beta = pipeline_in(tmp_path / "beta_p", instance, name="beta", max_iterations=1).study
        p.store.register_study(beta)
        drive(p.defs, p.instance, "alpha")
        drive(p.defs, p.instance, "beta")
        history = history_from_store(p.store)
        assert set(history["study"]) == {"alpha", "beta"}
        assert len(history) == sum(len(r.candidates) for s in ("alpha", "beta") for r in p.store.records(s))
        loaded = load_from_store(str(p.root))
        assert loaded is not None
        model, info = loaded
        assert info["useful"] is False and info["min_spearman"] == 2.0  # an unreachable bar
        assert set(info["studies"]) == {"alpha", "beta"}
        assert ranking_plan(str(p.root), 0.0, 3).ranker is None
        # the model itself is usable and was logged to MLflow with mlflow.sklearn
        assert len(model.predict([{"system_prompt": "x", "output_prompt": "{review}"}])) == 1
        client = MlflowClient(tracking_uri=sqlite_uri)
        exp = client.get_experiment_by_name(experiment_name("meta-model"))
        fits = [
            r
            for r in client.search_runs([exp.experiment_id])
            if r.info.run_name.startswith(("alpha-", "beta-"))
        ]
        assert len(fits) == len(p.store.records("alpha")) + len(p.store.records("beta"))
        assert client.search_logged_models([exp.experiment_id])
