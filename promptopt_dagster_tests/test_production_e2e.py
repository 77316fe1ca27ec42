"""Production is a matter of settings: a whole study through Dagster and its sensors with the
Vertex backend (a local server speaking the Vertex REST protocol) and every dataset, asset,
prompt version and batch file in a bucket (the GCS emulator). Also: a storage outage in the
middle of a run, a 429 burst, cost accounting and secrets that never leave the process.

These run against local protocol servers, not a Google Cloud project."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from promptopt_dagster import cli, storage
from promptopt_dagster.core.study import ModelConfig, load_study
from promptopt_dagster.definitions import build_definitions, build_resources
from promptopt_dagster.driver import ITERATION_JOB, REPORT_JOB, RunFailedError, RunOutcome, drive
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.vertex import VertexLLM
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.partitions import parse_key, study_iteration_key
from promptopt_dagster.resources import LLMResource, VertexConfig
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, emulator_environment
from promptopt_dagster_tests.support.scripted import GOOD, write_study
from promptopt_dagster_tests.support.vertex_server import (
    Fault,
    FaultSchedule,
    VertexServer,
    system_text,
    user_text,
    wants_json,
)

TOKEN = "ya29.e2e-5ecret-token-7f3a9c"  # looks like an OAuth access token; must never leave memory
BUCKET = "promptopt-prod"
PREFIX = "prod"
PRIMARY = "gemini-test-flash"
OPTIMIZER = "gemini-test-pro"
# Deliberately not in the built-in price table: cost > 0 proves VERTEX_PRICES reached the client.
PRICES = {PRIMARY: (1.0, 1.0), OPTIMIZER: (1.0, 1.0)}
STUDY = "scripted"


# --- the scripted Gemini ------------------------------------------------------------------------


@dataclass
class ScriptedGemini:
    """The model behind the fake endpoint: the bare label only when the system prompt names the
    label set (what the optimizer's format rule adds), chatty prose otherwise; proposals as JSON
    when JSON is asked. `on_primary_call` lets a test act at a precise point of a run."""

    primary_calls: int = 0
    optimizer_calls: int = 0
    on_primary_call: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict[str, Any]) -> str:
        if wants_json(body):
            with self.lock:
                self.optimizer_calls += 1
            proposal = {"system_prompt": "Classify the sentiment of the review.", "rationale": "task"}
            return json.dumps({"candidates": [proposal]})
        with self.lock:
            self.primary_calls += 1
        if self.on_primary_call is not None:
            self.on_primary_call()
        label = "positive" if any(w in user_text(body) for w in GOOD) else "negative"
        if "one of:" in system_text(body):
            return label
        return f"Well, I would say this review sounds {label} to me!"


# --- fixtures -----------------------------------------------------------------------------------


@dataclass
class Production:
    emulator: GcsEmulator
    server: VertexServer
    model: ScriptedGemini
    tmp: Path

    def settings(self, **overrides: Any) -> Settings:
        """What a user sets in production (the names the original API used), plus the two
        test-only settings that point the client at the local server."""
        values: dict[str, Any] = {
            "PROMPTOPT_HOME": self.tmp / "home",
            "VERTEX_PROJECT_ID": "test-project",
            "VERTEX_LOCATION": "europe-west4",
            "PRIMARY_MODEL_NAME": PRIMARY,
            "OPTIMIZER_MODEL_NAME": OPTIMIZER,
            "GCS_BUCKET_NAME": BUCKET,
            "GCS_PREFIX": PREFIX,
            "VERTEX_API_ENDPOINT": self.server.base_url,
            "VERTEX_ACCESS_TOKEN": TOKEN,
            "VERTEX_PRICES": PRICES,
            "VERTEX_BACKOFF_INITIAL_S": 0.05,
            "VERTEX_TIMEOUT_S": 20.0,
        }
        values.update(overrides)
        return Settings(**values)

    def register(self, defs: dg.Definitions, **study_overrides: Any) -> None:
        """The study's dataset is uploaded to the bucket and the study points at it."""
        folder = self.tmp / "study"
        folder.mkdir(exist_ok=True)
        dataset = f"gs://{BUCKET}/data/{STUDY}.csv"
        path = write_study(folder, STUDY, dataset=dataset, **study_overrides)
        storage.write_bytes(dataset, (folder / f"{STUDY}.csv").read_bytes())
        (folder / f"{STUDY}.csv").unlink()  # only the bucket has the data now
        defs.resources["prompt_store"].store.register_study(load_study(path))  # type: ignore[attr-defined]


@pytest.fixture
def prod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Production]:
    # Dagster reads the token at run time from the environment (dg.EnvVar), never from config.
    monkeypatch.setenv("VERTEX_ACCESS_TOKEN", TOKEN)
    # An outage must fail a run in about a second, not after GCS's 30 s of retries.
    monkeypatch.setenv(storage.ENV_RETRY_ATTEMPTS, "2")
    monkeypatch.setenv(storage.ENV_RETRY_INITIAL_WAIT, "0.05")
    monkeypatch.setenv(storage.ENV_RETRY_MAX_WAIT, "0.2")
    monkeypatch.setenv(storage.ENV_REQUEST_TIMEOUT, "5")
    monkeypatch.chdir(tmp_path)  # no stray .env
    model = ScriptedGemini()
    with (
        GcsEmulator(bucket=BUCKET, data_dir=tmp_path / "gcs") as emulator,
        emulator_environment(emulator),
        VertexServer(responder=model, batch_polls_before_done=2) as server,
    ):
        yield Production(emulator, server, model, tmp_path)


