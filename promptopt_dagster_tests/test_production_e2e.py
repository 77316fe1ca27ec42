"""Production is a matter of settings: a whole study through Dagster and its sensors with the
Vertex backend (a local server speaking the Vertex REST protocol) and every dataset, asset,
prompt version and batch file in a bucket (the GCS emulator). Also: cost accounting and secrets
that never leave the process. The faults are in test_production_faults.py.

These run against local protocol servers, not a Google Cloud project."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dagster as dg
import pytest

from promptopt_dagster import cli
from promptopt_dagster.core.study import ModelConfig
from promptopt_dagster.definitions import build_definitions, build_resources
from promptopt_dagster.driver import ITERATION_JOB, REPORT_JOB, drive
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.vertex import VertexLLM
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.resources import LLMResource, VertexConfig
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.production import PREFIX, STUDY, TOKEN, Production

pytest_plugins = ["promptopt_dagster_tests.support.production"]


def test_production_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five names (those the original API used) switch everything to Gemini and the bucket."""
    monkeypatch.chdir(tmp_path)
    for name in ("LLM_BACKEND", "VERTEX_ACCESS_TOKEN", "VERTEX_API_ENDPOINT", "VERTEX_BATCH_GCS_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("OPTIMIZER_MODEL_NAME=gemini-2.5-pro\nVERTEX_BATCH_THRESHOLD=500\n")
    monkeypatch.setenv("VERTEX_PROJECT_ID", "my-project")
    monkeypatch.setenv("VERTEX_LOCATION", "europe-west4")
    monkeypatch.setenv("PRIMARY_MODEL_NAME", "gemini-2.5-flash")
    monkeypatch.setenv("GCS_BUCKET_NAME", "my-bucket")
    monkeypatch.setenv("VERTEX_PRICES", '{"gemini-2.5-flash": [0.3, 2.5]}')
    settings = Settings()
    assert settings.LLM_BACKEND == "vertex"
    assert settings.storage_root == "gs://my-bucket/promptopt"
    resources = build_resources(settings)
    assert resources["io_manager"].base_uri == "gs://my-bucket/promptopt/assets"  # type: ignore[attr-defined]
    assert resources["prompt_store"].root == "gs://my-bucket/promptopt"  # type: ignore[attr-defined]
    llm = resources["llm"]
    assert isinstance(llm, LLMResource) and llm.backend == "vertex"
    assert llm.vertex.project_id == "my-project" and llm.vertex.location == "europe-west4"
    assert llm.primary_model_name == "gemini-2.5-flash" and llm.optimizer_model_name == "gemini-2.5-pro"
    assert llm.vertex.batch_threshold == 500
    assert llm.vertex.batch_gcs_prefix == "gs://my-bucket/promptopt/batch"
    assert llm.vertex.prices == {"gemini-2.5-flash": [0.3, 2.5]}
    assert llm.vertex.access_token is None  # production: ADC
    assert llm.response_cache_path.startswith(str(tmp_path))  # type: ignore[attr-defined]  # local SQLite
    # ... and on to the client: throughput, batch and price options from the VERTEX_* settings
    monkeypatch.setenv("VERTEX_CONCURRENCY", "4")
    monkeypatch.setenv("VERTEX_REQUESTS_PER_MINUTE", "600")
    monkeypatch.setenv("VERTEX_TOKENS_PER_MINUTE", "100000")
    client = build_resources(Settings())["llm"].client(ModelConfig(), "primary")  # type: ignore[attr-defined]
    assert isinstance(client, CachedLLM) and isinstance(client.inner, VertexLLM)
    vertex = client.inner
    assert (vertex.model, vertex.options.project_id) == ("gemini-2.5-flash", "my-project")
    assert vertex.options.location == "europe-west4"
    assert vertex.options.concurrency == 4 and vertex.options.batch_threshold == 500
    assert vertex.options.batch_mode == "auto"
    assert vertex.options.batch_gcs_prefix == "gs://my-bucket/promptopt/batch"
    assert vertex.prices == {"gemini-2.5-flash": (0.3, 2.5)}
    assert vertex.limiter.requests is not None and vertex.limiter.requests.limit == 600
    assert vertex.limiter.tokens is not None and vertex.limiter.tokens.limit == 100000
    # An explicit backend still wins.
    monkeypatch.setenv("LLM_BACKEND", "local")
    assert Settings().LLM_BACKEND == "local"


def test_vertex_options_are_the_single_source_of_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing set, the settings, the Dagster resource and the client all carry exactly
    VertexOptions' defaults (declared nowhere else); an unknown VERTEX_* variable is ignored."""
    monkeypatch.chdir(tmp_path)  # no .env
    for name in [n for n in os.environ if n.upper().startswith("VERTEX_")]:
        monkeypatch.delenv(name)
    for name in ("PRIMARY_MODEL_NAME", "OPTIMIZER_MODEL_NAME", "GCS_BUCKET_NAME", "LLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VERTEX_AI_SOMETHING_ELSE", "not ours")
    defaults = VertexOptions()
    settings = Settings(PROMPTOPT_HOME=tmp_path)
    assert settings.vertex == defaults and settings.LLM_BACKEND == "local"
    llm = build_resources(settings)["llm"]
    assert isinstance(llm, LLMResource) and isinstance(llm.vertex, VertexOptions)
    assert llm.vertex.model_dump() == defaults.model_dump() and llm.vertex.access_token is None
    assert LLMResource(model_cache_dir=str(tmp_path)).vertex.model_dump() == defaults.model_dump()
    assert llm.primary_model_name == defaults.primary_model
    # The client takes the resource's options as they are.
    with_project = LLMResource(model_cache_dir=str(tmp_path), vertex=VertexConfig(project_id="p"))
    client = with_project.client(ModelConfig(backend="vertex"), "optimizer")
    assert isinstance(client, VertexLLM) and client.options is with_project.vertex
    assert client.model == defaults.optimizer_model
    assert client.options.model_dump(exclude={"project_id"}) == defaults.model_dump(exclude={"project_id"})
    # Keyword arguments by their variable names set the same fields.
    assert Settings(VERTEX_CONCURRENCY=3, PRIMARY_MODEL_NAME="m").vertex == VertexOptions(
        concurrency=3, primary_model="m"
    )


def test_the_ui_shows_the_token_variable_never_the_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dagster._core.remote_representation.external_data import RepositorySnap

    monkeypatch.setenv("VERTEX_ACCESS_TOKEN", TOKEN)
    settings = Settings(PROMPTOPT_HOME=tmp_path, VERTEX_PROJECT_ID="p", VERTEX_ACCESS_TOKEN=TOKEN)
    assert TOKEN not in repr(settings) and TOKEN not in settings.model_dump_json()
    defs = build_definitions(settings)
    snapshot = dg.serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
    assert "VERTEX_ACCESS_TOKEN" in snapshot and TOKEN not in snapshot


# --- the whole study ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_study_runs_on_vertex_and_gcs_through_the_sensors(
    prod: Production, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO)
    # Calls of 15 rows or more (validation inference, the test report) go as batch prediction jobs.
    settings = prod.settings(VERTEX_BATCH_THRESHOLD=15, VERTEX_BATCH_POLL_S=0.05)
    defs = build_definitions(settings)
    prod.register(defs)
    with dg.instance_for_test() as instance:
        result = drive(defs, instance, STUDY)
        assert [r.job for r in result.runs] == [ITERATION_JOB, ITERATION_JOB, REPORT_JOB]

        store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
        records = store.records(STUDY)
        assert [r.iteration for r in records] == [0, 1]
        # improves: the vague seed chats, the format rule makes the model answer with the label
        assert records[0].accepted and records[0].champion_val_score > records[0].incumbent_val_score
        assert records[0].champion_val_score == pytest.approx(1.0)
        assert "one of:" in records[0].champion.system_prompt
        # and stops for the right reason: nothing beats 1.0, and max_iterations is 2 (patience
        # waits until every strategy was tried on the champion)
        assert records[1].stop and records[1].stop_reason == "max_iterations"
        report = defs.load_asset_value("study_report", partition_key=STUDY, instance=instance)
        assert report["final_test"]["exact_match"] > report["seed_test"]["exact_match"]

        # both paths were used: batch jobs for the big calls, online calls for the small ones
        assert prod.server.jobs and all(j.state == "JOB_STATE_SUCCEEDED" for j in prod.server.jobs.values())
        assert prod.server.generate_requests()
        assert prod.model.optimizer_calls > 0

        # cost: in the decision metadata, per asset, and in the final table
        for iteration, record in enumerate(records):
            meta = prod.metadata(instance, "iteration_decision", iteration)
            assert meta["llm_cost_usd"] > 0 and meta["llm_cost_usd"] == pytest.approx(record.cost_usd)
            # prices are 1 USD per 1M tokens both ways; batch rows are billed at half
            assert record.tokens / 2e6 <= record.cost_usd <= record.tokens / 1e6 + 1e-12
        assert prod.metadata(instance, "iteration_decision", 1)["total_llm_cost_usd"] == pytest.approx(
            sum(r.cost_usd for r in records)
        )
        assert prod.metadata(instance, "baseline_predictions", 0)["llm_cost_usd"] > 0
        assert report["total_cost_usd"] == pytest.approx(sum(r.cost_usd for r in records))
        assert report["test_cost_usd"] > 0
        assert [row["cost_usd"] for row in report["rows"]] == pytest.approx([r.cost_usd for r in records])
        store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
        assert cli._print_report(defs, instance, store, STUDY) == 0
        table = capsys.readouterr().out
        assert "cost $" in table and f"{records[0].cost_usd:.4f}" in table

        # everything landed in the bucket under the documented layout, nothing locally
        objects = prod.objects()
        names = {prod.relative(uri) for uri in objects}
        assert f"data/{STUDY}.csv" in names
        assert f"{PREFIX}/studies/{STUDY}/study.yaml" in names
        assert {f"{PREFIX}/studies/{STUDY}/iterations/000{i}.json" for i in (0, 1)} <= names
        for asset in ("current_prompt", "baseline_metrics", "candidate_prompts", "iteration_decision"):
            assert f"{PREFIX}/assets/{asset}/study={STUDY}/iteration=0000.json" in names
        for asset in ("baseline_predictions", "candidate_predictions"):
            assert f"{PREFIX}/assets/{asset}/study={STUDY}/iteration=0001.parquet" in names
        assert f"{PREFIX}/assets/study_report/{STUDY}.json" in names
        prompt_files = {n for n in names if n.startswith(f"{PREFIX}/prompts/{STUDY}/")}
        assert f"{PREFIX}/prompts/{STUDY}/{records[0].champion.id}.json" in prompt_files
        batch = [n for n in names if n.startswith(f"{PREFIX}/batch/")]
        batch_inputs = [n for n in batch if n.endswith("/requests.jsonl")]
        assert len(batch_inputs) == len(prod.server.jobs)
        assert len([n for n in batch if n.endswith("/predictions.jsonl")]) == len(prod.server.jobs)
        assert not (prod.tmp / "home" / "store").exists()
        assert (prod.tmp / "home" / "cache" / "llm_responses.sqlite").exists()  # the cache stays local
        prod.assert_complete(objects)

        prod.assert_token_nowhere(instance, caplog.text, table)
        assert all(r.auth_scheme == "Bearer" for r in prod.server.generate_requests())  # it was used


# --- faults -------------------------------------------------------------------------------------
