"""Build the LLM client a study asks for, wrapped in the persistent response cache."""

from __future__ import annotations

from pathlib import Path

from promptopt_dagster.core.errors import ModelError
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.llm.cache import CachedLLM


def build_client(
    *,
    backend: str,
    model_name: str | None,
    model_cache_dir: str | Path,
    response_cache_path: str | Path | None,
    vertex_project: str | None = None,
    vertex_location: str = "us-central1",
    vertex_api_endpoint: str | None = None,
    vertex_access_token: str | None = None,
) -> LLMClient:
    inner: LLMClient
    if backend == "local":
        from promptopt_dagster.llm.local import LocalLLM

        inner = LocalLLM(model_path=model_name, cache_dir=model_cache_dir)
    elif backend == "vertex":
        from promptopt_dagster.llm.vertex import VertexLLM

        if not model_name:
            raise ModelError(
                "backend vertex needs a model name: set PRIMARY_MODEL_NAME / OPTIMIZER_MODEL_NAME"
            )
        inner = VertexLLM.from_settings(
            model=model_name,
            project=vertex_project,
            location=vertex_location,
            api_endpoint=vertex_api_endpoint,
            access_token=vertex_access_token,
        )
    else:
        raise ModelError(f"unknown LLM backend {backend!r}; use 'local' or 'vertex'")
    if response_cache_path is None:
        return inner
    return CachedLLM(inner, response_cache_path)
