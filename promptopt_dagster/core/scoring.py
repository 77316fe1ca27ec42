"""Scoring predictions with the study's metrics: per row, per split, per candidate."""

from __future__ import annotations

from typing import Any

import pandas as pd

from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, CandidateScore
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.llm.base import LLMClient, Usage


def evaluator_for(study: StudyConfig) -> EvaluatorService:
    return EvaluatorService(study.all_metrics(), study.metric_options)


def score_predictions(
    evaluator: EvaluatorService, predictions: pd.DataFrame, target_metric: str, group_by: list[str]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-row scores (one column per metric, `score` = the target metric) and aggregates per group."""
    result = evaluator.evaluate(predictions["prediction"].tolist(), predictions["reference"].tolist())
    scored = predictions.reset_index(drop=True).copy()
    for col in result.per_row.columns:
        scored[col] = result.per_row[col].to_numpy()
    scored["score"] = scored[target_metric]
    metric_cols = list(result.per_row.columns)
    aggregates: dict[str, Any] = {}
    for key, group in scored.groupby(group_by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        node = aggregates
        for part in key[:-1]:
            node = node.setdefault(str(part), {})
        node[str(key[-1])] = {m: float(group[m].mean()) for m in metric_cols} | {"n": len(group)}
    return scored, aggregates


def score_of(cand: Candidate, train_score: float, val_score: float | None = None) -> CandidateScore:
    return CandidateScore(
        candidate_id=cand.prompt.id,
        strategy=cand.strategy,
        prompt_chars=len(cand.prompt.system_prompt + cand.prompt.output_prompt),
        train_score=train_score,
        val_score=val_score,
        parts=cand.prompt.metadata.get("parts"),
    )


def candidate_scores(
    candidates: list[Candidate], aggregates: dict[str, Any], target: str
) -> list[CandidateScore]:
    out = []
    for cand in candidates:
        agg = aggregates.get(cand.prompt.id, {})
        val = agg["val"][target] if "val" in agg else None
        out.append(score_of(cand, agg.get("train", {}).get(target, 0.0), val))
    return out


def evaluate_prompt(
    llm: LLMClient, evaluator: EvaluatorService, data: StudyData, prompt: PromptState, split: str
) -> tuple[dict[str, float], Usage]:
    """Score a prompt on a whole split (the test split only for reporting)."""
    preds = run_prompt(llm, prompt, data.rows(split), data.study.primary_model, data.study)
    _, agg = score_predictions(evaluator, preds, data.study.target_metric, ["split"])
    return agg[split], usage_of(preds)
