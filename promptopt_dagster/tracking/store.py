"""What each tracker call does against a live MLflow store, through `MlflowClient`.

These operations run when MLflow answers and again when the outbox replays a queued call, so
every argument is JSON-friendly (or has a JSON form) and every run creation is idempotent: runs
are found again by tag before one is created.

Several processes may log the same run or prompt version at once (two workers re-running an
iteration, a retried step racing a slow first attempt, two `promptopt run` of one study). MLflow
has no "create if absent" for runs, so find-then-create alone lets both create. Two measures:

- Local stores (``sqlite:///`` file, ``file:`` folder) can only be shared by processes of one
  machine, so a file lock beside the store makes find-or-create atomic: nothing duplicated.
- Every store, a server shared by machines included, then applies one convergent rule: after
  creating, search again by identity and keep the canonical one; a process whose own creation
  is not canonical deletes it and uses the canonical one, and finding picks the canonical one
  too. Prompt versions: the smallest version number (the store numbers versions in order, so a
  version nobody has seen yet always has a larger number). Runs: MLflow has no such number, so
  a run is created with tag ``promptopt.created_ns`` = ``pending``, then stamped with the time
  read right after the creation returned, and the canonical run is the smallest (stamp, run
  id); a search that shows a pending run waits for its stamp. A run a search does not show yet
  becomes visible later and so gets a later stamp: the rule never moves away from a run some
  process already uses (a stamp read *before* creating does not have that property: a slow
  creation request can then end up canonical after another process took its own run). Exact on
  one machine's clock; across machines it assumes their clocks agree to within the time between
  a creation and a search. MLflow cannot create a run under a chosen id, so nothing stronger is
  available without a lock service. Traces: `traces.write_trace`.

The store itself refuses one of two simultaneous inserts of the same experiment tag, param or
alias (a unique-key error); those writes check what is there and retry.
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
from filelock import FileLock

from promptopt_dagster.core.prompt_store import iteration_key
from promptopt_dagster.tracking.errors import TrackingError
from promptopt_dagster.tracking.layout import (
    CHAMPION_ALIAS,
    EXPERIMENT_NOTE_TAG,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_PER_BATCH,
    TAG_CANDIDATE,
    TAG_CREATED,
    TAG_ITERATION,
    TAG_KEY,
    TAG_KIND,
    TAG_PROMPT_ID,
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
CREATION_LOCK_TIMEOUT_S = 120.0
# How many runs of one identity a search returns: duplicates are rare, a few at most.
MAX_SAME_IDENTITY = 50
# A run is created with this stamp and stamped with the time right after; a process that died
# in between leaves it pending, and after this long it is deleted.
STAMP_PENDING = "pending"
STAMP_WAIT_S = 10.0
SEARCH_ATTEMPTS = 5


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


def creation_lock_path(tracking_uri: str) -> Path | None:
    """The lock file serializing creations in a store on this machine's disk, beside it; None
    for stores behind a server or a database server (shared by machines)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return db.with_name(db.name + ".create.lock")
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        local = (
            url2pathname(urlparse(tracking_uri).path) if tracking_uri.startswith("file:") else tracking_uri
        )
        folder = Path(local).resolve()
        return folder.parent / f"{folder.name}.create.lock"
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


