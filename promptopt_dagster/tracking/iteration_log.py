"""What MLflow records for one iteration, decided without Dagster (`build_iteration_log`) and
written by `log_iteration`: the parent run ``iteration-NNNN`` in experiment ``promptopt/<study>``
(`iteration_run.py`), one nested run per candidate (`candidates.py`), and the Prompt Registry
versions (`prompt_versions.py`). Runs are found again by tag, so re-logging is idempotent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.tracking.candidates import CandidateLog, candidate_run_logs, log_candidates
from promptopt_dagster.tracking.client import MlflowTracker
from promptopt_dagster.tracking.iteration_run import iteration_run_log
from promptopt_dagster.tracking.prompt_versions import (
    PromptVersionLog,
    prompt_version_logs,
    register_versions,
)
from promptopt_dagster.tracking.run_log import IterationValues, RunLog, log_run, model_params
from promptopt_dagster.tracking.traces import iteration_trace


@dataclass
class IterationLog:
    study: str
    iteration: int
    parent: RunLog
    candidates: list[CandidateLog]
    prompts: list[PromptVersionLog]
    start_time_ms: int | None = None  # when the iteration's work started (None: when logged)
    end_time_ms: int | None = None  # when it took its decision (None: when logged)
    trace: dict[str, Any] | None = None  # its LLM calls (`traces.iteration_trace`)


@dataclass
class LoggedIteration:
    run_id: str
    candidate_runs: dict[str, str]
    prompt_versions: dict[str, int | None]  # PromptState id -> registry version (None: queued)
    queued: int  # calls waiting in the outbox after logging (0 when MLflow was reachable)


def build_iteration_log(
    study: StudyConfig,
    record: IterationRecord,
    prompts: tuple[PromptState, CandidateSet],
    predictions: tuple[pd.DataFrame, pd.DataFrame],
    metrics: tuple[EvaluationMetrics, CandidateMetrics],
    models: Mapping[str, str],
    tags: Mapping[str, str],
    started_at: float | None = None,
) -> IterationLog:
    """Everything to log for `record`, from the values of the iteration's assets: `prompts`,
    `predictions` and `metrics` each pair the incumbent's with the candidates'. `models` maps
    ``primary`` / ``optimizer`` to the model names actually used; `tags` are added to every run
    (the orchestrator's run id, partition and asset key). `started_at` (epoch seconds) is when
    the iteration's work started: the iteration run spans from it to the decision,
    ``started_at + record.wall_seconds``."""
    (incumbent, candidate_prompts), (baseline_predictions, candidate_predictions) = prompts, predictions
    baseline_metrics, candidate_metrics = metrics
    values = IterationValues(
        study=study,
        record=record,
        incumbent=incumbent,
        baseline_predictions=baseline_predictions,
        baseline_metrics=baseline_metrics,
        candidate_prompts=candidate_prompts,
        candidate_predictions=candidate_predictions,
        candidate_metrics=candidate_metrics,
        common_params=model_params(study, models),
        run_tags={str(k): str(tag) for k, tag in tags.items()},
    )
    parent, candidates = iteration_run_log(values), candidate_run_logs(values)
    prompts = prompt_version_logs(values)
    start_ms = None if started_at is None else int(started_at * 1000)
    wall = record.wall_seconds
    end_ms = None if start_ms is None or wall is None else start_ms + int(wall * 1000)
    trace = iteration_trace(values, start_ms)
    return IterationLog(study.name, record.iteration, parent, candidates, prompts, start_ms, end_ms, trace)


def log_iteration(tracker: MlflowTracker, log: IterationLog) -> LoggedIteration:
    """Write `log` to MLflow. During an outage every call is queued in the tracker's outbox and
    replayed later; nothing here raises for an outage. A rejected iteration registers nothing:
    the alias stays on the champion it already points at."""
    parent = log.parent
    run_id = tracker.iteration_run(
        log.study, log.iteration, params=parent.params, tags=parent.tags, start_time_ms=log.start_time_ms
    )
    log_run(tracker, run_id, log.parent, log.iteration)
    candidate_runs = log_candidates(
        tracker, run_id, log.candidates, log.iteration, log.start_time_ms, log.end_time_ms
    )
    versions = register_versions(tracker, log.study, log.prompts, candidate_runs, run_id)
    if log.trace is not None:
        tracker.log_trace(run_id, f"{log.study}.{log.iteration:04d}", log.trace)
    tracker.end_run(run_id, end_time_ms=log.end_time_ms)
    return LoggedIteration(run_id, candidate_runs, versions, len(tracker.pending()))
