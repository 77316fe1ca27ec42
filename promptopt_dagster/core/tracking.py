"""MLflow tracking through `MlflowClient`, with a local outbox that survives a server outage.

Why `MlflowClient` and not `mlflow.start_run`: the fluent API keeps one process-global active run,
which breaks when several assets (or several studies) log from one process. Every method here
takes an explicit run id and targets `self.tracking_uri` only.

Layout in MLflow:

- one experiment per study, ``promptopt/<study>``;
- one parent run per iteration, ``iteration-0003`` (tags ``promptopt.study``,
  ``promptopt.iteration``), found again by tag, so re-materializing an asset reuses it;
- one nested run per candidate prompt (tag ``mlflow.parentRunId``), also found again by tag;
- prompt versions in the MLflow Prompt Registry under ``promptopt-<study>``, as a chat template
  ``[{"role": "system", ...}, {"role": "user", ...}]``; the accepted one carries alias ``champion``.

Outage policy: log a warning and keep going. Every write goes through `_call`; when the server is
unreachable the call is appended to a JSONL outbox (with its arguments, original timestamps and,
for run creation, a ``pending-...`` placeholder id that the caller can keep using). The next
successful call, or an explicit `flush()`, replays the outbox in order, maps placeholders to the
real run ids (persisted next to the outbox, so another process can resolve them), and removes
replayed entries. A replayed entry that fails for a reason other than an outage goes to
``<outbox>.failed.jsonl`` so it cannot block the queue forever.

A server that dies *during* a call is retried by MLflow itself (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
default 7 with exponential backoff: minutes). Deployments that prefer to queue quickly should set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=10``; a server that is
already down is detected by a fast ``/health`` probe before each call and never waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd
import requests
from filelock import FileLock

from promptopt_dagster.errors import StorageError
from promptopt_dagster.redaction import is_secret_key, looks_like_secret_value, redact

logger = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "promptopt"
PROMPT_PREFIX = "promptopt"
CHAMPION_ALIAS = "champion"
PENDING_PREFIX = "pending-"
TAG_STUDY = "promptopt.study"
TAG_ITERATION = "promptopt.iteration"
TAG_CANDIDATE = "promptopt.candidate"
TAG_KIND = "promptopt.kind"
TAG_KEY = "promptopt.key"
TAG_PROMPT_ID = "promptopt.prompt_id"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")

# MLflow's own limits (mlflow.utils.validation); repeated so importing this module stays light.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,249}")


class TrackingError(StorageError):
    """MLflow refused a call or cannot be reached for a read (writes are queued instead)."""


def safe_items(values: Mapping[str, Any] | None, limit: int) -> dict[str, str]:
    """Stringify, drop secret-looking keys or values, truncate to MLflow's limits."""
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in (values or {}).items():
        key = str(key)
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        if is_secret_key(key) or looks_like_secret_value(text):
            dropped.append(key)
            continue
        out[key[:MAX_KEY_LENGTH]] = text if len(text) <= limit else text[: limit - 3] + "..."
    if dropped:
        logger.info("not logging %d secret-looking setting(s): %s", len(dropped), ", ".join(sorted(dropped)))
    return out


