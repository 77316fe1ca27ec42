"""The single entry point: every asset, job, sensor and resource, configured from settings."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from promptopt_dagster.assets.backfill import BACKFILL_ASSETS, DatasetsResource
from promptopt_dagster.assets.decision import iteration_decision
from promptopt_dagster.assets.evaluation import baseline_metrics, candidate_metrics
from promptopt_dagster.assets.inference import baseline_predictions, candidate_predictions
from promptopt_dagster.assets.launch import start_study_job
from promptopt_dagster.assets.meta_model import meta_model
from promptopt_dagster.assets.prompt import current_prompt
from promptopt_dagster.assets.refinement import candidate_prompts
from promptopt_dagster.assets.report import study_report
from promptopt_dagster.assets.tracking import iteration_tracking
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster.jobs import comparison_job, evaluation_job, executor_for, iteration_job, report_job
from promptopt_dagster.resources import (
    LLMResource,
    MetaModelResource,
    MlflowTrackerResource,
    PromptStoreResource,
    VertexConfig,
)
from promptopt_dagster.sensors import (
    continue_study_sensor,
    evaluation_comparison_sensor,
    new_dataset_sensor,
    new_prompt_version_sensor,
    new_study_sensor,
)
from promptopt_dagster.settings import Settings, get_settings

ASSETS = [
    current_prompt,
    baseline_predictions,
    baseline_metrics,
    candidate_prompts,
    candidate_predictions,
    candidate_metrics,
    iteration_decision,
    study_report,
]
# MLflow logging and the meta-model: steps of the iteration job (group "iteration") that need the
# `mlflow` and `meta_model_policy` resources; kept apart so a graph without tracking stays valid.
TRACKING_ASSETS = [iteration_tracking, meta_model]
# Evaluations over other datasets: what starts them and gathers their table.
EVALUATION_JOBS = [evaluation_job, comparison_job]
EVALUATION_SENSORS = [new_dataset_sensor, new_prompt_version_sensor, evaluation_comparison_sensor]


def build_tracking_resources(settings: Settings) -> dict[str, object]:
    return {
        "mlflow": MlflowTrackerResource(
            tracking_uri=settings.mlflow_uri,
            ui_url=None if settings.MLFLOW_TRACKING_URI else f"http://127.0.0.1:{settings.MLFLOW_UI_PORT}",
        ),
        "meta_model_policy": MetaModelResource(
            min_spearman=settings.META_MODEL_MIN_SPEARMAN,
            overgenerate=settings.META_MODEL_OVERGENERATE,
            keep_fraction=settings.META_MODEL_KEEP_FRACTION,
        ),
    }


def build_resources(settings: Settings) -> dict[str, object]:
    root = settings.storage_root
    return {
        "io_manager": PromptoptIOManager(base_uri=f"{root}/assets"),
        "prompt_store": PromptStoreResource(root=root),
        "llm": LLMResource(
            backend=settings.LLM_BACKEND,
            local_model_path=settings.LOCAL_MODEL_PATH,
            model_cache_dir=str(settings.cache_dir / "models"),
            response_cache_path=str(settings.cache_dir / "llm_responses.sqlite"),
            # The shared cache's URL (it may hold a password) by name too, like the token below.
            response_cache_url=dg.EnvVar("LLM_CACHE_URL") if settings.LLM_CACHE_URL else None,
            cache_enabled=settings.LLM_CACHE_ENABLED,
            # The token by name, so the UI shows the variable, never the token.
            vertex=VertexConfig(
                **settings.vertex.model_dump(),
                access_token=dg.EnvVar("VERTEX_ACCESS_TOKEN") if settings.vertex.access_token else None,
            ),
        ),
        **build_tracking_resources(settings),
        "datasets": DatasetsResource(
            uri=settings.datasets_uri,
            auto_evaluate=settings.BACKFILL_AUTO_EVALUATE,
            chunk_rows=settings.EVALUATION_CHUNK_ROWS,
            shard_rows=settings.EVALUATION_SHARD_ROWS,
        ),
    }


def build_definitions(
    settings: Settings | None = None,
    *,
    resources: Mapping[str, object] | None = None,
    tracking: bool = True,
    evaluations: bool = True,
) -> dg.Definitions:
    """The code location: every asset, job and sensor with the resources `settings` pick.
    `resources` replace built ones by key (tests: the scripted LLM); `tracking=False` leaves out
    MLflow logging and the meta-model, `evaluations=False` the evaluations over other datasets."""
    settings = settings or get_settings()
    return dg.Definitions(
        assets=[*ASSETS, *(TRACKING_ASSETS if tracking else []), *(BACKFILL_ASSETS if evaluations else [])],
        jobs=[iteration_job, report_job, start_study_job, *(EVALUATION_JOBS if evaluations else [])],
        sensors=[new_study_sensor, continue_study_sensor, *(EVALUATION_SENSORS if evaluations else [])],
        resources={**build_resources(settings), **(resources or {})},
        executor=executor_for(settings),  # every job's: DAGSTER_EXECUTOR (jobs.py)
    )


defs = build_definitions()
