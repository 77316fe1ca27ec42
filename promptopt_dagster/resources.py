"""Dagster resources: thin, configurable handles on the LLM backends and the prompt store."""

from __future__ import annotations

import os
from functools import cached_property
from typing import Literal

import dagster as dg
from pydantic import PrivateAttr

from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import ModelConfig, StudyConfig
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.llm.factory import build_client
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.tracking import MlflowTracker


class PromptStoreResource(dg.ConfigurableResource):
    """Registered studies, prompt versions and iteration decisions (a folder or gs:// prefix)."""

    root: str

    @cached_property
    def store(self) -> PromptStore:
        return PromptStore(self.root)


class VertexConfig(dg.Config, VertexOptions):
    """VertexOptions as Dagster config: the same fields and defaults, shown and editable in the
    UI. Dagster nests only `dg.Config` classes, so this mirror adds the base and nothing else."""


class LLMResource(dg.ConfigurableResource):
    """Builds the client for a study's primary or optimizer model. A study's `backend`/`name`
    override the defaults here."""

    backend: Literal["local", "vertex"] = "local"
    local_model_path: str | None = None
    model_cache_dir: str
    response_cache_path: str | None = None
    # A postgresql:// URL shared by every worker (LLM_CACHE_URL); it wins over the file above.
    # definitions.py passes it as dg.EnvVar so the password stays out of the UI.
    response_cache_url: str | None = None
    cache_enabled: bool = True
    vertex: VertexConfig = VertexConfig()

    _clients: dict[tuple, LLMClient] = PrivateAttr(default_factory=dict)

    @property
    def primary_model_name(self) -> str:
        """The Gemini model that runs the prompts when a study names none."""
        return self.vertex.primary_model

    @property
    def optimizer_model_name(self) -> str:
        """The Gemini model that rewrites the prompts when a study names none."""
        return self.vertex.optimizer_model

    def client(self, model: ModelConfig, role: Literal["primary", "optimizer"]) -> LLMClient:
        backend = model.backend or self.backend
        default_name = self.primary_model_name if role == "primary" else self.optimizer_model_name
        name = model.name or (self.local_model_path if backend == "local" else default_name)
        key = (backend, name)
        if key not in self._clients:
            self._clients[key] = build_client(
                backend=backend,
                model_name=name,
                model_cache_dir=self.model_cache_dir,
                response_cache_path=self.response_cache_path if self.cache_enabled else None,
                response_cache_url=self.response_cache_url if self.cache_enabled else None,
                vertex=self.vertex,
            )
        return self._clients[key]

    def primary(self, study: StudyConfig) -> LLMClient:
        return self.client(study.primary_model, "primary")

    def optimizer(self, study: StudyConfig) -> LLMClient:
        return self.client(study.optimizer_model, "optimizer")


class MlflowTrackerResource(dg.ConfigurableResource):
    """MLflow through `MlflowClient` with explicit run ids (no process-global active run, unlike
    dagster-mlflow); writes made while the server is down wait in an outbox (core/tracking.py)."""

    tracking_uri: str
    registry_uri: str | None = None
    ui_url: str | None = None  # the MLflow UI serving a local store, to make run links absolute
    outbox_path: str | None = None

    @cached_property
    def tracker(self) -> MlflowTracker:
        if self.tracking_uri.startswith(("http://", "https://")):
            # Fail over to the outbox in seconds, not MLflow's minutes of retries (core/tracking.py).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        return MlflowTracker(self.tracking_uri, self.registry_uri, outbox_path=self.outbox_path)

    def run_link(self, run_id: str) -> str | None:
        """An absolute link to the run in the MLflow UI, or None while the run is queued."""
        url = self.tracker.run_url(run_id)
        if url and url.startswith("#") and self.ui_url:
            return f"{self.ui_url.rstrip('/')}/{url}"
        return url


class MetaModelResource(dg.ConfigurableResource):
    """When the optimizer trusts the meta-model, and how it uses it (settings META_MODEL_*)."""

    min_spearman: float = 0.3  # cross-validated rank correlation needed before it is used
    overgenerate: int = 2  # propose this many times candidates_per_iteration ...
    keep_fraction: float = 0.5  # ... and screen only this share of candidates_per_iteration
    estimator: Literal["ridge", "forest"] = "ridge"