def experiment_name(study: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{study}"


def prompt_name(study: str) -> str:
    """A Prompt Registry name for a study slug (letters, digits, '-', '_', '.')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study).strip("-") or "study"
    return f"{PROMPT_PREFIX}-{slug}"


def iteration_key(iteration: int) -> str:
    return f"{int(iteration):04d}"


@dataclass(frozen=True)
class RegisteredPrompt:
    """A prompt version read back from the registry."""

    name: str
    version: int
    system_prompt: str
    output_prompt: str
    commit_message: str | None
    tags: dict[str, str]


@contextlib.contextmanager
def _mlflow_global_uris(tracking_uri: str, registry_uri: str | None) -> Iterator[None]:
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


_GLOBAL_URI_LOCK = threading.RLock()


def _default_outbox(tracking_uri: str) -> Path:
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlflow-outbox.jsonl"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptopt"
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:10]
    return cache / f"mlflow-outbox-{digest}.jsonl"


def _default_artifact_root(tracking_uri: str) -> str | None:
    """Local stores: artifacts next to the database (MLflow's default, ./mlruns, depends on the
    current directory). Servers decide themselves (``--artifacts-destination``)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


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
        self.artifact_root = artifact_root or _default_artifact_root(self.tracking_uri)
        self.outbox_path = Path(outbox_path) if outbox_path else _default_outbox(self.tracking_uri)
        self.probe_timeout_s = probe_timeout_s
        self.retry_after_s = retry_after_s
        self._client_obj: Any = None
        self._lock = threading.RLock()
        self._down_until = 0.0
        self._experiments: dict[str, str] = {}
        self._run_experiments: dict[str, str] = {}
        self._id_map: dict[str, str] = {}

    # --- plumbing ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """The `MlflowClient`, created on first use (a new SQLite file takes ~3 s to initialize)."""
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
        return self._client_obj

    @property
    def _is_http(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    @property
    def _ids_path(self) -> Path:
        return self.outbox_path.with_name(self.outbox_path.name + ".ids.json")

    @property
    def _failed_path(self) -> Path:
        return self.outbox_path.with_name(self.outbox_path.name + ".failed.jsonl")

    @property
    def _blob_dir(self) -> Path:
        return self.outbox_path.with_name(self.outbox_path.name + ".blobs")

    def _file_lock(self) -> FileLock:
        self.outbox_path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.outbox_path) + ".lock", timeout=120)

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

    def pending(self) -> list[dict[str, Any]]:
        """The queued calls, oldest first."""
        if not self.outbox_path.exists():
            return []
        lines = self.outbox_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def _has_pending(self) -> bool:
        try:
            return self.outbox_path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def _write_pending(self, entries: list[dict[str, Any]]) -> None:
        tmp = self.outbox_path.with_name(self.outbox_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
        os.replace(tmp, self.outbox_path)

    def _load_ids(self) -> None:
        if self._ids_path.exists():
            self._id_map.update(json.loads(self._ids_path.read_text(encoding="utf-8")))

    def _save_ids(self) -> None:
        self._ids_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._ids_path.with_name(self._ids_path.name + ".tmp")
        tmp.write_text(json.dumps(self._id_map, indent=1), encoding="utf-8")
        os.replace(tmp, self._ids_path)

    def resolve(self, run_id: str) -> str:
        """The real run id for a ``pending-...`` placeholder once replayed; other ids unchanged."""
        if not run_id.startswith(PENDING_PREFIX):
            return run_id
        if run_id not in self._id_map:
            self._load_ids()
        return self._id_map.get(run_id, run_id)

    def _resolve_args(self, args: dict[str, Any]) -> dict[str, Any]:
        out = dict(args)
        for field in ("run_id", "parent_run_id"):
            if isinstance(out.get(field), str):
                out[field] = self.resolve(out[field])
        return out

    @staticmethod
    def _unresolved(args: dict[str, Any]) -> bool:
        return any(
            isinstance(args.get(f), str) and args[f].startswith(PENDING_PREFIX)
            for f in ("run_id", "parent_run_id")
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
            if self._has_pending():
                self.flush(force_probe=False)
            args = self._resolve_args(args)
            if not self._has_pending() and not self._unresolved(args) and self.reachable():
                try:
                    return self._execute(op, args)
                except Exception as exc:
                    if not self._is_outage(exc):
                        raise
                    reason = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
            else:
                reason = "earlier calls are still queued" if self._has_pending() else "server unreachable"
            queued = to_json(args) if to_json else args
            return self._enqueue(op, queued, create_key, reason)

    def _enqueue(self, op: str, args: dict[str, Any], create_key: list[Any] | None, reason: str) -> Any:
        with self._file_lock():
            entries = self.pending()
            placeholder = None
            if create_key is not None:
                for entry in entries:  # idempotent creation during an outage too
                    if entry["op"] == op and entry.get("key") == create_key:
                        return entry["placeholder"]
                placeholder = PENDING_PREFIX + uuid.uuid4().hex
            entry = {
                "op": op,
                "args": args,
                "key": create_key,
                "placeholder": placeholder,
                "queued_at": time.time(),
            }
            with self.outbox_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")
        logger.warning(
            "MLflow at %s is not available (%s); queued %s in %s (%d pending). It is replayed on the "
            "next successful call or MlflowTracker.flush().",
            self._display_uri(),
            reason,
            op,
            self.outbox_path,
            len(entries) + 1,
        )
        return placeholder

    def flush(self, force_probe: bool = True) -> int:
        """Replay queued calls in order; returns how many were replayed. Stops quietly (keeping
        the rest) if the server is still down; never raises for an outage."""
        with self._lock, self._file_lock():
            entries = self.pending()
            if not entries or not self.reachable(force=force_probe):
                return 0
            done = 0
            while entries:
                entry = entries[0]
                try:
                    result = self._execute(entry["op"], self._resolve_args(entry["args"]))
                except Exception as exc:
                    if self._is_outage(exc):
                        logger.warning(
                            "MLflow went away again while replaying; %d call(s) still queued", len(entries)
                        )
                        break
                    logger.error(
                        "dropping queued MLflow call %s that fails for a reason other than an outage "
                        "(%s: %s); kept in %s",
                        entry["op"],
                        type(exc).__name__,
                        redact(str(exc))[:300],
                        self._failed_path,
                    )
                    with self._failed_path.open("a", encoding="utf-8") as fh:
                        fh.write(
                            json.dumps({**entry, "error": f"{type(exc).__name__}: {redact(str(exc))}"[:2000]})
                            + "\n"
                        )
                else:
                    if entry.get("placeholder") and isinstance(result, str):
                        self._id_map[entry["placeholder"]] = result
                        self._save_ids()
                    done += 1
                entries.pop(0)
                self._write_pending(entries)
            if done:
                logger.info("replayed %d queued MLflow call(s) to %s", done, self._display_uri())
            return done

    def _display_uri(self) -> str:
        """The URI without any user:password part, for messages."""
        return redact(self.tracking_uri)

    def _execute(self, op: str, args: dict[str, Any]) -> Any:
        return getattr(self, f"_op_{op}")(**args)

    # --- public API: runs ----------------------------------------------------------------------

    def iteration_run(
        self,
        study: str,
        iteration: int,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """The parent run of `study`'s iteration (created on first call, found by tag afterwards)."""
        _check_id("study", study)
        args = {
            "study": study,
            "iteration": int(iteration),
            "params": safe_items(params, MAX_PARAM_VAL_LENGTH),
            "tags": safe_items(tags, MAX_TAG_VAL_LENGTH),
        }
        return self._call("iteration_run", args, create_key=[study, int(iteration)])

    def candidate_run(
        self,
        parent_run_id: str,
        candidate_id: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """A nested run for one candidate prompt under an iteration run (idempotent by candidate id)."""
        _check_id("candidate_id", candidate_id)
        args = {
            "parent_run_id": parent_run_id,
            "candidate_id": candidate_id,
            "params": safe_items(params, MAX_PARAM_VAL_LENGTH),
            "tags": safe_items(tags, MAX_TAG_VAL_LENGTH),
        }
        return self._call("candidate_run", args, create_key=[self.resolve(parent_run_id), candidate_id])

    def keyed_run(
        self,
        study: str,
        key: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """A top-level run named `key` in `study`'s experiment (created once, found by tag after),
        for what is neither an iteration nor a candidate, e.g. a meta-model fit."""
        _check_id("study", study)
        _check_id("key", key)
        args = {
            "study": study,
            "key": key,
            "params": safe_items(params, MAX_PARAM_VAL_LENGTH),
            "tags": safe_items(tags, MAX_TAG_VAL_LENGTH),
        }
        return self._call("keyed_run", args, create_key=[study, key])

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

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise TrackingError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")
        self._call("end_run", {"run_id": run_id, "status": status, "end_time_ms": int(time.time() * 1000)})

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

            self._blob_dir.mkdir(parents=True, exist_ok=True)
            path = self._blob_dir / f"{uuid.uuid4().hex}.joblib"
            joblib.dump(args["model"], path)
            return {k: v for k, v in args.items() if k != "model"} | {"model_path": str(path)}

        self._call(
            "log_sklearn_model",
            {"run_id": run_id, "model": model, "name": name, "pip_requirements": reqs},
            to_json=to_json,
        )

    # --- public API: prompts -------------------------------------------------------------------

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
        """A new prompt version; returns its number, or None if it was queued during an outage
        (pass ``champion=True`` to alias it in the same step, which also works when queued).
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

    def prompt_version_of(self, study: str, prompt_id: str) -> int | None:
        """The registry version holding PromptState `prompt_id` (tag ``promptopt.prompt_id``),
        so re-logging an iteration does not register it twice. None if absent or unreachable."""
        if not self.reachable():
            return None
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_prompt_versions(prompt_name(study))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        except Exception as exc:
            if self._is_outage(exc):
                return None
            raise
        items = getattr(versions, "prompt_versions", versions)
        found = [int(v.version) for v in items if (v.tags or {}).get(TAG_PROMPT_ID) == prompt_id]
        return min(found) if found else None

    def set_champion(self, study: str, version: int) -> None:
        self._call("set_champion", {"study": study, "version": int(version)})

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
            raise TrackingError(
                f"cannot read prompt {uri or name}: MLflow at {self._display_uri()} is unreachable; "
                "start the tracking server or check MLFLOW_TRACKING_URI"
            )
        try:
            if uri is None:
                latest = self._latest_prompt_version(name)
                if latest is None:
                    return None
                uri = f"prompts:/{name}/{latest}"
            pv = self.client.load_prompt(uri, allow_missing=True, cache_ttl_seconds=0)
        except Exception as exc:
            if self._is_outage(exc):
                raise TrackingError(
                    f"cannot read prompt {uri or name}: MLflow at {self._display_uri()} is unreachable; "
                    "start the tracking server or check MLFLOW_TRACKING_URI"
                ) from exc
            raise
        if pv is None:
            return None
        return _to_registered(pv)

    def _latest_prompt_version(self, name: str) -> int | None:
        from mlflow.exceptions import MlflowException

        try:
            versions = self.client.search_prompt_versions(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        items = getattr(versions, "prompt_versions", versions)
        return max((int(v.version) for v in items), default=None)

    # --- public API: links ---------------------------------------------------------------------

    def run_url(self, run_id: str) -> str | None:
        """A link to the run in the MLflow UI. HTTP stores: absolute; local stores: the fragment
        ``#/experiments/<exp>/runs/<run>`` that `mlflow ui --backend-store-uri <same uri>` serves.
        None while the run is still queued in the outbox or the server is down."""
        run_id = self.resolve(run_id)
        if run_id.startswith(PENDING_PREFIX):
            return None
        exp = self._run_experiments.get(run_id)
        if exp is None:
            if not self.reachable():
                return None
            try:
                exp = self.client.get_run(run_id).info.experiment_id
            except Exception as exc:
                if self._is_outage(exc):
                    return None
                raise
            self._run_experiments[run_id] = exp
        fragment = f"#/experiments/{exp}/runs/{run_id}"
        return f"{self.tracking_uri}/{fragment}" if self._is_http else fragment

    def experiment_id(self, study: str) -> str:
        """The study's experiment id (created if missing)."""
        return self._experiment_id(study)

    # --- operations (run against a live store; also what the outbox replays) --------------------

    def _experiment_id(self, study: str) -> str:
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
            except MlflowException as exc:  # created meanwhile by another process
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                exp_id = exp.experiment_id
                del exc
        else:
            exp_id = exp.experiment_id
        self._experiments[study] = exp_id
        return exp_id

    def _find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs(
            [experiment_id], filter_string=clauses, max_results=1, order_by=["attributes.start_time ASC"]
        )
        return runs[0].info.run_id if runs else None

    def _op_iteration_run(
        self, study: str, iteration: int, params: dict[str, str], tags: dict[str, str]
    ) -> str:
        exp_id = self._experiment_id(study)
        key = iteration_key(iteration)
        ident = {TAG_KIND: "iteration", TAG_STUDY: study, TAG_ITERATION: key}
        run_id = self._find_run(exp_id, ident)
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=f"iteration-{key}", tags={**tags, **ident})
            run_id = run.info.run_id
        elif tags:
            self._op_set_tags(run_id, tags)
        self._run_experiments[run_id] = exp_id
        if params:
            self._op_log_params(run_id, params)
        return run_id

    def _op_keyed_run(self, study: str, key: str, params: dict[str, str], tags: dict[str, str]) -> str:
        exp_id = self._experiment_id(study)
        ident = {TAG_KIND: "keyed", TAG_STUDY: study, TAG_KEY: key}
        run_id = self._find_run(exp_id, ident)
        if run_id is None:
            run_id = self.client.create_run(exp_id, run_name=key, tags={**tags, **ident}).info.run_id
        elif tags:
            self._op_set_tags(run_id, tags)
        self._run_experiments[run_id] = exp_id
        if params:
            self._op_log_params(run_id, params)
        return run_id

    def _op_candidate_run(
        self, parent_run_id: str, candidate_id: str, params: dict[str, str], tags: dict[str, str]
    ) -> str:
        parent = self.client.get_run(parent_run_id)
        exp_id = parent.info.experiment_id
        ident = {TAG_KIND: "candidate", "mlflow.parentRunId": parent_run_id, TAG_CANDIDATE: candidate_id}
        run_id = self._find_run(exp_id, ident)
        if run_id is None:
            inherited = {k: v for k, v in parent.data.tags.items() if k in (TAG_STUDY, TAG_ITERATION)}
            run = self.client.create_run(
                exp_id, run_name=f"candidate-{candidate_id}", tags={**inherited, **tags, **ident}
            )
            run_id = run.info.run_id
        elif tags:
            self._op_set_tags(run_id, tags)
        self._run_experiments[run_id] = exp_id
        if params:
            self._op_log_params(run_id, params)
        return run_id

    def _op_log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, timestamp_ms, step) for k, v in metrics.items() if not math.isnan(v)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def _op_log_params(self, run_id: str, params: dict[str, str]) -> None:
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

    def _op_set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    def _op_log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def _op_log_table(
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

    def _op_end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    def _op_log_sklearn_model(
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

            model = joblib.load(model_path)  # our own file, written by log_sklearn_model
        # The fluent API would file the model under the *active* experiment (default "0"); create
        # the LoggedModel in the run's experiment first and hand its id over.
        experiment_id = self.client.get_run(run_id).info.experiment_id
        logged = self.client.create_logged_model(
            experiment_id=experiment_id, name=name, source_run_id=run_id, model_type="sklearn"
        )
        with _mlflow_global_uris(self.tracking_uri, self.registry_uri):
            mlflow.sklearn.log_model(
                model, name=name, pip_requirements=pip_requirements, run_id=run_id, model_id=logged.model_id
            )
        if model_path:
            Path(model_path).unlink(missing_ok=True)

    def _op_register_prompt(
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
            self._op_set_champion(study, version)
        if run_id:
            # The registry store resolves the run through the *global* tracking URI.
            with _mlflow_global_uris(self.tracking_uri, self.registry_uri):
                self.client.link_prompt_version_to_run(run_id, f"prompts:/{name}/{version}")
        return version

    def _op_set_champion(self, study: str, version: int) -> None:
        self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))


def _to_registered(pv: Any) -> RegisteredPrompt:
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


def _check_id(what: str, value: str) -> None:
    """Ids go into MLflow search filters and run names, so keep them to a safe alphabet."""
    if not _SAFE_ID.fullmatch(value):
        raise TrackingError(
            f"{what} {value!r} cannot name an MLflow run: use letters, digits, '_', '-', '.', ':' (max 250)"
        )


def default_pip_requirements() -> list[str]:
    """Pinned requirements for a logged scikit-learn model, from the installed versions."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("scikit-learn", "numpy", "pandas", "scipy", "mlflow")]
