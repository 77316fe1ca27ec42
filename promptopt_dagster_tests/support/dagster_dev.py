"""A real `dagster dev` (webserver + daemon) for tests, and GraphQL helpers to drive it.

It runs the test-only code location support/fake_location.py (the product's definitions with
scripted LLMs) on 127.0.0.1, with a temporary DAGSTER_HOME and PROMPTOPT_HOME. It is started in
its own session with SIGINT/SIGTERM at their defaults (a `dagster dev` started by a script that
ignores them never stops its children otherwise), and stopped by signalling its process group
(support/server_process.py).

The session fixtures that share one server and one finished study across test modules are in
support/ui_fixtures.py (a pytest plugin: ``pytest_plugins = [...ui_fixtures]``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
from dagster_graphql import DagsterGraphQLClient

from promptopt_dagster_tests.support.server_process import ServerHandle, ServerProcess

LOCATION = "promptopt_dagster_tests.support.fake_location"
REPOSITORY = "__repository__"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
T = TypeVar("T")


def tick_text(tick: dict[str, Any]) -> str:
    """A sensor tick's skip reason and its log lines, as the UI shows them."""
    return (tick["skipReason"] or "") + " " + " ".join(e["message"] for e in tick["logEvents"]["events"])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.5) -> T:
    """Poll `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (requests.RequestException, KeyError, TypeError) as exc:  # server still starting
            last = exc
        time.sleep(every)
    raise AssertionError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last: {last})" if last else "")
    )


@dataclass
class DagsterDev(ServerHandle):
    """One `dagster dev` process group and the folders it writes. `stop()` sends SIGTERM to the
    group (webserver, daemon, code server, runs), SIGKILL after 30 s, and returns the exit code
    of `dagster dev`."""

    root: Path
    port: int
    _server: ServerProcess = field(init=False)
    stop_timeout = 30.0

    def __post_init__(self) -> None:
        self._server = ServerProcess("dagster dev", log_path=self.root / "dagster_dev.log")

    @property
    def home(self) -> Path:
        return self.root / "promptopt"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster_home"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self._server.log_path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "PROMPTOPT_"))}
        env.update(
            DAGSTER_HOME=str(self.dagster_home),
            PROMPTOPT_HOME=str(self.home),
            MLFLOW_TRACKING_URI=f"sqlite:///{self.home / 'mlflow.db'}",
            LLM_BACKEND="local",  # never used: the code location swaps in scripted LLMs
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self) -> DagsterDev:
        """Start it and wait until the code location is loaded (a load error fails at once)."""
        self.dagster_home.mkdir(parents=True, exist_ok=True)
        self.datasets.mkdir(parents=True, exist_ok=True)
        (self.dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
        cmd = [dagster, "dev", "-h", "127.0.0.1", "-p", str(self.port), "-m", LOCATION]
        self._server.start(
            cmd, ready=self._location_loaded, timeout=180, every=0.5, cwd=self.root, env=self.env()
        )
        return self

    def _location_loaded(self) -> bool:
        try:
            data = self.query(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )
            entries = data["workspaceOrError"]["locationEntries"]
        except (requests.RequestException, KeyError, TypeError):  # the webserver is still starting
            return False
        errors = [
            e["locationOrLoadError"]
            for e in entries
            if e["locationOrLoadError"]["__typename"] == "PythonError"
        ]
        if errors:
            raise AssertionError(f"code location failed to load: {errors[0]['message']}")
        return any(e["loadStatus"] == "LOADED" and e["locationOrLoadError"] for e in entries)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    # --- GraphQL ------------------------------------------------------------------------------

    @property
    def client(self) -> DagsterGraphQLClient:
        return DagsterGraphQLClient("127.0.0.1", port_number=self.port, timeout=60)

    def query(self, text: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/graphql", json={"query": text, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def materializations(self, asset: str, limit: int = 100) -> list[dict[str, Any]]:
        """Latest first: partition, runId and metadata {label: value} of each materialization."""
        data = self.query(
            """query($key: AssetKeyInput!, $limit: Int) { assetOrError(assetKey: $key) { __typename
                ... on Asset { assetMaterializations(limit: $limit) { partition runId metadataEntries {
                  label __typename
                  ... on FloatMetadataEntry { floatValue } ... on IntMetadataEntry { intValue }
                  ... on BoolMetadataEntry { boolValue } ... on TextMetadataEntry { text }
                  ... on MarkdownMetadataEntry { mdStr }
                  ... on TableMetadataEntry { table { records } } } } } } }""",
            {"key": {"path": [asset]}, "limit": limit},
        )["assetOrError"]
        if data["__typename"] != "Asset":
            return []
        out = []
        for m in data["assetMaterializations"]:
            meta: dict[str, Any] = {}
            for e in m["metadataEntries"]:
                value = next(
                    (e[k] for k in ("floatValue", "intValue", "boolValue", "text", "mdStr") if k in e), None
                )
                if "table" in e:
                    value = [json.loads(r) for r in e["table"]["records"]]
                meta[e["label"]] = value
            out.append({"partition": m["partition"], "runId": m["runId"], "metadata": meta})
        return out

    def partition_keys(self, name: str) -> list[str]:
        """Keys of a dynamic partitions definition, through an asset partitioned by it."""
        asset = {
            "study": "study_report",
            "dataset": "prompt_evaluation",
            "prompt_version": "prompt_evaluation",
            "study_iteration": "iteration_decision",
        }[name]
        data = self.query(
            """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
                 partitionKeysByDimension { name partitionKeys } } } }""",
            {"key": {"path": [asset]}},
        )["assetNodeOrError"]["partitionKeysByDimension"]
        if len(data) == 1:
            return list(data[0]["partitionKeys"])
        return next(list(d["partitionKeys"]) for d in data if d["name"] == name)

    def sensor_ticks(self, sensor: str, limit: int = 10) -> list[dict[str, Any]]:
        data = self.query(
            """query($selector: SensorSelector!, $limit: Int) { sensorOrError(sensorSelector: $selector) {
                 __typename ... on Sensor { sensorState { status ticks(limit: $limit) {
                   status skipReason runKeys logEvents { events { message } } } } } } }""",
            {
                "selector": {
                    "repositoryName": REPOSITORY,
                    "repositoryLocationName": LOCATION,
                    "sensorName": sensor,
                },
                "limit": limit,
            },
        )["sensorOrError"]
        return list(data["sensorState"]["ticks"])

    def runs(self, job: str | None = None) -> list[dict[str, Any]]:
        data = self.query(
            """query($filter: RunsFilter) { runsOrError(filter: $filter) { ... on Runs { results {
                 runId status jobName tags { key value } } } } }""",
            {"filter": {"pipelineName": job} if job else {}},
        )
        return list(data["runsOrError"]["results"])

    def launch_backfill(self, asset: str, partition_names: list[str]) -> str:
        data = self.query(
            """mutation($params: LaunchBackfillParams!) { launchPartitionBackfill(backfillParams: $params) {
                 __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message }
                 ... on PartitionKeysNotFoundError { message } } }""",
            {"params": {"assetSelection": [{"path": [asset]}], "partitionNames": partition_names}},
        )["launchPartitionBackfill"]
        if data["__typename"] != "LaunchBackfillSuccess":
            raise AssertionError(f"backfill not launched: {data}")
        return str(data["backfillId"])

    def add_dynamic_partition(self, partitions_def: str, key: str) -> None:
        data = self.query(
            """mutation($repo: RepositorySelector!, $name: String!, $key: String!) {
                 addDynamicPartition(
                   repositorySelector: $repo, partitionsDefName: $name, partitionKey: $key
                 ) { __typename } }""",
            {
                "repo": {"repositoryName": REPOSITORY, "repositoryLocationName": LOCATION},
                "name": partitions_def,
                "key": key,
            },
        )
        assert data["addDynamicPartition"]["__typename"] == "AddDynamicPartitionSuccess", data

    def backfill_failures(self, backfill_id: str) -> list[str]:
        """The step failure messages and descriptions (what the run page shows) of a backfill's runs."""
        runs = self.query(
            "query($filter: RunsFilter) { runsOrError(filter: $filter) { "
            "... on Runs { results { runId } } } }",
            {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}},
        )["runsOrError"]["results"]
        out: list[str] = []
        for run in runs:
            events = self.query(
                """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { __typename
                     ... on ExecutionStepFailureEvent { message failureMetadata { description } } } } } }""",
                {"id": run["runId"]},
            )["logsForRun"]["events"]
            for e in events:
                if e["__typename"] == "ExecutionStepFailureEvent":
                    out.append(f"{e['message']} {(e['failureMetadata'] or {}).get('description') or ''}")
        return out

    def backfill_status(self, backfill_id: str) -> str:
        data = self.query(
            "query($id: String!) { partitionBackfillOrError(backfillId: $id) { "
            "... on PartitionBackfill { status } } }",
            {"id": backfill_id},
        )
        return str(data["partitionBackfillOrError"]["status"])


