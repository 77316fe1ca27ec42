"""What the production tests share: a scripted Gemini behind a local server speaking the Vertex
REST protocol (support/vertex_server.py), every dataset, asset, prompt version and batch file in
a bucket (the GCS emulator), the settings a production deployment sets, and checks that no
object is half-written and the access token appears nowhere. A pytest plugin:
``pytest_plugins = ["promptopt_dagster_tests.support.production"]`` gives a test module the
`prod` fixture."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest

from promptopt_dagster import storage
from promptopt_dagster.core.study import load_study
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, emulator_environment
from promptopt_dagster_tests.support.scripted import GOOD, write_study
from promptopt_dagster_tests.support.vertex_requests import system_text, user_text, wants_json
from promptopt_dagster_tests.support.vertex_server import VertexServer

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

    @staticmethod
    def objects() -> dict[str, bytes]:
        """Every object in the bucket, by URI."""
        return {uri: storage.read_bytes(uri) for uri in storage.list_files(f"gs://{BUCKET}", "**/*")}

    @staticmethod
    def relative(uri: str) -> str:
        return uri.removeprefix(f"gs://{BUCKET}/")

    @staticmethod
    def assert_complete(objects: dict[str, bytes]) -> None:
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

    @staticmethod
    def metadata(instance: dg.DagsterInstance, asset: str, iteration: int) -> dict[str, Any]:
        """The metadata of `asset`'s latest materialization for the study's `iteration`."""
        key = str(study_iteration_key(STUDY, iteration))
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
        ).records
        assert record.asset_materialization is not None
        return {k: v.value for k, v in record.asset_materialization.metadata.items()}

    def assert_token_nowhere(self, instance: dg.DagsterInstance, *texts: str) -> None:
        """Not in the bucket, not in Dagster's run and event storage (structured and on disk), not
        in any local file the study wrote under PROMPTOPT_HOME (response cache, MLflow), not in the
        given captured output."""
        for uri, data in self.objects().items():
            assert TOKEN.encode() not in data, uri
        runs = instance.get_runs()
        assert runs
        for run in runs:
            assert TOKEN not in dg.serialize_value(run)
            for entry in instance.all_logs(run.run_id):
                assert TOKEN not in dg.serialize_value(entry)
        for root in (Path(instance.root_directory), self.tmp / "home"):
            for path in root.rglob("*"):
                if path.is_file():
                    assert TOKEN.encode() not in path.read_bytes(), path
        for text in texts:
            assert TOKEN not in text


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


# --- settings -> resources ----------------------------------------------------------------------