# --- helpers ------------------------------------------------------------------------------------


def bucket_objects() -> dict[str, bytes]:
    return {uri: storage.read_bytes(uri) for uri in storage.list_files(f"gs://{BUCKET}", "**/*")}


def relative(uri: str) -> str:
    return uri.removeprefix(f"gs://{BUCKET}/")


def assert_all_objects_complete(objects: dict[str, bytes]) -> None:
    """Every stored object parses in full: nothing half-written."""
    for uri, data in objects.items():
        if uri.endswith(".json"):
            json.loads(data)
        elif uri.endswith(".parquet"):
            pd.read_parquet(io.BytesIO(data))
        elif uri.endswith(".jsonl"):
            for line in data.decode().splitlines():
                if line.strip():
                    json.loads(line)


def decision_metadata(instance: dg.DagsterInstance, iteration: int) -> dict[str, Any]:
    key = str(study_iteration_key(STUDY, iteration))
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("iteration_decision"), asset_partitions=[key]), limit=1
    ).records
    assert record.asset_materialization is not None
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def materialization_metadata(instance: dg.DagsterInstance, asset: str, iteration: int) -> dict[str, Any]:
    key = str(study_iteration_key(STUDY, iteration))
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
    ).records
    assert record.asset_materialization is not None
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


def assert_token_nowhere(instance: dg.DagsterInstance, home: Path, *texts: str) -> None:
    """Not in the bucket, not in Dagster's run and event storage (structured and on disk), not in
    any local file the study wrote (response cache, MLflow), not in the given captured output."""
    for uri, data in bucket_objects().items():
        assert TOKEN.encode() not in data, uri
    runs = instance.get_runs()
    assert runs
    for run in runs:
        assert TOKEN not in dg.serialize_value(run)
        for entry in instance.all_logs(run.run_id):
            assert TOKEN not in dg.serialize_value(entry)
    for root in (Path(instance.root_directory), home):
        for path in root.rglob("*"):
            if path.is_file():
                assert TOKEN.encode() not in path.read_bytes(), path
    for text in texts:
        assert TOKEN not in text


# --- settings -> resources ----------------------------------------------------------------------


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
        concurrency=3, primary_model="m")


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
            meta = decision_metadata(instance, iteration)
            assert meta["llm_cost_usd"] > 0 and meta["llm_cost_usd"] == pytest.approx(record.cost_usd)
            # prices are 1 USD per 1M tokens both ways; batch rows are billed at half
            assert record.tokens / 2e6 <= record.cost_usd <= record.tokens / 1e6 + 1e-12
        assert decision_metadata(instance, 1)["total_llm_cost_usd"] == pytest.approx(
            sum(r.cost_usd for r in records)
        )
        assert materialization_metadata(instance, "baseline_predictions", 0)["llm_cost_usd"] > 0
        assert report["total_cost_usd"] == pytest.approx(sum(r.cost_usd for r in records))
        assert report["test_cost_usd"] > 0
        assert [row["cost_usd"] for row in report["rows"]] == pytest.approx([r.cost_usd for r in records])
        store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
        assert cli._print_report(defs, instance, store, STUDY) == 0
        table = capsys.readouterr().out
        assert "cost $" in table and f"{records[0].cost_usd:.4f}" in table

        # everything landed in the bucket under the documented layout, nothing locally
        objects = bucket_objects()
        names = {relative(uri) for uri in objects}
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
        assert_all_objects_complete(objects)

        assert_token_nowhere(instance, prod.tmp / "home", caplog.text, table)
        assert all(r.auth_scheme == "Bearer" for r in prod.server.generate_requests())  # it was used


