"""Scoring predictions with the study's metrics: per row, per split, per candidate."""

from __future__ import annotations

from typing import Any

import pandas as pd
from pydantic import BaseModel, Field

from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, CandidateScore
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.llm.base import LLMClient, Usage

# metric -> mean over a group's rows, and "n": how many rows (int)
Aggregate = dict[str, float | int]
ROW_KEYS = ["row_id", "split"]


class EvaluationMetrics(BaseModel):
    """The incumbent's scores on an iteration's rows: `aggregates` per split (train is the
    minibatch, val the validation split) and one entry per row (its id, split, `score` = the
    target metric, and every metric)."""

    aggregates: dict[str, Aggregate]
    rows: list[dict[str, Any]] = Field(default_factory=list)

    def score(self, split: str, metric: str) -> float:
        return float(self.aggregates[split][metric])

    def rows_in(self, split: str) -> int:
        return int(self.aggregates.get(split, {}).get("n", 0))

    def row_scores(self) -> pd.DataFrame:
        """row_id, split and score of every row."""
        return pd.DataFrame(self.rows, columns=[*ROW_KEYS, "score"])


class CandidateMetrics(BaseModel):
    """Each candidate's scores: `aggregates` per candidate id and split (train for every
    candidate, val for those that went on to validation), the `scores` the decision compares,
    and one entry per row (candidate_id, row_id, split, score)."""

    aggregates: dict[str, dict[str, Aggregate]]
    scores: list[CandidateScore]
    rows: list[dict[str, Any]] = Field(default_factory=list)


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


def score_of(
    cand: Candidate, train_score: float, val_score: float | None = None, screened_rows: int | None = None
) -> CandidateScore:
    return CandidateScore(
        candidate_id=cand.prompt.id,
        strategy=cand.strategy,
        prompt_chars=len(cand.prompt.system_prompt + cand.prompt.output_prompt),
        train_score=train_score,
        val_score=val_score,
        parts=cand.prompt.metadata.get("parts"),
        screened_rows=screened_rows,
    )


def candidate_scores(
    candidates: list[Candidate], aggregates: dict[str, Any], target: str
) -> list[CandidateScore]:
    out = []
    for cand in candidates:
        agg = aggregates.get(cand.prompt.id, {})
        val = agg["val"][target] if "val" in agg else None
        train = agg.get("train", {})
        out.append(score_of(cand, train.get(target, 0.0), val, int(train.get("n", 0))))
    return out


def evaluate_prompt(
    llm: LLMClient, evaluator: EvaluatorService, data: StudyData, prompt: PromptState, split: str
) -> tuple[dict[str, float], Usage]:
    """Score a prompt on a whole split (the test split only for reporting)."""
    preds = run_prompt(llm, prompt, data.rows(split), data.study.primary_model, data.study)
    _, agg = score_predictions(evaluator, preds, data.study.target_metric, ["split"])
    return agg[split], usage_of(preds)


def evaluate_incumbent(
    evaluator: EvaluatorService, predictions: pd.DataFrame, study: StudyConfig
) -> EvaluationMetrics:
    """Step 2: the incumbent's predictions scored, per split and per row."""
    scored, aggregates = score_predictions(evaluator, predictions, study.target_metric, ["split"])
    columns = [*ROW_KEYS, "score", *study.all_metrics()]
    return EvaluationMetrics(aggregates=aggregates, rows=scored[columns].to_dict(orient="records"))


def evaluate_candidates(
    evaluator: EvaluatorService, predictions: pd.DataFrame, candidates: list[Candidate], study: StudyConfig
) -> CandidateMetrics:
    """Step 5 (first half): every candidate's predictions scored, per split and per row."""
    group_by = ["candidate_id", "split"]
    scored, aggregates = score_predictions(evaluator, predictions, study.target_metric, group_by)
    return CandidateMetrics(
        aggregates=aggregates,
        scores=candidate_scores(candidates, aggregates, study.target_metric),
        rows=scored[["candidate_id", *ROW_KEYS, "score"]].to_dict(orient="records"),
    )
