"""Jobs: one iteration of a study, and the study report; and where their steps execute.

The jobs carry no executor of their own: `build_definitions` gives the whole code location the
one `executor_for(settings)` picks (DAGSTER_EXECUTOR), so sensors and the driver keep using these
job objects and names whatever the executor. A `dg.Definitions` built without `executor=` runs
them on Dagster's default (a process per step, about 3 s each on this project's imports); the
driver's `execute_in_process` always runs in its own process."""

from __future__ import annotations

import dagster as dg
from dagster import AssetSelection

from promptopt_dagster.errors import ExecutorSettingsError
from promptopt_dagster.partitions import evaluation_partitions, study_iteration_partitions, study_partitions
from promptopt_dagster.settings import Settings

ITERATION_JOB = "iteration_job"
REPORT_JOB = "report_job"
# Evaluations over other datasets (assets/backfill.py). Backfills from the UI run the asset
# directly; these jobs are what the sensors request.
EVALUATION_JOB = "evaluation_job"
COMPARISON_JOB = "comparison_job"


JOB_DESCRIPTIONS = {
    ITERATION_JOB: "The five steps of one iteration of one study.",
    REPORT_JOB: "Scores the seed and the final prompt on the held-out test split.",
    EVALUATION_JOB: "Scores one prompt version on one dataset file (a prompt version x dataset partition).",
    COMPARISON_JOB: "Gathers every evaluation into the prompt version x dataset x metric table.",
}


def _asset_job(
    name: str, selection: AssetSelection, partitions: dg.PartitionsDefinition | None = None
) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        name, selection=selection, partitions_def=partitions, description=JOB_DESCRIPTIONS[name]
    )


iteration_job = _asset_job(ITERATION_JOB, AssetSelection.groups("iteration"), study_iteration_partitions)
report_job = _asset_job(REPORT_JOB, AssetSelection.assets("study_report"), study_partitions)
evaluation_job = _asset_job(EVALUATION_JOB, AssetSelection.assets("prompt_evaluation"), evaluation_partitions)
comparison_job = _asset_job(COMPARISON_JOB, AssetSelection.assets("evaluation_comparison"))

WORKERS_EXTRA = "pip install 'promptopt_dagster[workers]'"
STEP_START_LIMIT = "promptopt_dagster.step_starts:StepStartLimit"


# Celery settings that let a run ride through the faults of its broker and workers:
# - a broker / result-backend restart (Redis restarted while steps run): the executor's polls for
#   results and the workers' result writes retry a connection error with backoff (10 ms
#   doubling, at most 10 s apart; 20 tries, about 2 minutes) instead of failing the run, and
#   task submission retries for as long;
# - a worker's pool process killed inside a step (SIGKILL, the OOM killer): the task is
#   acknowledged only once the step ends, and a task whose process was lost goes back to the
#   queue, so a worker runs the step again (its answered LLM calls come from the response
#   cache). Each worker reserves one task at a time, so a lost worker holds no queued ones.
#   A step whose process dies in each of MAX_STEP_STARTS starts fails instead of going back to
#   the queue forever (step_starts.StepStartLimit, a task annotation the workers apply).
# - a whole worker lost (its machine, or every process of it killed): its task goes to another
#   worker once CELERY_VISIBILITY_TIMEOUT_S has passed (celery_config_source).
# The workers take the same settings (deploy/celery/worker.yaml).
CELERY_FAULT_SETTINGS: dict[str, object] = {
    "result_backend_always_retry": True,
    "result_backend_max_retries": 20,
    "task_publish_retry_policy": {
        "max_retries": 20,
        "interval_start": 0,
        "interval_step": 1,
        "interval_max": 10,
    },
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_annotations": STEP_START_LIMIT,
}


def celery_config_source(settings: Settings) -> dict[str, object]:
    """The Celery settings of executor and workers: CELERY_FAULT_SETTINGS, and the visibility
    timeout after which a task taken by a worker that died entirely goes to another worker
    (the Redis transport sweeps for such tasks about every 100 s)."""
    return {
        **CELERY_FAULT_SETTINGS,
        "broker_transport_options": {"visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT_S},
    }


def executor_for(settings: Settings) -> dg.ExecutorDefinition:
    """The executor DAGSTER_EXECUTOR names. in_process: every step in the run's process (the
    embedded model loads once per run). celery: each step is a Celery task that a
    `dagster-celery worker` runs, reached through CELERY_BROKER_URL (results through
    CELERY_BACKEND_URL, else the broker). k8s: each step a Kubernetes Job, with the image, env
    and secrets of the K8sRunLauncher that launched the run (deploy/k8s/values.yaml)."""
    kind = settings.DAGSTER_EXECUTOR
    if kind == "in_process":
        return dg.in_process_executor
    if kind == "celery":
        if not settings.CELERY_BROKER_URL:
            raise ExecutorSettingsError(
                "DAGSTER_EXECUTOR=celery needs CELERY_BROKER_URL, the broker the workers listen on "
                "(e.g. redis://127.0.0.1:6379/0); set it, or DAGSTER_EXECUTOR=in_process"
            )
        try:
            from dagster_celery import celery_executor
        except ImportError as exc:
            raise ExecutorSettingsError(
                f"DAGSTER_EXECUTOR=celery needs dagster-celery: {WORKERS_EXTRA}"
            ) from exc
        # The URLs may carry a password: they stay in this closure, out of run config and UI.
        config = {
            "broker": settings.CELERY_BROKER_URL,
            "backend": settings.CELERY_BACKEND_URL or settings.CELERY_BROKER_URL,
            "config_source": celery_config_source(settings),
        }
        return celery_executor.configured(config, name="celery")
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as exc:
        raise ExecutorSettingsError(f"DAGSTER_EXECUTOR=k8s needs dagster-k8s: {WORKERS_EXTRA}") from exc
    return k8s_job_executor