# --- faults -------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_storage_outage_mid_run_fails_cleanly_and_the_driver_resumes(
    prod: Production, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket goes away while iteration 1 calls the model: that run fails with a clear
    message, leaves no partial object, and after the bucket is back the driver finishes."""
    caplog.set_level(logging.INFO)
    defs = build_definitions(prod.settings(VERTEX_BATCH_MODE="online"))
    prod.register(defs)
    armed = threading.Event()

    def stop_storage_once() -> None:
        if armed.is_set():
            armed.clear()
            prod.emulator.stop()

    prod.model.on_primary_call = stop_storage_once

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job == ITERATION_JOB and parse_key(outcome.partition_key)[1] == 0:
            armed.set()  # the next primary call is iteration 1's baseline inference

    with dg.instance_for_test() as instance:
        with pytest.raises(RunFailedError) as excinfo:
            drive(defs, instance, STUDY, on_done=on_done)
        message = str(excinfo.value)
        assert "step baseline_predictions" in message and TOKEN not in message
        assert not prod.emulator.running
        [failed] = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        assert failed.tags["study"] == STUDY
        # the step failed on writing its output, with the storage layer's actionable message
        [failure] = [e for e in instance.all_logs(failed.run_id) if e.dagster_event is not None
                     and e.dagster_event.event_type_value == "STEP_FAILURE"]
        assert failure.dagster_event is not None and failure.dagster_event.step_key == "baseline_predictions"
        chain, error = [], failure.dagster_event.event_specific_data.error  # type: ignore[union-attr]
        while error is not None:
            chain.append(error.message)
            error = error.cause
        reported = "\n".join(chain)
        assert "storage unreachable: could not write" in reported and prod.emulator.endpoint in reported

        prod.emulator.start()  # same port, same data directory
        objects = bucket_objects()
        names = {relative(uri) for uri in objects}
        assert_all_objects_complete(objects)
        # current_prompt was stored before the outage; nothing after it was
        assert f"{PREFIX}/assets/current_prompt/study={STUDY}/iteration=0001.json" in names
        assert not [n for n in names if "iteration=0001" in n and "current_prompt" not in n]
        assert f"{PREFIX}/studies/{STUDY}/iterations/0001.json" not in names
        assert f"{PREFIX}/studies/{STUDY}/iterations/0000.json" in names

        calls_before = prod.model.primary_calls
        result = drive(defs, instance, STUDY)
        assert [r.job for r in result.runs] == [ITERATION_JOB, REPORT_JOB]
        assert result.runs[0].partition_key == str(study_iteration_key(STUDY, 1))
        records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
        assert [r.iteration for r in records] == [0, 1] and records[1].stop_reason == "max_iterations"
        # the failed run's replies were kept in the response cache: its rows are not paid for twice
        assert materialization_metadata(instance, "baseline_predictions", 1)["llm_cached_calls"] > 0
        assert prod.model.primary_calls > calls_before  # the candidates and the test report
        assert_all_objects_complete(bucket_objects())
        assert_token_nowhere(instance, prod.tmp / "home", caplog.text)


@pytest.mark.e2e
def test_a_429_burst_during_the_study_is_survived(prod: Production, caplog: pytest.LogCaptureFixture) -> None:
    """Eight 429s with Retry-After (whose message echoes the caller's Authorization header, as a
    misbehaving proxy might) in iteration 1: every row still gets its answer, the study finishes,
    and the token shows up nowhere."""
    caplog.set_level(logging.INFO)
    retry_after = 0.3
    defs = build_definitions(prod.settings(VERTEX_BATCH_MODE="online"))
    prod.register(defs)

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job == ITERATION_JOB and parse_key(outcome.partition_key)[1] == 0:
            prod.server.inject(Fault("status", status=429, retry_after=retry_after, times=8,
                                     message="quota exceeded for {authorization}"))

    with dg.instance_for_test() as instance:
        result = drive(defs, instance, STUDY, on_done=on_done)
        assert [r.job for r in result.runs] == [ITERATION_JOB, ITERATION_JOB, REPORT_JOB]
        requests = prod.server.generate_requests()
        limited = [r for r in requests if r.status == 429]
        assert len(limited) == 8
        # each refused request came back, and not before the server's Retry-After
        for refused in limited:
            later = [r for r in requests if r.body == refused.body and r.started > refused.started]
            assert later and later[-1].status == 200  # a retry may be refused again, the last one is not
            assert later[0].started - refused.finished >= retry_after * 0.9
        meta = materialization_metadata(instance, "baseline_predictions", 1)
        assert meta["llm_failed_calls"] == 0 and meta["llm_calls"] > 0
        records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
        assert records[-1].stop_reason == "max_iterations"
        assert "429" in caplog.text  # the retries were logged ...
        assert_token_nowhere(instance, prod.tmp / "home", caplog.text)  # ... without the echoed token


# Decision fields that depend on the model's answers only (not on time, retries or cost).
_DECISION = {"iteration", "incumbent_id", "incumbent_train_score", "incumbent_val_score", "candidates",
             "accepted", "accepted_id", "champion_val_score", "best_val_score", "stop", "stop_reason",
             "calls", "tokens"}


def _study_outcome(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[str, Any]:
    """What a study decided and predicted: its decisions, champion, test scores and every
    prediction row (id, split, prediction, error) of every iteration."""
    records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
    report = defs.load_asset_value("study_report", partition_key=STUDY, instance=instance)
    predictions = {}
    for record in records:
        key = str(study_iteration_key(STUDY, record.iteration))
        for asset in ("baseline_predictions", "candidate_predictions"):
            frame = defs.load_asset_value(asset, partition_key=key, instance=instance)
            columns = [c for c in ("candidate_id", "row_id", "split", "prediction", "error") if c in frame]
            predictions[(asset, record.iteration)] = frame[columns].to_dict(orient="records")
    return {
        "decisions": [r.model_dump(include=_DECISION) for r in records],
        "champion": records[-1].champion.model_dump(exclude={"created_at"}),
        "seed_test": report["seed_test"],
        "final_test": report["final_test"],
        "predictions": predictions,
    }


@pytest.mark.e2e
def test_a_study_with_30_percent_of_calls_failing_ends_as_a_clean_run_does(
    prod: Production, capsys: pytest.CaptureFixture[str]
) -> None:
    """429s with Retry-After, 500s, timeouts and malformed replies on a deterministic 30% of all
    generateContent attempts, for a whole study: the same decisions, champion, test scores and
    prediction rows as the same study without faults, and no row lost to an error."""
    outcomes, figures = [], []
    for name, schedule in (("clean", None), ("faulty", FaultSchedule(rate=0.3, retry_after=0.2))):
        prod.server.clear()
        prod.server.schedule = schedule
        settings = prod.settings(PROMPTOPT_HOME=prod.tmp / name, GCS_PREFIX=name, VERTEX_BATCH_MODE="online",
                                 VERTEX_TIMEOUT_S=1.0, VERTEX_BACKOFF_INITIAL_S=0.05,
                                 VERTEX_BACKOFF_MAX_S=0.5)
        defs = build_definitions(settings)
        prod.register(defs)
        started = time.monotonic()
        with dg.instance_for_test() as instance:
            result = drive(defs, instance, STUDY)
            wall = time.monotonic() - started
            assert [r.job for r in result.runs] == [ITERATION_JOB, ITERATION_JOB, REPORT_JOB]
            outcomes.append(_study_outcome(defs, instance))
            errors = [row["error"] for frame in outcomes[-1]["predictions"].values() for row in frame
                      if row["error"] is not None]
            assert not errors, f"{name}: rows lost to errors: {errors}"
            for iteration in (0, 1):
                for asset in ("baseline_predictions", "candidate_predictions"):
                    assert materialization_metadata(instance, asset, iteration)["llm_failed_calls"] == 0
        requests = prod.server.generate_requests()
        bodies = {json.dumps(r.body, sort_keys=True) for r in requests}
        figures.append(f"{name}: {len(requests)} generateContent requests for {len(bodies)} distinct "
                       f"calls ({sum(wants_json(json.loads(b)) for b in bodies)} in JSON mode) "
                       f"({len(requests) - len(bodies)} retries, "
                       f"{sum(r.status != 200 for r in requests)} answered with an error status), "
                       f"injected {dict(schedule.injected) if schedule else {}}, wall {wall:.1f} s")
    clean, faulty = outcomes
    with capsys.disabled():
        print("\n" + "\n".join(figures))
    assert schedule is not None and sum(schedule.injected.values()) > 0
    assert {"429", "500", "timeout", "malformed_json"} <= set(schedule.injected)
    rows = [row for frame in faulty["predictions"].values() for row in frame]
    assert rows and all(row["error"] is None for row in rows)
    assert faulty == clean
