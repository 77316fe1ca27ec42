"""The single entry point: every asset, job, sensor and resource, configured from settings."""

from __future__ import annotations

import dagster as dg

from promptopt_dagster.assets.decision import iteration_decision
from promptopt_dagster.assets.evaluation import baseline_metrics, candidate_metrics
from promptopt_dagster.assets.inference import baseline_predictions, candidate_predictions
from promptopt_dagster.assets.prompt import current_prompt
from promptopt_dagster.assets.refinement import candidate_prompts
from promptopt_dagster.assets.report import study_report
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster.jobs import iteration_job, report_job
from promptopt_dagster.resources import LLMResource, PromptStoreResource
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
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
            cache_enabled=settings.LLM_CACHE_ENABLED,
            vertex_project=settings.VERTEX_PROJECT_ID,
            vertex_location=settings.VERTEX_LOCATION,
            vertex_api_endpoint=settings.VERTEX_API_ENDPOINT,
            # By name, so the UI shows the variable, never the token.
            vertex_access_token=dg.EnvVar("VERTEX_ACCESS_TOKEN") if settings.VERTEX_ACCESS_TOKEN else None,
            primary_model_name=settings.PRIMARY_MODEL_NAME,
            optimizer_model_name=settings.OPTIMIZER_MODEL_NAME,
        ),
    }


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    return dg.Definitions(
        assets=ASSETS,
        jobs=[iteration_job, report_job],
        sensors=[new_study_sensor, continue_study_sensor],
        resources=build_resources(settings or get_settings()),
    )


defs = build_definitions()
