"""Build the LLM client a study asks for, wrapped in the persistent response cache.

The Vertex backend takes its `VertexOptions` as they come from the settings (through the Dagster
resource), so production is a matter of settings and no code path differs between a test server
and Gemini.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.vertex_options import VertexOptions

if TYPE_CHECKING:
    from promptopt_dagster.llm.vertex_batch import BatchProgress

logger = logging.getLogger(__name__)


def _log_batch_progress(progress: BatchProgress) -> None:
    """Batch jobs run for minutes to hours: say where they are at every poll."""
    done = "" if progress.completed is None else f", {progress.completed}/{progress.total} rows done"
    logger.info("vertex batch job %s: %s after %.0f s%s", progress.job_name, progress.state,
                progress.elapsed_s, done)


def _warn_if_batch_is_off(options: VertexOptions) -> None:
    """A threshold without a staging folder silently keeps every call online: say so."""
    if options.batch_mode != "online" and options.batch_threshold and not options.batch_gcs_prefix:
        logger.warning("VERTEX_BATCH_THRESHOLD is set but there is no gs:// staging folder for batch "
                       "jobs, so every call goes online. Fix: set GCS_BUCKET_NAME or "
                       "VERTEX_BATCH_GCS_PREFIX")


def build_client(
    *,
    backend: str,
    model_name: str | None,
    model_cache_dir: str | Path,
    response_cache_path: str | Path | None,
    vertex: VertexOptions | None = None,
    response_cache_url: str | None = None,
) -> LLMClient:
    """The backend's client behind the response cache: `response_cache_url` (a shared database)
    when given, else the SQLite file `response_cache_path`; neither means no cache."""
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
        options = vertex or VertexOptions()
        _warn_if_batch_is_off(options)
        inner = VertexLLM(options, model_name, progress=_log_batch_progress)
    else:
        raise ModelError(f"unknown LLM backend {backend!r}; use 'local' or 'vertex'")
    location = response_cache_url or response_cache_path
    if location is None:
        return inner
    return CachedLLM(inner, location)
