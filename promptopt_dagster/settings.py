"""Settings from the environment or `.env`, under the seed document's names."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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

    # Storage (production): assets, prompts and datasets under gs://GCS_BUCKET_NAME/GCS_PREFIX
    GCS_BUCKET_NAME: str | None = None
    GCS_PREFIX: str = "promptopt"

    # Tracking
    MLFLOW_TRACKING_URI: str | None = None

    @property
    def storage_root(self) -> str:
        if self.GCS_BUCKET_NAME:
            return f"gs://{self.GCS_BUCKET_NAME}/{self.GCS_PREFIX.strip('/')}"
        return str(self.PROMPTOPT_HOME / "store")

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
