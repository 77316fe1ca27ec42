"""`MlflowTracker`: everything the pipeline logs to MLflow, through `MlflowClient`.

Why `MlflowClient` and not `mlflow.start_run`: the fluent API keeps one process-global active run,
which breaks when several assets (or several studies) log from one process. Every method here
takes an explicit run id and targets `self.tracking_uri` only.

Outage policy: log a warning and keep going. Every write goes through `_call`: it cleans the
arguments (secrets out, MLflow's limits), runs the operation on the live store (`store.py`) or,
when the server is unreachable, queues it in the outbox (`outbox.py`) and hands back a
placeholder run id. The next successful call, or an explicit `flush()`, replays the outbox.

A server that dies *during* a call is retried by MLflow itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
default 7 with exponential backoff: minutes). Deployments that prefer to queue quickly should set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``; a server that is
already down is detected by a fast ``/health`` probe before each call and never waits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict, Unpack

import pandas as pd
import requests

from promptopt_dagster.redaction import is_secret_key, redact
from promptopt_dagster.tracking.connection import default_artifact_root
from promptopt_dagster.tracking.errors import TrackingError
from promptopt_dagster.tracking.layout import (
    CHAMPION_ALIAS,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
    RUN_STATUSES,
    TAG_PROMPT_ID,
    check_id,
    prompt_name,
    safe_items,
)
from promptopt_dagster.tracking.outbox import PENDING_PREFIX, Outbox, default_outbox
from promptopt_dagster.tracking.registry import RegisteredPrompt
from promptopt_dagster.tracking.run_contents import default_pip_requirements
from promptopt_dagster.tracking.store import LiveStore


class RunOptions(TypedDict, total=False):
    """What a run call may set besides the run's identity: params and tags (made MLflow-safe
    here), and `start_time_ms`, when the run's work started (epoch milliseconds; used only when
    the run is created, default now)."""

    params: Mapping[str, Any] | None
    tags: Mapping[str, Any] | None
    start_time_ms: int | None


class MlflowTracker:
    """Everything the pipeline logs to MLflow. Thread-safe; several processes may share an outbox.

    Args:
        tracking_uri: ``sqlite:///path/mlflow.db`` or ``http://host:port``.
        registry_uri: Prompt Registry / model registry store; defaults to the tracking URI.
        artifact_root: where new experiments keep artifacts (local stores only; default: a
            ``mlartifacts`` folder next to the SQLite file).
        outbox_path: JSONL file for calls made while the server is down.
        probe_timeout_s: timeout of the ``/health`` probe made before calls to an HTTP server.
        retry_after_s: after a failed probe, queue without probing again for this long.
    """

    def __init__(
        self,
        tracking_uri: str,
        registry_uri: str | None = None,
        *,
        artifact_root: str | None = None,
        outbox_path: str | os.PathLike[str] | None = None,
        probe_timeout_s: float = 2.0,
        retry_after_s: float = 5.0,
    ) -> None:
        if not tracking_uri:
            raise TrackingError(
                "tracking_uri is empty; set MLFLOW_TRACKING_URI or use sqlite:///<folder>/mlflow.db"
            )
        self.tracking_uri = tracking_uri.rstrip("/") if tracking_uri.startswith("http") else tracking_uri
        self.registry_uri = registry_uri or self.tracking_uri
        self.artifact_root = artifact_root or default_artifact_root(self.tracking_uri)
        self.outbox_path = Path(outbox_path) if outbox_path else default_outbox(self.tracking_uri)
        self.probe_timeout_s = probe_timeout_s
        self.retry_after_s = retry_after_s
        self.store = LiveStore(self.tracking_uri, self.registry_uri, self.artifact_root)
        self.outbox = Outbox(self.outbox_path, self._display_uri())
        self._lock = threading.RLock()
        self._down_until = 0.0

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The `MlflowClient`, created on first use (a new SQLite file takes ~3 s to initialize)."""
        return self.store.client

    @property
    def _is_http(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def _display_uri(self) -> str:
        """The URI without any user:password part, for messages."""
        return redact(self.tracking_uri)

    def reachable(self, force: bool = False) -> bool:
        """Whether the tracking store answers. HTTP: GET /health; other stores: assumed up."""
        if not self._is_http:
            return True
        if not force and time.monotonic() < self._down_until:
            return False
        try:
            ok = requests.get(f"{self.tracking_uri}/health", timeout=self.probe_timeout_s).status_code == 200
        except requests.RequestException:
            ok = False
        self._down_until = 0.0 if ok else time.monotonic() + self.retry_after_s
        return ok

    def _is_outage(self, exc: BaseException) -> bool:
        import sqlalchemy.exc
        from mlflow.exceptions import MlflowException

        if isinstance(exc, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError):
            return True
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            # a locked or unreachable database is transient; a missing table is not
            return any(s in str(exc).lower() for s in ("locked", "unable to open", "disk i/o", "connection"))
        if isinstance(exc, MlflowException) and exc.error_code == "TEMPORARILY_UNAVAILABLE":
            return True
        return self._is_http and not self.reachable(force=True)

    def _unreachable(self, what: str) -> TrackingError:
        return TrackingError(
            f"cannot read {what}: MLflow at {self._display_uri()} is unreachable; "
            "start the tracking server or check MLFLOW_TRACKING_URI"
        )

    def pending(self) -> list[dict[str, Any]]:
        """The queued calls, oldest first."""
        return self.outbox.pending()

    def resolve(self, run_id: str) -> str:
        """The real run id for a ``pending-...`` placeholder once replayed; other ids unchanged."""
        return self.outbox.resolve(run_id)

    def flush(self, force_probe: bool = True) -> int:
        """Replay queued calls in order; returns how many were replayed. Stops quietly (keeping
        the rest) if the server is still down; never raises for an outage."""
        with self._lock:
            return self.outbox.replay(
                self.store.execute, self._is_outage, lambda: self.reachable(force=force_probe)
            )

    def _call(
        self,
        op: str,
        args: dict[str, Any],
        *,
        create_key: list[Any] | None = None,
        to_json: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Any:
        """The one path of every write: replay the outbox first, run the call, queue it on outage."""
        with self._lock:
            if self.outbox.has_pending():
                self.flush(force_probe=False)
            args = self.outbox.resolve_args(args)
            if not self.outbox.has_pending() and not self.outbox.unresolved(args) and self.reachable():
                try:
                    return self.store.execute(op, args)
                except Exception as exc:
                    if not self._is_outage(exc):
                        raise
                    reason = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
            else:
                reason = (
                    "earlier calls are still queued" if self.outbox.has_pending() else "server unreachable"
                )
            queued = to_json(args) if to_json else args
            return self.outbox.enqueue(op, queued, create_key, reason)

    # --- runs ----------------------------------------------------------------------------------

    @staticmethod
    def _run_args(
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        start_time_ms: int | None = None,
    ) -> dict[str, Any]:
        """What every run call sends along: MLflow-safe params and tags, and the start if given."""
        args: dict[str, Any] = {
            "params": safe_items(params, MAX_PARAM_VAL_LENGTH),
            "tags": safe_items(tags, MAX_TAG_VAL_LENGTH),
        }
        if start_time_ms is not None:
            args["start_time_ms"] = int(start_time_ms)
        return args

    def iteration_run(self, study: str, iteration: int, **run: Unpack[RunOptions]) -> str:
        """The parent run of `study`'s iteration (created on first call, found by tag afterwards)."""
        check_id("study", study)
        args = {"study": study, "iteration": int(iteration), **self._run_args(**run)}
        return self._call("iteration_run", args, create_key=[study, int(iteration)])

    def candidate_run(self, parent_run_id: str, candidate_id: str, **run: Unpack[RunOptions]) -> str:
        """A nested run for one candidate prompt under an iteration run (idempotent by candidate id)."""
        check_id("candidate_id", candidate_id)
        args = {"parent_run_id": parent_run_id, "candidate_id": candidate_id, **self._run_args(**run)}
        return self._call("candidate_run", args, create_key=[self.resolve(parent_run_id), candidate_id])

    def keyed_run(self, study: str, key: str, **run: Unpack[RunOptions]) -> str:
        """A top-level run named `key` in `study`'s experiment (created once, found by tag after),
        for what is neither an iteration nor a candidate, e.g. a meta-model fit."""
        check_id("study", study)
        check_id("key", key)
        args = {"study": study, "key": key, **self._run_args(**run)}
        return self._call("keyed_run", args, create_key=[study, key])

    def end_run(self, run_id: str, status: str = "FINISHED", end_time_ms: int | None = None) -> None:
        """Mark the run ended at `end_time_ms` (epoch milliseconds; default: now)."""
        if status not in RUN_STATUSES:
            raise TrackingError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        end = int(end_time_ms) if end_time_ms is not None else int(time.time() * 1000)
        self._call("end_run", {"run_id": run_id, "status": status, "end_time_ms": end})

    def experiment_id(self, study: str) -> str:
        """The study's experiment id (created if missing)."""
        return self.store.experiment_id(study)

    def run_url(self, run_id: str) -> str | None:
        """A link to the run in the MLflow UI. HTTP stores: absolute; local stores: the fragment
        ``#/experiments/<exp>/runs/<run>`` that `mlflow ui --backend-store-uri <same uri>` serves.
        None while the run is still queued in the outbox or the server is down."""
        run_id = self.resolve(run_id)
        if run_id.startswith(PENDING_PREFIX):
            return None
        if run_id not in self.store.run_experiments and not self.reachable():
            return None
        try:
            exp = self.store.experiment_of(run_id)
        except Exception as exc:
            if self._is_outage(exc):
                return None
            raise
        fragment = f"#/experiments/{exp}/runs/{run_id}"
        return f"{self.tracking_uri}/{fragment}" if self._is_http else fragment

    # --- metrics, params, tags, artifacts ------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        values = {str(k): float(v) for k, v in metrics.items() if not is_secret_key(str(k))}
        self._call(
            "log_metrics",
            {"run_id": run_id, "metrics": values, "step": int(step), "timestamp_ms": int(time.time() * 1000)},
        )

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params are immutable in MLflow: a key already logged with another value is skipped with
        a warning (log it as a tag or metric instead)."""
        self._call("log_params", {"run_id": run_id, "params": safe_items(params, MAX_PARAM_VAL_LENGTH)})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._call("set_tags", {"run_id": run_id, "tags": safe_items(tags, MAX_TAG_VAL_LENGTH)})

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call("log_text", {"run_id": run_id, "text": redact(text), "artifact_file": artifact_file})

    def log_table(self, run_id: str, df: pd.DataFrame, artifact_file: str) -> None:
        """A table artifact (``.json`` in MLflow's table format, or ``.parquet``), replaced rather
        than appended to (unlike `MlflowClient.log_table`), so re-logging is idempotent."""
        if not artifact_file.endswith((".json", ".parquet")):
            raise TrackingError(f"log_table needs a .json or .parquet artifact_file, got {artifact_file!r}")
        clean = df.drop(columns=[c for c in df.columns if is_secret_key(str(c))])
        self._call(
            "log_table",
            {"run_id": run_id, "df": clean, "artifact_file": artifact_file},
            to_json=lambda a: {
                **{k: v for k, v in a.items() if k != "df"},
                "table_json": a["df"].to_json(orient="split", index=False, date_format="iso"),
            },
        )

    def log_sklearn_model(
        self,
        run_id: str,
        model: Any,
        name: str = "meta_model",
        pip_requirements: list[str] | None = None,
    ) -> None:
        """`mlflow.sklearn.log_model` into `run_id` on this tracker's URI (the fluent API reads
        the global URI, so it is set and restored under a lock). Explicit `pip_requirements`
        skip MLflow's slow requirement inference."""
        reqs = pip_requirements if pip_requirements is not None else default_pip_requirements()

        def to_json(args: dict[str, Any]) -> dict[str, Any]:
            import joblib

            path = self.outbox.blob_path(".joblib")
            joblib.dump(args["model"], path)
            return {k: v for k, v in args.items() if k != "model"} | {"model_path": str(path)}

        self._call(
            "log_sklearn_model",
            {"run_id": run_id, "model": model, "name": name, "pip_requirements": reqs},
            to_json=to_json,
        )

    # --- traces --------------------------------------------------------------------------------

    def log_trace(self, run_id: str, key: str, trace: Mapping[str, Any]) -> str | None:
        """One trace of LLM calls (`tracking/traces.py`, already redacted) linked to `run_id`,
        once per `key`; returns its id, or None when it existed already or was queued."""
        check_id("key", key)
        return self._call("log_trace", {"run_id": run_id, "key": key, "trace": dict(trace)})

    # --- Prompt Registry -----------------------------------------------------------------------

    def register_prompt(
        self,
        study: str,
        system_prompt: str,
        output_prompt: str,
        commit_message: str | None = None,
        tags: Mapping[str, Any] | None = None,
        champion: bool = False,
        run_id: str | None = None,
    ) -> int | None:
        """A prompt version; returns its number, or None if it was queued during an outage
        (pass ``champion=True`` to alias it in the same step, which also works when queued).
        Registered once: a version with the same ``promptopt.prompt_id`` tag (without one, the
        same texts) is reused, also when processes register it at the same moment (`registry.py`).
        With `run_id` the version is linked to that run (the run page lists its prompts)."""
        args = {
            "study": study,
            "system_prompt": redact(system_prompt),
            "output_prompt": redact(output_prompt),
            "commit_message": redact(commit_message) if commit_message else commit_message,
            "tags": safe_items(tags, MAX_TAG_VAL_LENGTH),
            "champion": champion,
            "run_id": run_id,
        }
        return self._call("register_prompt", args)

    def set_champion(self, study: str, version: int) -> None:
        self._call("set_champion", {"study": study, "version": int(version)})

    def prompt_version_of(self, study: str, prompt_id: str) -> int | None:
        """The registry version holding PromptState `prompt_id` (tag ``promptopt.prompt_id``),
        so re-logging an iteration does not register it twice. None if absent or unreachable."""
        if not self.reachable():
            return None
        from mlflow.exceptions import MlflowException

        try:
            versions = self.store.prompt_versions(prompt_name(study))
        except MlflowException:
            raise  # MLflow answered: not an outage
        except Exception as exc:
            if self._is_outage(exc):
                return None
            raise
        found = [int(v.version) for v in versions if (v.tags or {}).get(TAG_PROMPT_ID) == prompt_id]
        return min(found) if found else None

    def load_champion(self, study: str) -> RegisteredPrompt | None:
        """The version aliased ``champion``, or None if the study has none yet."""
        return self.load_prompt(study, alias=CHAMPION_ALIAS)

    def load_prompt(
        self, study: str, version: int | None = None, alias: str | None = None
    ) -> RegisteredPrompt | None:
        """A prompt version by number or alias (latest if neither); None if it does not exist."""
        name = prompt_name(study)
        uri = f"prompts:/{name}@{alias}" if alias else f"prompts:/{name}/{version}" if version else None
        if not self.reachable():  # fail fast rather than sit through MLflow's minutes of retries
            raise self._unreachable(f"prompt {uri or name}")
        try:
            if uri is None:
                latest = max((int(v.version) for v in self.store.prompt_versions(name)), default=None)
                if latest is None:
                    return None
                uri = f"prompts:/{name}/{latest}"
            return self.store.load_prompt(uri)
        except Exception as exc:
            if self._is_outage(exc):
                raise self._unreachable(f"prompt {uri or name}") from exc
            raise
