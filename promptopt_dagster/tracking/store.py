"""What each tracker call does against a live MLflow store, through `MlflowClient`.

These operations run when MLflow answers and again when the outbox replays a queued call, so
every argument is JSON-friendly (or has a JSON form) and every run creation is idempotent: runs
are found again by tag before one is created.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import posixpath
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_store import iteration_key
from promptopt_dagster.tracking.errors import TrackingError
from promptopt_dagster.tracking.layout import (
    CHAMPION_ALIAS,
    EXPERIMENT_NOTE_TAG,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    TAG_CANDIDATE,
    TAG_ITERATION,
    TAG_KEY,
    TAG_KIND,
    TAG_STUDY,
    experiment_name,
    experiment_note,
    prompt_name,
    runs_view_tag,
)

logger = logging.getLogger(__name__)

# The operations the outbox may replay, by name (the names stored in queued entries).
OPS = (
    "iteration_run",
    "keyed_run",
    "candidate_run",
    "log_metrics",
    "log_params",
    "set_tags",
    "log_text",
    "log_table",
    "end_run",
    "log_sklearn_model",
    "register_prompt",
    "set_champion",
    "log_trace",
)

_GLOBAL_URI_LOCK = threading.RLock()


@contextlib.contextmanager
def mlflow_global_uris(tracking_uri: str, registry_uri: str | None) -> Iterator[None]:
    """Point MLflow's fluent API (needed by `mlflow.sklearn.log_model`) at our URIs for one block,
    then restore exactly what was there (module variables and environment), under one lock."""
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    from mlflow.tracing.provider import reset as reset_tracing

    with _GLOBAL_URI_LOCK:
        old_tracking, old_registry = tracking_utils._tracking_uri, registry_utils._registry_uri
        old_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        try:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(registry_uri or tracking_uri)
            yield
        finally:
            tracking_utils._tracking_uri, registry_utils._registry_uri = old_tracking, old_registry
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            reset_tracing()


def default_artifact_root(tracking_uri: str) -> str | None:
    """Local stores: artifacts next to the database (MLflow's default, ./mlruns, depends on the
    current directory). Servers decide themselves (``--artifacts-destination``)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def default_pip_requirements() -> list[str]:
    """Pinned requirements for a logged scikit-learn model, from the installed versions."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("scikit-learn", "numpy", "pandas", "scipy", "mlflow")]


@dataclass(frozen=True)
class RegisteredPrompt:
    """A prompt version read back from the registry."""

    name: str
    version: int
    system_prompt: str
    output_prompt: str
    commit_message: str | None
    tags: dict[str, str]


def to_registered(pv: Any) -> RegisteredPrompt:
    """A registry `PromptVersion` (chat or text template) as system and output prompt."""
    template = pv.template
    if isinstance(template, str):
        system, output = "", template
    else:
        system = next((m["content"] for m in template if m.get("role") == "system"), "")
        output = next((m["content"] for m in template if m.get("role") == "user"), "")
    return RegisteredPrompt(
        name=pv.name,
        version=int(pv.version),
        system_prompt=system,
        output_prompt=output,
        commit_message=pv.commit_message,
        tags={k: v for k, v in (pv.tags or {}).items() if not k.startswith("mlflow.")},
    )


class LiveStore:
    """The `MlflowClient` of one tracking URI, and the operations the tracker runs through it."""

    def __init__(self, tracking_uri: str, registry_uri: str, artifact_root: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.registry_uri = registry_uri
        self.artifact_root = artifact_root
        self._client_obj: Any = None
        self._experiments: dict[str, str] = {}
        self.run_experiments: dict[str, str] = {}  # run id -> experiment id, as seen so far

    @property
    def client(self) -> Any:
        """The `MlflowClient`, created on first use (a new SQLite file takes ~3 s to initialize)."""
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client_obj

    def execute(self, op: str, args: dict[str, Any]) -> Any:
        """Run operation `op` (one of `OPS`) with `args`."""
        if op not in OPS:
            raise TrackingError(f"unknown MLflow operation {op!r}")
        return getattr(self, op)(**args)

    # --- reads ---------------------------------------------------------------------------------

    def experiment_id(self, study: str) -> str:
        """The study's experiment id (created if missing)."""
        from mlflow.exceptions import MlflowException

        if study in self._experiments:
            return self._experiments[study]
        name = experiment_name(study)
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = f"{self.artifact_root.rstrip('/')}/{study}" if self.artifact_root else None
            try:
                exp_id = self.client.create_experiment(
                    name, artifact_location=location, tags={TAG_STUDY: study}
                )
            except MlflowException:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
        self._describe_experiment(study, exp_id, {} if exp is None else dict(exp.tags))
        self._experiments[study] = exp_id
        return exp_id

    def _describe_experiment(self, study: str, exp_id: str, tags: Mapping[str, str]) -> None:
        """The saved runs-table view (rewritten when its state changed) and, unless someone wrote
        one, the experiment's description."""
        key, value = runs_view_tag(int(time.time() * 1000))
        try:
            current = json.loads(tags.get(key, "{}")).get("state")
        except ValueError:
            current = None
        if current != json.loads(value)["state"]:
            self.client.set_experiment_tag(exp_id, key, value)
        if EXPERIMENT_NOTE_TAG not in tags:
            self.client.set_experiment_tag(exp_id, EXPERIMENT_NOTE_TAG, experiment_note(study))

    def experiment_of(self, run_id: str) -> str:
        """The experiment id of a run (remembered once seen)."""
        if run_id not in self.run_experiments:
            self.run_experiments[run_id] = self.client.get_run(run_id).info.experiment_id
        return self.run_experiments[run_id]

    def prompt_versions(self, name: str) -> list[Any]:
        """The registry versions of prompt `name`; empty if the prompt does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_prompt_versions(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return []
            raise
        return list(getattr(versions, "prompt_versions", versions))

    def load_prompt(self, uri: str) -> RegisteredPrompt | None:
        pv = self.client.load_prompt(uri, allow_missing=True, cache_ttl_seconds=0)
        return None if pv is None else to_registered(pv)

    # --- runs ----------------------------------------------------------------------------------

    def _find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [experiment_id], filter_string=clauses, max_results=1, order_by=["attributes.start_time ASC"]
        )
        return runs[0].info.run_id if runs else None

    def _find_or_create_run(
        self,
        exp_id: str,
        ident: dict[str, str],
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        inherited: Mapping[str, str] | None = None,
        start_time_ms: int | None = None,
    ) -> str:
        """The run tagged `ident` (created with `inherited`, `tags` and `ident`, starting at
        `start_time_ms` or now, if missing); `tags` are set and new `params` logged either way.
        MLflow cannot move the start of an existing run, so `start_time_ms` applies at creation."""
        run_id = self._find_run(exp_id, ident)
        if run_id is None:
            tags_at_creation = {**(inherited or {}), **tags, **ident}
            run_id = self.client.create_run(
                exp_id, start_time=start_time_ms, run_name=run_name, tags=tags_at_creation
            ).info.run_id
        elif tags:
            self.set_tags(run_id, tags)
        self.run_experiments[run_id] = exp_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def iteration_run(
        self,
        study: str,
        iteration: int,
        params: dict[str, str],
        tags: dict[str, str],
        start_time_ms: int | None = None,
    ) -> str:
        key = iteration_key(iteration)
        ident = {TAG_KIND: "iteration", TAG_STUDY: study, TAG_ITERATION: key}
        return self._find_or_create_run(
            self.experiment_id(study), ident, f"iteration-{key}", params, tags, start_time_ms=start_time_ms
        )

    def keyed_run(self, study: str, key: str, params: dict[str, str], tags: dict[str, str]) -> str:
        ident = {TAG_KIND: "keyed", TAG_STUDY: study, TAG_KEY: key}
        return self._find_or_create_run(self.experiment_id(study), ident, key, params, tags)

    def candidate_run(
        self, parent_run_id: str, candidate_id: str, params: dict[str, str], tags: dict[str, str]
    ) -> str:
        parent = self.client.get_run(parent_run_id)
        ident = {TAG_KIND: "candidate", "mlflow.parentRunId": parent_run_id, TAG_CANDIDATE: candidate_id}
        inherited = {k: v for k, v in parent.data.tags.items() if k in (TAG_STUDY, TAG_ITERATION)}
        return self._find_or_create_run(
            parent.info.experiment_id, ident, f"candidate-{candidate_id}", params, tags, inherited
        )

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    # --- metrics, params, tags -----------------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, timestamp_ms, step) for k, v in metrics.items() if not math.isnan(v)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning(
                "run %s already has param(s) %s with other values; MLflow params are immutable, "
                "so they keep their first value",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=new[i : i + MAX_PARAMS_PER_BATCH])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    # --- artifacts -----------------------------------------------------------------------------

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(
        self, run_id: str, artifact_file: str, df: pd.DataFrame | None = None, table_json: str | None = None
    ) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        if df is None:
            df = pd.read_json(StringIO(table_json or ""), orient="split")
        directory, filename = posixpath.split(posixpath.normpath(artifact_file))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            if filename.endswith(".json"):
                df.to_json(path, orient="split", index=False, date_format="iso")
            else:
                df.to_parquet(path, index=False)
            self.client.log_artifact(run_id, str(path), directory or None)
        # The tag MLflow's UI reads to show the artifact as a table (as MlflowClient.log_table does).
        logged = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

    def log_sklearn_model(
        self,
        run_id: str,
        name: str,
        pip_requirements: list[str],
        model: Any = None,
        model_path: str | None = None,
    ) -> None:
        import mlflow.sklearn

        if model is None:
            import joblib

            model = joblib.load(model_path)  # our own file, written when the call was queued
        # The fluent API would file the model under the *active* experiment (default "0"); create
        # the LoggedModel in the run's experiment first and hand its id over.
        experiment_id = self.client.get_run(run_id).info.experiment_id
        logged = self.client.create_logged_model(
            experiment_id=experiment_id, name=name, source_run_id=run_id, model_type="sklearn"
        )
        with mlflow_global_uris(self.tracking_uri, self.registry_uri):
            mlflow.sklearn.log_model(
                model, name=name, pip_requirements=pip_requirements, run_id=run_id, model_id=logged.model_id
            )
        if model_path:
            Path(model_path).unlink(missing_ok=True)

    # --- traces --------------------------------------------------------------------------------

    def log_trace(self, run_id: str, key: str, trace: dict[str, Any]) -> str | None:
        from promptopt_dagster.tracking.traces import write_trace

        return write_trace(self, self.experiment_of(run_id), run_id, key, trace)

    # --- Prompt Registry -----------------------------------------------------------------------

    def register_prompt(
        self,
        study: str,
        system_prompt: str,
        output_prompt: str,
        commit_message: str | None,
        tags: dict[str, str],
        champion: bool,
        run_id: str | None = None,
    ) -> int:
        name = prompt_name(study)
        template = [{"role": "system", "content": system_prompt}, {"role": "user", "content": output_prompt}]
        pv = self.client.register_prompt(
            name, template, commit_message=commit_message, tags={**tags, TAG_STUDY: study}
        )
        version = int(pv.version)
        if champion:
            self.set_champion(study, version)
        if run_id:
            # The registry store resolves the run through the *global* tracking URI.
            with mlflow_global_uris(self.tracking_uri, self.registry_uri):
                self.client.link_prompt_version_to_run(run_id, f"prompts:/{name}/{version}")
        return version

    def set_champion(self, study: str, version: int) -> None:
        self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))
