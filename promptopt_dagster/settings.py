"""Settings from the environment or `.env`, under the seed document's names."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Where everything the embedded default writes lives: asset store, prompt store, LLM cache,
    # MLflow's SQLite file. DAGSTER_HOME defaults to <PROMPTOPT_HOME>/dagster.
    PROMPTOPT_HOME: Path = Field(default_factory=lambda: Path.cwd() / ".promptopt")

    # LLM
    LLM_BACKEND: Literal["local", "vertex"] = "local"
    LOCAL_MODEL_PATH: str | None = None
    LLM_CACHE_ENABLED: bool = True

    # Vertex AI (production)
    VERTEX_PROJECT_ID: str | None = None
    VERTEX_LOCATION: str = "us-central1"
    PRIMARY_MODEL_NAME: str = "gemini-2.5-flash"
    OPTIMIZER_MODEL_NAME: str = "gemini-2.5-pro"
    VERTEX_API_ENDPOINT: str | None = None  # only to point the client at a test server
    VERTEX_ACCESS_TOKEN: SecretStr | None = None  # only for test servers; production uses ADC
    # Throughput and faults: calls in flight, client-side quota (per minute), retries of 429/5xx.
    VERTEX_CONCURRENCY: int = Field(16, ge=1)
    VERTEX_REQUESTS_PER_MINUTE: float | None = None
    VERTEX_TOKENS_PER_MINUTE: float | None = None
    VERTEX_MAX_ATTEMPTS: int = Field(5, ge=1)
    VERTEX_BACKOFF_INITIAL_S: float = Field(1.0, ge=0.0)
    VERTEX_TIMEOUT_S: float = Field(120.0, gt=0.0)
    # Batch prediction jobs: always ("batch"), never ("online"), or ("auto") for calls of at least
    # VERTEX_BATCH_THRESHOLD rows. Staging files go under VERTEX_BATCH_GCS_PREFIX, by default
    # gs://GCS_BUCKET_NAME/GCS_PREFIX/batch.
    VERTEX_BATCH_MODE: Literal["auto", "online", "batch"] = "auto"
    VERTEX_BATCH_THRESHOLD: int | None = Field(None, ge=1)
    VERTEX_BATCH_GCS_PREFIX: str | None = None
    VERTEX_BATCH_POLL_S: float = Field(30.0, gt=0.0)
    # USD per 1M tokens, {"model": [input, output]} (JSON in the environment); replaces the
    # built-in table of llm/vertex.py DEFAULT_PRICES when set.
    VERTEX_PRICES: dict[str, tuple[float, float]] | None = None

    # Storage (production): assets, prompts and datasets under gs://GCS_BUCKET_NAME/GCS_PREFIX
    GCS_BUCKET_NAME: str | None = None
    GCS_PREFIX: str = "promptopt"

    # Evaluations over other datasets (assets/backfill.py): where dataset files are dropped (default
    # <PROMPTOPT_HOME>/datasets, or gs://GCS_BUCKET_NAME/GCS_PREFIX/datasets), whether the sensors
    # launch evaluations of new datasets / prompt versions themselves (else: backfill from the UI),
    # and how many rows are evaluated per chunk (bounds memory).
    DATASETS_URI: str | None = None
    BACKFILL_AUTO_EVALUATE: bool = False
    EVALUATION_CHUNK_ROWS: int = Field(1000, ge=1)

    # Tracking
    MLFLOW_TRACKING_URI: str | None = None
    MLFLOW_UI_PORT: int = Field(5000, ge=1, le=65535)  # `promptopt ui` serves MLflow's UI here
    # Meta-model: used by the optimizer once its cross-validated Spearman reaches the threshold;
    # it then proposes OVERGENERATE x candidates_per_iteration and screens KEEP_FRACTION of them.
    META_MODEL_MIN_SPEARMAN: float = 0.3
    META_MODEL_OVERGENERATE: int = Field(2, ge=1)
    META_MODEL_KEEP_FRACTION: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _vertex_by_default_in_production(self) -> Settings:
        """Setting VERTEX_PROJECT_ID is enough to run on Gemini; an explicit LLM_BACKEND wins."""
        if "LLM_BACKEND" not in self.model_fields_set and self.VERTEX_PROJECT_ID:
            self.LLM_BACKEND = "vertex"
        return self

    @property
    def batch_gcs_prefix(self) -> str | None:
        """Where Vertex batch jobs stage their JSONL: the setting, else <bucket>/<prefix>/batch."""
        if self.VERTEX_BATCH_GCS_PREFIX:
            return self.VERTEX_BATCH_GCS_PREFIX.rstrip("/")
        return f"{self.storage_root}/batch" if self.GCS_BUCKET_NAME else None

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
