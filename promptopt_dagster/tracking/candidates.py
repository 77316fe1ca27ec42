"""One nested run per candidate prompt: its texts as params (so MLflow's run comparison shows
prompts side by side with their scores), its metrics per split at step = iteration, and its
predictions with per-row scores."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from promptopt_dagster.core.records import Candidate, CandidateScore, IterationRecord
from promptopt_dagster.tracking.client import MlflowTracker
from promptopt_dagster.tracking.run_log import (
    IterationValues,
    RunLog,
    log_run,
    prompt_json,
    split_metrics,
    usage_metrics,
    with_scores,
)


@dataclass
class CandidateLog(RunLog):
    candidate_id: str = ""


def _candidate_metrics(
    record: IterationRecord,
    cand: Candidate,
    score: CandidateScore | None,
    preds: pd.DataFrame,
    aggregates: Mapping[str, Any],
) -> dict[str, float]:
    metrics = {**split_metrics(aggregates, ""), **usage_metrics(preds)}
    metrics["prompt_chars"] = float(len(cand.prompt.system_prompt) + len(cand.prompt.output_prompt))
    metrics["accepted"] = float(record.accepted_id == cand.prompt.id)
    if score is not None:
        metrics["train_score"] = score.train_score
        metrics["gain_vs_incumbent"] = score.train_score - record.incumbent_train_score
        if score.screened_rows is not None:
            metrics["screened_rows"] = float(score.screened_rows)
        if score.val_score is not None:
            metrics["val_score"] = score.val_score
    predicted = cand.prompt.metadata.get("predicted_score")
    if predicted is not None:
        metrics["predicted_score"] = float(predicted)
    return metrics


def candidate_run_logs(v: IterationValues) -> list[CandidateLog]:
    """A `CandidateLog` per proposed candidate, in proposal order."""
    record, predictions = v.record, v.candidate_predictions
    cand_rows = v.candidate_metrics.rows
    cand_aggs = v.candidate_metrics.aggregates
    scores = {s.candidate_id: s for s in record.candidates}
    logs = []
    for cand in v.candidates:
        cid = cand.prompt.id
        preds = predictions[predictions["candidate_id"].astype(str) == cid]
        rows = [r for r in cand_rows if str(r.get("candidate_id")) == cid]
        logs.append(
            CandidateLog(
                candidate_id=cid,
                params={
                    **v.common_params,
                    "iteration": record.iteration,
                    "prompt_id": cid,
                    "parent_id": cand.prompt.parent_id or "",
                    "prompt_hash": cand.prompt.content_hash(),
                    "strategy": cand.strategy,
                    "system_prompt": cand.prompt.system_prompt,
                    "output_prompt": cand.prompt.output_prompt,
                },
                metrics=_candidate_metrics(record, cand, scores.get(cid), preds, cand_aggs.get(cid, {})),
                tags={**v.run_tags, "promptopt.strategy": cand.strategy},
                texts={"prompt.json": prompt_json(cand.prompt), "rationale.txt": cand.rationale or ""},
                tables={
                    "predictions.json": with_scores(
                        preds.drop(columns=["candidate_id"]),
                        [{k: v for k, v in r.items() if k != "candidate_id"} for r in rows],
                        ["row_id", "split"],
                    )
                },
            )
        )
    return logs


def log_candidates(
    tracker: MlflowTracker,
    parent_run_id: str,
    logs: list[CandidateLog],
    step: int,
    start_time_ms: int | None = None,
    end_time_ms: int | None = None,
) -> dict[str, str]:
    """Each candidate's nested run, logged and ended; returns candidate id -> run id. A candidate
    is written, screened and validated inside its iteration, so its run spans the iteration's
    time (`start_time_ms` to `end_time_ms`; None: when logged)."""
    runs: dict[str, str] = {}
    for cand in logs:
        run_id = tracker.candidate_run(
            parent_run_id, cand.candidate_id, params=cand.params, tags=cand.tags, start_time_ms=start_time_ms
        )
        log_run(tracker, run_id, cand, step)
        tracker.end_run(run_id, end_time_ms=end_time_ms)
        runs[cand.candidate_id] = run_id
    return runs
