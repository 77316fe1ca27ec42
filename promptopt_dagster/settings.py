"""Settings from the environment or `.env`, under the names the original API used."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from promptopt_dagster.llm.vertex_options import VertexOptions

_VERTEX = "VERTEX_"
_ROLE_MODELS = {"PRIMARY_MODEL_NAME": "primary_model", "OPTIMIZER_MODEL_NAME": "optimizer_model"}


class Settings(BaseSettings):
    # VERTEX_CONCURRENCY -> vertex.concurrency: the variable's name split once at the first "_".
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore",
                                      env_nested_delimiter="_", env_nested_max_split=1)

    # Where everything the embedded default writes lives: asset store, prompt store, LLM cache,
    # MLflow's SQLite file. DAGSTER_HOME defaults to <PROMPTOPT_HOME>/dagster.
    PROMPTOPT_HOME: Path = Field(default_factory=lambda: Path.cwd() / ".promptopt")

    # LLM
    LLM_BACKEND: Literal["local", "vertex"] = "local"
    LOCAL_MODEL_PATH: str | None = None
    LLM_CACHE_ENABLED: bool = True
    # The response cache shared by workers on several machines: a postgresql:// URL (a table
    # `responses` in that database, created if missing). Unset: a SQLite file under PROMPTOPT_HOME.
    # It may hold a password: kept out of repr and dumps, and passed to Dagster by name.
    LLM_CACHE_URL: str | None = Field(None, repr=False, exclude=True)

    # Vertex AI (production): VERTEX_<FIELD> sets VertexOptions.<field> (llm/vertex_options.py
    # declares each with its default), e.g. VERTEX_PROJECT_ID, VERTEX_CONCURRENCY, VERTEX_PRICES
    # (JSON). VERTEX_BATCH_GCS_PREFIX defaults to gs://GCS_BUCKET_NAME/GCS_PREFIX/batch.
    vertex: VertexOptions = VertexOptions()
    # The two roles' Gemini models (VertexOptions.primary_model / optimizer_model); unset keeps
    # the defaults there.
    PRIMARY_MODEL_NAME: str | None = None
    OPTIMIZER_MODEL_NAME: str | None = None

    # Storage (production): assets, prompts and datasets under gs://GCS_BUCKET_NAME/GCS_PREFIX
    GCS_BUCKET_NAME: str | None = None
    GCS_PREFIX: str = "promptopt"

    # Evaluations over other datasets (assets/backfill.py): where dataset files are dropped (default
    # <PROMPTOPT_HOME>/datasets, or gs://GCS_BUCKET_NAME/GCS_PREFIX/datasets), whether the sensors
    # launch evaluations of new datasets / prompt versions themselves (else: backfill from the UI),
    # how many rows are evaluated per chunk (bounds memory) and per shard (a step of its own, so
    # workers share a big dataset).
    DATASETS_URI: str | None = None
    BACKFILL_AUTO_EVALUATE: bool = False
    EVALUATION_CHUNK_ROWS: int = Field(1000, ge=1)
    EVALUATION_SHARD_ROWS: int = Field(10_000, ge=1)

    # Tracking
    MLFLOW_TRACKING_URI: str | None = None
    MLFLOW_UI_PORT: int = Field(5000, ge=1, le=65535)  # `promptopt ui` serves MLflow's UI here
    # Meta-model: used by the optimizer once its cross-validated Spearman reaches the threshold;
    # it then proposes OVERGENERATE x candidates_per_iteration and screens KEEP_FRACTION of them.
    META_MODEL_MIN_SPEARMAN: float = 0.3
    META_MODEL_OVERGENERATE: int = Field(2, ge=1)
    META_MODEL_KEEP_FRACTION: float = Field(0.5, gt=0.0, le=1.0)

    # The Dagster instance the CLI prepares (instance_config.py decides its dagster.yaml).
    # DAGSTER_PG_URL: run, event-log and schedule storage on PostgreSQL (dagster-postgres) instead
    # of SQLite files in DAGSTER_HOME; the file names the variable, never the URL or its password.
    # LLM_POOL_LIMIT: how many LLM-calling steps may run at once across every run on the instance
    # (the Dagster concurrency pool "llm"); unset = no limit. Requests in flight stay at most
    # LLM_POOL_LIMIT x VERTEX_CONCURRENCY.
    DAGSTER_PG_URL: str | None = Field(None, repr=False)
    LLM_POOL_LIMIT: int | None = Field(None, ge=1)

    # Where a run's steps execute (jobs.py executor_for): "in_process" (default: one process, the
    # embedded model loads once), "celery" (each step a task on `dagster-celery` workers through
    # the broker; needs CELERY_BROKER_URL), "k8s" (each step a Kubernetes Job, dagster-k8s). Both
    # scale-out executors need storage every worker reaches: GCS_BUCKET_NAME and a Postgres
    # Dagster instance. The result backend defaults to the broker (Redis serves as both).
    DAGSTER_EXECUTOR: Literal["in_process", "celery", "k8s"] = "in_process"
    CELERY_BROKER_URL: str | None = Field(None, repr=False)
    CELERY_BACKEND_URL: str | None = Field(None, repr=False)
    # A step whose whole worker died (machine lost, worker killed) is handed to another worker
    # this long after it was taken (Redis' visibility timeout): longer than the longest step, or
    # a step still running is handed out a second time. Workers take it from worker.yaml.
    CELERY_VISIBILITY_TIMEOUT_S: int = Field(3600, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _gather_vertex_options(cls, data: Any) -> Any:
        """Keyword arguments by their variable names (`Settings(VERTEX_CONCURRENCY=4)`) join those
        from the environment in `vertex`; other VERTEX_* variables are not ours and are ignored."""
        if not isinstance(data, dict) or isinstance(data.get("vertex"), VertexOptions):
            return data
        fields = VertexOptions.model_fields
        options = {k: v for k, v in dict(data.get("vertex") or {}).items() if k in fields}
        rest: dict[str, Any] = {}
        for key, value in data.items():
            name = key.upper()
            field = name[len(_VERTEX):].lower() if name.startswith(_VERTEX) else None
            if field in fields:
                options[field] = value
            elif key != "vertex":
                rest[key] = value
        return {**rest, "vertex": options}

    @model_validator(mode="after")
    def _resolve_vertex_options(self) -> Settings:
        """The options as the client gets them: role models and the batch staging folder filled
        in. Setting VERTEX_PROJECT_ID is enough to run on Gemini; an explicit LLM_BACKEND wins."""
        updates: dict[str, Any] = {field: getattr(self, name) for name, field in _ROLE_MODELS.items()
                                   if getattr(self, name)}
        prefix = self.vertex.batch_gcs_prefix
        if prefix:
            updates["batch_gcs_prefix"] = prefix.rstrip("/")
        elif self.GCS_BUCKET_NAME:
            updates["batch_gcs_prefix"] = f"{self.storage_root}/batch"
        if updates:
            self.vertex = self.vertex.model_copy(update=updates)
        if "LLM_BACKEND" not in self.model_fields_set and self.vertex.project_id:
            self.LLM_BACKEND = "vertex"
        return self

    @property
    def storage_root(self) -> str:
        if self.GCS_BUCKET_NAME:
            return f"gs://{self.GCS_BUCKET_NAME}/{self.GCS_PREFIX.strip('/')}"
        return str(self.PROMPTOPT_HOME / "store")

    @property
    def datasets_uri(self) -> str:
        """The datasets location: the setting, else <storage>/datasets (a folder or gs:// prefix)."""
        if self.DATASETS_URI:
            return self.DATASETS_URI.rstrip("/")
        if self.GCS_BUCKET_NAME:
            return f"gs://{self.GCS_BUCKET_NAME}/{self.GCS_PREFIX.strip('/')}/datasets"
        return str(self.PROMPTOPT_HOME / "datasets")

    @property
    def cache_dir(self) -> Path:
        return self.PROMPTOPT_HOME / "cache"

    @property
    def dagster_home(self) -> Path:
        return self.PROMPTOPT_HOME / "dagster"

    @property
    def mlflow_uri(self) -> str:
        return self.MLFLOW_TRACKING_URI or f"sqlite:///{self.PROMPTOPT_HOME / 'mlflow.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
