"""MLflow logging of each iteration: the last asset of the iteration job, after the decision.

The decision is already saved in the prompt store when this runs, so tracking can never lose an
optimization: an MLflow outage queues the writes in the tracker's outbox (replayed on the next
successful call), and any other MLflow error is logged as a warning and shown in the metadata.
"""

import dagster as dg
import pandas as pd
from pydantic import BaseModel, Field

from promptopt_dagster.assets.common import iteration_asset, study_iteration
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.core.study import ModelConfig
from promptopt_dagster.redaction import redact
from promptopt_dagster.resources import LLMResource, MlflowTrackerResource, PromptStoreResource
from promptopt_dagster.tracking import build_iteration_log, experiment_name, log_iteration, prompt_name


class TrackingOutcome(BaseModel):
    """What the iteration_tracking asset logged: the MLflow run, its candidate runs and the
    registered prompt versions, or the error when MLflow logging failed."""

    status: str  # "logged", "<n> call(s) queued (MLflow unreachable)" or "failed"
    error: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    candidate_runs: dict[str, str] = Field(default_factory=dict)  # candidate id -> run id
    prompt_versions: dict[str, int | None] = Field(default_factory=dict)  # None: queued


def model_name(llm: LLMResource, model: ModelConfig, role: str) -> str:
    """The model a step used, named as LLMResource.client resolves it (without building it)."""
    backend = model.backend or llm.backend
    default = llm.primary_model_name if role == "primary" else llm.optimizer_model_name
    name = model.name or (llm.local_model_path if backend == "local" else default)
    return f"{backend}:{name or 'embedded default'}"


def dagster_tags(context: dg.AssetExecutionContext) -> dict[str, str]:
    return {
        "dagster.run_id": context.run.run_id,
        "dagster.partition": str(context.partition_key),
        "dagster.asset_key": context.asset_key.to_user_string(),
    }


def iteration_started_at(context: dg.AssetExecutionContext) -> float | None:
    """When the Dagster run that took this partition's decision started (epoch seconds): the
    start `IterationRecord.wall_seconds` is measured from. That run is this one unless only the
    tracking step was re-materialized."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey("iteration_decision"), asset_partitions=[str(context.partition_key)]
        ),
        limit=1,
    ).records
    run_id = records[0].run_id if records else context.run_id
    return context.instance.get_run_stats(run_id).start_time


@iteration_asset(kinds={"mlflow"})
def iteration_tracking(
    context: dg.AssetExecutionContext,
    mlflow: MlflowTrackerResource,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    iteration_decision: IterationRecord,
    current_prompt: PromptState,
    candidate_prompts: CandidateSet,
    baseline_predictions: pd.DataFrame,
    candidate_predictions: pd.DataFrame,
    baseline_metrics: EvaluationMetrics,
    candidate_metrics: CandidateMetrics,
) -> TrackingOutcome:
    """The iteration's MLflow run (nested runs per candidate) and the accepted prompt's version
    in the Prompt Registry; the metadata links to the run."""
    study = study_iteration(context, prompt_store).study
    log = build_iteration_log(
        study,
        iteration_decision,
        (current_prompt, candidate_prompts),
        (baseline_predictions, candidate_predictions),
        (baseline_metrics, candidate_metrics),
        models={
            "primary": model_name(llm, study.primary_model, "primary"),
            "optimizer": model_name(llm, study.optimizer_model, "optimizer"),
        },
        tags=dagster_tags(context),
        started_at=iteration_started_at(context),
    )
    tracker = mlflow.tracker
    metadata: dict[str, dg.RawMetadataValue] = {
        "mlflow_experiment": experiment_name(study.name),
        "prompt_registry_name": prompt_name(study.name),
    }
    try:
        logged = log_iteration(tracker, log)
    except Exception as exc:  # tracking must never fail an optimization that is already saved
        message = f"MLflow logging failed ({type(exc).__name__}: {redact(str(exc))[:300]})"
        context.log.warning(message + "; the iteration's decision is saved, only its tracking is missing")
        context.add_output_metadata({**metadata, "mlflow_status": message})
        return TrackingOutcome(status="failed", error=message)
    link = mlflow.run_link(logged.run_id)
    status = "logged" if not logged.queued else f"{logged.queued} call(s) queued (MLflow unreachable)"
    if logged.queued:
        context.log.warning(f"MLflow is unreachable: {status} in {tracker.outbox_path}; replayed later")
    metadata |= {
        "mlflow_status": status,
        "mlflow_run": dg.MetadataValue.url(link) if link else "queued (MLflow unreachable)",
        "mlflow_run_id": logged.run_id,
        "candidate_runs": len(logged.candidate_runs),
        "prompt_versions": dg.MetadataValue.json({k: v for k, v in logged.prompt_versions.items()}),
    }
    context.add_output_metadata(metadata)
    return TrackingOutcome(
        status=status,
        run_id=logged.run_id,
        run_url=link,
        candidate_runs=logged.candidate_runs,
        prompt_versions=logged.prompt_versions,
    )
