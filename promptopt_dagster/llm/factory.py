"""Build the LLM client a study asks for, wrapped in the persistent response cache.

The Vertex backend takes its throughput, retry, batch and price options from the settings
(`VERTEX_*`, see settings.py) through `VertexOptions`; the resource passes them here, so
production is a matter of settings and no code path differs between a test server and Gemini.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.llm.cache import CachedLLM

if TYPE_CHECKING:
    from promptopt_dagster.llm.vertex import BatchProgress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class VertexOptions:
    """The VertexLLM options that come from settings; None leaves VertexLLM's default."""

    concurrency: int = 16
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    timeout_s: float = 120.0
    mode: Literal["auto", "online", "batch"] = "auto"
    batch_threshold: int | None = None
    batch_gcs_prefix: str | None = None
    batch_poll_s: float = 30.0
    # USD per 1M tokens, model -> (input, output); replaces the built-in table when set.
    prices: Mapping[str, Sequence[float]] | None = None

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `VertexLLM` (checked here so a bad price table names the setting)."""
        options: dict[str, Any] = {
            "concurrency": self.concurrency,
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "max_attempts": self.max_attempts,
            "backoff_initial_s": self.backoff_initial_s,
            "timeout_s": self.timeout_s,
            "mode": self.mode,
            "batch_threshold": self.batch_threshold,
            "batch_gcs_prefix": self.batch_gcs_prefix,
            "batch_poll_s": self.batch_poll_s,
            "progress": _log_batch_progress,
        }
        if self.prices is not None:
            options["prices"] = _price_table(self.prices)
        if self.mode != "online" and self.batch_threshold and not self.batch_gcs_prefix:
            logger.warning("VERTEX_BATCH_THRESHOLD is set but there is no gs:// staging folder for batch "
                           "jobs, so every call goes online. Fix: set GCS_BUCKET_NAME or "
                           "VERTEX_BATCH_GCS_PREFIX")
        return options


def _price_table(prices: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    table: dict[str, tuple[float, float]] = {}
    for model, pair in prices.items():
        values = list(pair)
        if len(values) != 2 or any(v < 0 for v in values):
            raise ModelError(
                f"VERTEX_PRICES[{model!r}] must be [input, output] USD per 1M tokens (two numbers >= 0), "
                f"got {values!r}. Fix: e.g. VERTEX_PRICES='{{\"gemini-2.5-flash\": [0.30, 2.50]}}'"
            )
        table[model] = (float(values[0]), float(values[1]))
    return table


def _log_batch_progress(progress: BatchProgress) -> None:
    """Batch jobs run for minutes to hours: say where they are at every poll."""
    done = "" if progress.completed is None else f", {progress.completed}/{progress.total} rows done"
    logger.info("vertex batch job %s: %s after %.0f s%s", progress.job_name, progress.state,
                progress.elapsed_s, done)


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
    vertex_options: VertexOptions | None = None,
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
            **(vertex_options or VertexOptions()).kwargs(),
        )
    else:
        raise ModelError(f"unknown LLM backend {backend!r}; use 'local' or 'vertex'")
    if response_cache_path is None:
        return inner
    return CachedLLM(inner, response_cache_path)
