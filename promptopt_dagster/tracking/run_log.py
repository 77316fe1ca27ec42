"""What one MLflow run of an iteration gets, the iteration's values its runs are built from, and
the conversions the parent and candidate runs share (usage metrics, per-split metrics, prompt
texts, predictions joined with their scores)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import Candidate, IterationRecord
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.tracking.client import MlflowTracker


@dataclass
class RunLog:
    """Everything one MLflow run gets."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path (.json) -> table


@dataclass(frozen=True)
class IterationValues:
    """The values of an iteration's assets, plus what every run of it shares."""

    study: StudyConfig
    record: IterationRecord
    incumbent: PromptState
    baseline_predictions: pd.DataFrame
    baseline_metrics: EvaluationMetrics
    candidate_prompts: CandidateSet
    candidate_predictions: pd.DataFrame
    candidate_metrics: CandidateMetrics
    common_params: Mapping[str, Any]  # the models and temperatures (`model_params`)
    run_tags: Mapping[str, str]  # added to every run

    @property
    def candidates(self) -> list[Candidate]:
        return self.candidate_prompts.candidates


def log_run(tracker: MlflowTracker, run_id: str, log: RunLog, step: int) -> None:
    """Metrics and artifacts of `log` (params and tags go in when the run is created)."""
    tracker.log_metrics(run_id, log.metrics, step=step)
    for path, text in log.texts.items():
        tracker.log_text(run_id, text, path)
    for path, table in log.tables.items():
        tracker.log_table(run_id, table, path)


def model_params(study: StudyConfig, models: Mapping[str, str]) -> dict[str, Any]:
    """The models and temperatures, on the parent run and on every candidate run."""
    return {
        "primary_model": models.get("primary", ""),
        "optimizer_model": models.get("optimizer", ""),
        "temperature": study.primary_model.temperature,
        "optimizer_temperature": study.optimizer_model.temperature,
    }


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys, e.g. ``primary_model.temperature``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def usage_metrics(preds: pd.DataFrame) -> dict[str, float]:
    """LLM calls (live ones; cache hits counted apart), tokens, cost and latency of predictions."""
    cached = preds["cached"].astype(bool) if "cached" in preds else pd.Series(False, index=preds.index)
    live = preds[~cached]
    calls = len(live)
    seconds = float(live["seconds"].sum()) if "seconds" in live else 0.0
    return {
        "llm_calls": float(calls),
        "llm_cached_calls": float(cached.sum()),
        "llm_failed_calls": float(live["error"].notna().sum()) if "error" in live else 0.0,
        "llm_prompt_tokens": float(live["prompt_tokens"].sum()) if "prompt_tokens" in live else 0.0,
        "llm_completion_tokens": float(live["completion_tokens"].sum())
        if "completion_tokens" in live
        else 0.0,
        "llm_cost_usd": float(live["cost_usd"].sum()) if "cost_usd" in live else 0.0,
        "llm_seconds": seconds,
        "llm_latency_mean_s": seconds / calls if calls else 0.0,
    }


def split_metrics(aggregates: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """``{split: {metric: value}}`` as ``<prefix><split>.<metric>`` (numbers only)."""
    return {
        f"{prefix}{split}.{metric}": float(value)
        for split, values in aggregates.items()
        if isinstance(values, Mapping)
        for metric, value in values.items()
        if isinstance(value, int | float)
    }


def prompt_json(prompt: PromptState, **extra: Any) -> str:
    """A prompt's texts and lineage as an artifact."""
    return json.dumps(
        {
            "id": prompt.id,
            "parent_id": prompt.parent_id,
            "version": prompt.version,
            "content_hash": prompt.content_hash(),
            "system_prompt": prompt.system_prompt,
            "output_prompt": prompt.output_prompt,
            "metadata": prompt.metadata,
            **extra,
        },
        indent=2,
        default=str,
    )


def with_scores(preds: pd.DataFrame, rows: list[dict[str, Any]], keys: list[str]) -> pd.DataFrame:
    """Predictions joined with their per-row scores (every metric column the evaluation kept)."""
    if not rows:
        return preds
    scores = pd.DataFrame(rows)
    scores[keys] = scores[keys].astype(str)
    out = preds.copy()
    out[keys] = out[keys].astype(str)
    return out.merge(scores, on=keys, how="left")
