"""The parent run of an iteration: the study's settings, the incumbent's scores, the decision,
what the iteration cost, and the evidence the optimizer saw (failures, proposals, bandit)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.selection import collect_failures
from promptopt_dagster.tracking.run_log import (
    IterationValues,
    RunLog,
    flatten,
    prompt_json,
    split_metrics,
    usage_metrics,
    with_scores,
)


def _iteration_usage(
    baseline_predictions: pd.DataFrame,
    candidate_predictions: pd.DataFrame,
    optimizer_usage: Mapping[str, Any],
) -> dict[str, float]:
    """The LLM usage of both evaluations plus the optimizer's own calls."""
    usage = usage_metrics(pd.concat([baseline_predictions, candidate_predictions], ignore_index=True))
    usage["llm_calls"] += float(optimizer_usage.get("calls", 0))
    usage["llm_prompt_tokens"] += float(optimizer_usage.get("prompt_tokens", 0))
    usage["llm_completion_tokens"] += float(optimizer_usage.get("completion_tokens", 0))
    usage["llm_cost_usd"] += float(optimizer_usage.get("cost_usd", 0.0))
    usage["llm_seconds"] += float(optimizer_usage.get("llm_seconds", 0.0))
    usage["llm_tokens"] = usage["llm_prompt_tokens"] + usage["llm_completion_tokens"]
    usage["llm_latency_mean_s"] = usage["llm_seconds"] / usage["llm_calls"] if usage["llm_calls"] else 0.0
    return usage


def iteration_run_log(v: IterationValues) -> RunLog:
    """Params (study settings, models, the incumbent's id, parent id and hash), metrics at step =
    iteration, and artifacts (prompt texts, scored predictions, failures, rationale, decision)."""
    study, record, incumbent, candidates = v.study, v.record, v.incumbent, v.candidates
    settings = flatten(study.model_dump(mode="json", exclude={"seed_prompt"}), "study.")
    parent = RunLog(
        params={
            **settings,
            **v.common_params,
            "iteration": record.iteration,
            "prompt_id": incumbent.id,
            "parent_id": incumbent.parent_id or "",
            "prompt_hash": incumbent.content_hash(),
        },
        tags={
            **v.run_tags,
            "promptopt.champion_id": record.champion.id,
            "promptopt.accepted": str(record.accepted),
            # the saved runs view shows the strategy of every run: here, the accepted one's
            "promptopt.strategy": next(
                (c.strategy for c in candidates if c.prompt.id == record.accepted_id), "none accepted"
            ),
        },
    )
    winner = next((s for s in record.candidates if s.candidate_id == record.accepted_id), None)
    optimizer_usage = v.candidate_prompts.usage
    parent.metrics = {
        **split_metrics(v.baseline_metrics.aggregates, "incumbent."),
        **_iteration_usage(v.baseline_predictions, v.candidate_predictions, optimizer_usage),
        "optimizer_calls": float(optimizer_usage.get("calls", 0)),
        "total_llm_calls": float(record.total_calls),
        "total_llm_tokens": float(record.total_tokens),
        "incumbent_val_score": record.incumbent_val_score,
        "incumbent_train_score": record.incumbent_train_score,
        "val_score": record.champion_val_score,
        # the champion's score on this iteration's train minibatch (as candidate runs' train_score)
        "train_score": winner.train_score if winner else record.incumbent_train_score,
        "best_val_score": record.best_val_score,
        "accepted": float(record.accepted),
        "candidates": float(len(candidates)),
        "candidates_validated": float(sum(s.val_score is not None for s in record.candidates)),
        "iterations_without_improvement": float(record.iterations_without_improvement),
    }
    if record.bandit:
        for strategy, stats in StrategyBandit.from_dict(record.bandit).stats().items():
            parent.metrics[f"bandit.{strategy}.pulls"] = float(stats["pulls"])
            parent.metrics[f"bandit.{strategy}.mean_reward"] = float(stats["mean_reward"])
        parent.texts["bandit.json"] = json.dumps(record.bandit, indent=2)

    scored = with_scores(v.baseline_predictions, v.baseline_metrics.rows, ["row_id", "split"])
    parent.tables["predictions.json"] = scored
    train = scored[scored["split"] == "train"]
    failures = (
        collect_failures(train, study.input_columns, "reference") if "score" in train and len(train) else []
    )
    parent.texts["optimizer/failures.json"] = json.dumps(
        {
            "failures": [{"inputs": f.inputs, "expected": f.expected, "got": f.got} for f in failures],
            "proposals": [
                {"candidate_id": c.prompt.id, "strategy": c.strategy, "rationale": c.rationale}
                for c in candidates
            ],
            "warnings": v.candidate_prompts.warnings,
        },
        indent=2,
        default=str,
    )
    parent.texts["prompts/incumbent.json"] = prompt_json(incumbent)
    parent.texts["prompts/champion.json"] = prompt_json(record.champion, val_score=record.champion_val_score)
    parent.texts["decision.json"] = record.model_dump_json(indent=2, exclude={"bandit"})
    return parent