NEW_DATASET = "holdout_2026.csv"
BAD_DATASET = "garbage.parquet"
NO_COLUMNS_DATASET = "arith.csv"
FINISHED = ("COMPLETED", "COMPLETED_SUCCESS", "FAILED", "COMPLETED_FAILED", "CANCELED")


@dataclass
class Backfilled:
    """A dataset dropped after the study, registered by the sensor, backfilled over every prompt
    version of the study; and the comparison table the comparison sensor then refreshed."""

    dataset: str
    versions: list[str]
    backfill_id: str
    backfill_status: str
    comparison: list[dict[str, Any]]
    # Launched alongside: the seed over a dataset without its columns (added by hand in the UI),
    # which records the seed as not applicable to it.
    bad_backfill_id: str
    bad_backfill_status: str
    # The new_dataset_sensor tick that reported BAD_DATASET (reported once: ticks move on).
    bad_dataset_report: str


@dataclass
class StudyRun:
    """What the shared session ran: the study's name and the start_study run id."""

    name: str
    start_run_id: str


STUDY = "uistudy"


def start_study_config(name: str = STUDY) -> dict[str, Any]:
    return {
        "ops": {
            "register_study": {
                "config": {
                    "name": name,
                    "dataset": f"{name}.csv",  # relative: in the datasets location
                    "input_columns": ["review"],
                    "reference_column": "label",
                    "id_column": "id",
                    "seed_prompt": {"output_prompt": "{review}"},
                    "metrics": ["f1"],
                    "target_threshold": 1.01,
                    "patience": 1,
                    "max_iterations": 3,
                    "candidates_per_iteration": 3,
                    "minibatch_size": 6,
                }
            }
        }
    }


def study_finished(server: DagsterDev, name: str = STUDY) -> bool:
    return any(m["partition"] == name for m in server.materializations("study_report"))
