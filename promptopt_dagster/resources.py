"""Dagster resources: thin, configurable handles on the LLM backends and the prompt store."""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import dagster as dg
from pydantic import PrivateAttr

from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import ModelConfig, StudyConfig
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.llm.factory import build_client


class PromptStoreResource(dg.ConfigurableResource):
    """Registered studies, prompt versions and iteration decisions (a folder or gs:// prefix)."""

    root: str

    @cached_property
    def store(self) -> PromptStore:
        return PromptStore(self.root)


class LLMResource(dg.ConfigurableResource):
    """Builds the client for a study's primary or optimizer model. A study's `backend`/`name`
    override the defaults here."""

    backend: Literal["local", "vertex"] = "local"
    local_model_path: str | None = None
    model_cache_dir: str
    response_cache_path: str | None = None
    cache_enabled: bool = True
    vertex_project: str | None = None
    vertex_location: str = "us-central1"
    vertex_api_endpoint: str | None = None
    vertex_access_token: str | None = None
    primary_model_name: str = "gemini-2.5-flash"
    optimizer_model_name: str = "gemini-2.5-pro"

    _clients: dict[tuple, LLMClient] = PrivateAttr(default_factory=dict)

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
                vertex_project=self.vertex_project,
                vertex_location=self.vertex_location,
                vertex_api_endpoint=self.vertex_api_endpoint,
                vertex_access_token=self.vertex_access_token,
            )
        return self._clients[key]

    def primary(self, study: StudyConfig) -> LLMClient:
        return self.client(study.primary_model, "primary")

    def optimizer(self, study: StudyConfig) -> LLMClient:
        return self.client(study.optimizer_model, "optimizer")