def _creation_order(run: Any) -> tuple[int, str]:
    """The order that picks the canonical run among runs of one identity: the creation stamp
    (runs from before the stamp existed: their start time), then the run id."""
    stamp = run.data.tags.get(TAG_CREATED)
    return (
        int(stamp) if stamp and stamp.isdigit() else int(run.info.start_time or 0) * 1_000_000,
        run.info.run_id,
    )


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
        lock_path = creation_lock_path(tracking_uri)
        self._creation_lock = (
            None if lock_path is None else FileLock(str(lock_path), timeout=CREATION_LOCK_TIMEOUT_S)
        )

    @contextlib.contextmanager
    def creating(self) -> Iterator[None]:
        """Hold the store's creation lock (local stores; a no-op for servers) for one find-or-create."""
        if self._creation_lock is None:
            yield
            return
        Path(self._creation_lock.lock_file).parent.mkdir(parents=True, exist_ok=True)
        with self._creation_lock:
            yield

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
        with self.creating():
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = f"{self.artifact_root.rstrip('/')}/{study}" if self.artifact_root else None
                try:
                    exp_id = self.client.create_experiment(
                        name, artifact_location=location, tags={TAG_STUDY: study}
                    )
                except MlflowException:  # created meanwhile by another process (names are unique)
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
            self._set_experiment_tag(exp_id, key, value)
        if EXPERIMENT_NOTE_TAG not in tags:
            self._set_experiment_tag(exp_id, EXPERIMENT_NOTE_TAG, experiment_note(study))

    def _set_experiment_tag(self, exp_id: str, key: str, value: str) -> None:
        """Set an experiment tag; when another process inserts the same tag at the same moment,
        the store refuses one insert (a unique-key error) and the tag it wrote stays."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_experiment_tag(exp_id, key, value)
        except MlflowException:
            if key not in self.client.get_experiment(exp_id).tags:
                raise

    def experiment_of(self, run_id: str) -> str:
        """The experiment id of a run (remembered once seen)."""
        if run_id not in self.run_experiments:
            self.run_experiments[run_id] = self.client.get_run(run_id).info.experiment_id
        return self.run_experiments[run_id]

    def prompt_versions(self, name: str) -> list[Any]:
        """The registry versions of prompt `name`; empty if the prompt does not exist.

        While other processes register versions of the same prompt, MLflow's search sometimes
        returns a version without its tags and then refuses the whole answer ("registered as a
        model, not a prompt"); a moment later the same search succeeds, so it is repeated a few
        times before the error counts."""
        from mlflow.exceptions import MlflowException

        for attempt in range(SEARCH_ATTEMPTS):
            try:
                return self._prompt_versions_once(name)
            except MlflowException as exc:
                if attempt == SEARCH_ATTEMPTS - 1 or "registered as a model" not in str(exc):
                    raise
                time.sleep(0.05 * 2**attempt)  # another process's transaction, which no event announces
        raise AssertionError("unreachable")

    def _prompt_versions_once(self, name: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        out: list[Any] = []
        token: str | None = None
        while True:  # pages of 100, newest first
            try:
                page = self.client.search_prompt_versions(name, page_token=token)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return []
                raise
            out.extend(getattr(page, "prompt_versions", page))
            token = getattr(page, "token", None)
            if not token:
                return out

    def load_prompt(self, uri: str) -> RegisteredPrompt | None:
        pv = self.client.load_prompt(uri, allow_missing=True, cache_ttl_seconds=0)
        return None if pv is None else to_registered(pv)

    # --- runs ----------------------------------------------------------------------------------

    def _find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """The canonical active run tagged `tags` (module docstring), or None. Runs still being
        created (stamp ``pending``) are waited for; one still pending after `STAMP_WAIT_S` was
        left by a process that died between its two calls, and is deleted."""
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        deadline, delay = time.monotonic() + STAMP_WAIT_S, 0.01
        while True:
            runs = self.client.search_runs(
                [experiment_id], filter_string=clauses, max_results=MAX_SAME_IDENTITY
            )
            pending = [r for r in runs if r.data.tags.get(TAG_CREATED) == STAMP_PENDING]
            if not pending:
                break
            if time.monotonic() > deadline:
                for run in pending:
                    logger.warning("deleting run %s, left half-created by a process", run.info.run_id)
                    self._delete_run(run.info.run_id)
                left = {r.info.run_id for r in pending}
                runs = [r for r in runs if r.info.run_id not in left]
                break
            time.sleep(delay)  # another process's next call, which no event announces
            delay = min(delay * 2, 0.2)
        return min(runs, key=_creation_order).info.run_id if runs else None

    def _delete_run(self, run_id: str) -> None:
        """Delete a duplicate or abandoned run; one another process deleted first stays deleted."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(run_id)
        except MlflowException:
            if self.client.get_run(run_id).info.lifecycle_stage != "deleted":
                raise

    def _create_run(
        self,
        exp_id: str,
        ident: Mapping[str, str],
        run_name: str,
        tags: dict[str, str],
        start_time_ms: int | None,
    ) -> tuple[str, bool]:
        """Create the run of `ident` and stamp it; the canonical run of `ident` afterwards (our
        run deleted if it is not that one), and whether it is ours."""
        from mlflow.exceptions import MlflowException

        mine = self.client.create_run(
            exp_id, start_time=start_time_ms, run_name=run_name, tags={**tags, TAG_CREATED: STAMP_PENDING}
        ).info.run_id
        try:
            # read after the run became visible: any run that a search does not show yet gets a later stamp
            self.client.set_tag(mine, TAG_CREATED, str(time.time_ns()))
        except MlflowException:  # deleted meanwhile as left half-created: another run is canonical
            canonical = self._find_run(exp_id, ident)
            return (canonical, False) if canonical else (mine, True)
        canonical = self._find_run(exp_id, ident) or mine
        if canonical != mine:
            self._delete_run(mine)
            logger.info(
                "another process created run %s for the same %s at the same time; deleted the duplicate %s",
                canonical,
                ", ".join(f"{k}={v}" for k, v in ident.items() if k != TAG_KIND),
                mine,
            )
        return canonical, canonical == mine

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
        MLflow cannot move the start of an existing run, so `start_time_ms` applies at creation.
        Atomic on local stores, convergent on servers (module docstring)."""
        with self.creating():
            run_id = self._find_run(exp_id, ident)
            ours = False
            if run_id is None:
                tags_at_creation = {**(inherited or {}), **tags, **ident}
                run_id, ours = self._create_run(exp_id, ident, run_name, tags_at_creation, start_time_ms)
        if not ours and tags:
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
        self,
        parent_run_id: str,
        candidate_id: str,
        params: dict[str, str],
        tags: dict[str, str],
        start_time_ms: int | None = None,
    ) -> str:
        parent = self.client.get_run(parent_run_id)
        ident = {TAG_KIND: "candidate", "mlflow.parentRunId": parent_run_id, TAG_CANDIDATE: candidate_id}
        inherited = {k: v for k, v in parent.data.tags.items() if k in (TAG_STUDY, TAG_ITERATION)}
        return self._find_or_create_run(
            parent.info.experiment_id,
            ident,
            f"candidate-{candidate_id}",
            params,
            tags,
            inherited,
            start_time_ms=start_time_ms,
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
            self._log_new_params(run_id, new[i : i + MAX_PARAMS_PER_BATCH])

    def _log_new_params(self, run_id: str, batch: list[Any]) -> None:
        """Log `batch`; when another process logs the same run's params at the same moment, the
        store refuses the batch (a unique-key error): the params still missing are logged again."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, params=batch)
        except MlflowException:
            existing = self.client.get_run(run_id).data.params
            missing = [p for p in batch if p.key not in existing]
            if len(missing) == len(batch):
                raise
            if missing:
                self.client.log_batch(run_id, params=missing)

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
        """A prompt version, registered once: a version with the same ``promptopt.prompt_id`` tag
        (without one: the same template) is reused. Atomic on local stores, convergent on
        servers (module docstring)."""
        name = prompt_name(study)
        template = [{"role": "system", "content": system_prompt}, {"role": "user", "content": output_prompt}]
        ident = tags.get(TAG_PROMPT_ID)
        with self.creating():
            found = self._find_versions(name, ident, template)
            if not found:
                found = self._register_and_converge(
                    name, ident, template, commit_message, {**tags, TAG_STUDY: study}
                )
            version = found[0]
        if champion:
            self.set_champion(study, version)
        if run_id:
            self._link_version(run_id, name, version)
        return version

    def _link_version(self, run_id: str, name: str, version: int, attempts: int = 5) -> None:
        """Link a prompt version to a run. MLflow links by rewriting the run's
        ``mlflow.linkedPrompts`` tag (read, then insert), so processes linking to one run at once
        can collide on the tag's primary key; the link is idempotent, so it is retried until the
        tag lists the version."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                # The registry store resolves the run through the *global* tracking URI.
                with mlflow_global_uris(self.tracking_uri, self.registry_uri):
                    self.client.link_prompt_version_to_run(run_id, f"prompts:/{name}/{version}")
                return
            except MlflowException:
                if self._is_linked(run_id, name, version):
                    return
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _is_linked(self, run_id: str, name: str, version: int) -> bool:
        linked = self.client.get_run(run_id).data.tags.get("mlflow.linkedPrompts", "[]")
        try:
            entries = json.loads(linked)
        except ValueError:
            return False
        return any(e.get("name") == name and str(e.get("version")) == str(version) for e in entries)

    def _find_versions(self, name: str, prompt_id: str | None, template: list[dict[str, str]]) -> list[int]:
        """The versions of `name` with PromptState id `prompt_id` (without an id: with
        `template`), smallest (canonical) first."""
        return sorted(
            int(v.version)
            for v in self.prompt_versions(name)
            if ((v.tags or {}).get(TAG_PROMPT_ID) == prompt_id if prompt_id else v.template == template)
        )

    def _register_and_converge(
        self,
        name: str,
        prompt_id: str | None,
        template: list[dict[str, str]],
        commit_message: str | None,
        tags: dict[str, str],
    ) -> list[int]:
        """Register a version, then delete every version of the same prompt but the canonical
        one (ours or another process's); returns [the canonical version].

        Deleting another process's duplicate is safe: a version is used only by a process that
        found it canonical, and every smaller version was visible then. MLflow can also fail
        after the version is stored (while other processes register versions of the same prompt,
        its answer sometimes lacks the version's tags), so the search afterwards, not the answer,
        tells which versions exist."""
        from mlflow.exceptions import MlflowException

        try:
            self._new_version(name, template, commit_message, tags)
        except MlflowException as exc:
            if not self._find_versions(name, prompt_id, template):
                raise
            logger.info("registering a version of %s failed after storing it (%s)", name, exc.error_code)
        canonical, *duplicates = self._find_versions(name, prompt_id, template)
        for version in duplicates:
            try:
                self.client.delete_prompt_version(name, str(version))
            except MlflowException:  # deleted meanwhile by the process that registered it
                continue
            logger.info(
                "deleted %s version %d: processes registered the same prompt at the same time, "
                "version %d is kept",
                name,
                version,
                canonical,
            )
        return [canonical]

    def _new_version(
        self, name: str, template: list[dict[str, str]], commit_message: str | None, tags: dict[str, str]
    ) -> None:
        """Register a version; the first version also creates the prompt, and when another
        process creates it at the same moment, MLflow refuses one creation: retried once."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.register_prompt(name, template, commit_message=commit_message, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self.client.register_prompt(name, template, commit_message=commit_message, tags=tags)

    def set_champion(self, study: str, version: int) -> None:
        """Point the alias at `version`. The store inserts a new alias row, and when another
        process inserts it at the same moment it refuses one (a unique-key error); the retry
        then updates the existing row."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))
        except MlflowException:
            self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))
