"""What MLflow records for one iteration, decided here without Dagster, logged by `log_iteration`.

Layout (see core/tracking.py for how runs are found again, so re-logging is idempotent):

- parent run ``iteration-NNNN`` in experiment ``promptopt/<study>``: params (study settings,
  models, temperatures, the incumbent's id, parent id and hash), metrics at step = iteration
  (every metric of the incumbent on every split, the decision's scores, LLM calls, tokens, cost,
  latency, the bandit's pulls and mean reward per strategy), artifacts (prompt texts, the
  predictions with per-row scores, the failures the optimizer saw and the rationale it gave);
- one nested run per candidate: its texts as params (so MLflow's run comparison shows prompts
  side by side with their scores), its metrics per split at step = iteration, its predictions;
- Prompt Registry ``promptopt-<study>``: the seed (iteration 0) and every accepted prompt as a new
  version, the rationale as commit message, scores as version tags; alias ``champion`` on the
  best version so far.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, IterationRecord
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.tracking import TAG_PROMPT_ID, MlflowTracker
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.selection import collect_failures

USAGE_COLUMNS = ("prompt_tokens", "completion_tokens", "seconds", "cost_usd")


@dataclass
class RunLog:
    """Everything one MLflow run gets."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # artifact path -> text
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path (.json) -> table


@dataclass
class CandidateLog(RunLog):
    candidate_id: str = ""


@dataclass
class PromptVersionLog:
    """A prompt to register (once: found again by its PromptState id)."""

    prompt: PromptState
    commit_message: str
    tags: dict[str, Any]
    champion: bool
    candidate_id: str | None = None  # link the version to this candidate's run (else the parent)


@dataclass
class IterationLog:
    study: str
    iteration: int
    parent: RunLog
    candidates: list[CandidateLog]
    prompts: list[PromptVersionLog]


@dataclass
class LoggedIteration:
    run_id: str
    candidate_runs: dict[str, str]
    prompt_versions: dict[str, int | None]  # PromptState id -> registry version (None: queued)
    queued: int  # calls waiting in the outbox after logging (0 when MLflow was reachable)


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


def _split_metrics(aggregates: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{split}.{metric}": float(value)
        for split, values in aggregates.items()
        if isinstance(values, Mapping)
        for metric, value in values.items()
        if isinstance(value, int | float)
    }


def _prompt_json(prompt: PromptState, **extra: Any) -> str:
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


def _with_scores(preds: pd.DataFrame, rows: list[dict[str, Any]], keys: list[str]) -> pd.DataFrame:
    """Predictions joined with their per-row scores (every metric column the evaluation kept)."""
    if not rows:
        return preds
    scores = pd.DataFrame(rows)
    scores[keys] = scores[keys].astype(str)
    out = preds.copy()
    out[keys] = out[keys].astype(str)
    return out.merge(scores, on=keys, how="left")


def build_iteration_log(
    study: StudyConfig,
    record: IterationRecord,
    incumbent: PromptState,
    baseline_predictions: pd.DataFrame,
    baseline_metrics: Mapping[str, Any],
    candidate_prompts: Mapping[str, Any],
    candidate_predictions: pd.DataFrame,
    candidate_metrics: Mapping[str, Any],
    models: Mapping[str, str],
    tags: Mapping[str, str],
) -> IterationLog:
    """Everything to log for `record`, from the values of the iteration's assets. `models` maps
    ``primary`` / ``optimizer`` to the model names actually used; `tags` are added to every run
    (the orchestrator's run id, partition and asset key)."""
    iteration = record.iteration
    candidates = [Candidate.model_validate(c) for c in candidate_prompts["candidates"]]
    scores = {s.candidate_id: s for s in record.candidates}
    run_tags = {str(k): str(v) for k, v in tags.items()}
    models_params = {
        "primary_model": models.get("primary", ""),
        "optimizer_model": models.get("optimizer", ""),
        "temperature": study.primary_model.temperature,
        "optimizer_temperature": study.optimizer_model.temperature,
    }

    # --- parent run ---
    settings = flatten(study.model_dump(mode="json", exclude={"seed_prompt"}), "study.")
    parent = RunLog(
        params={
            **settings,
            **models_params,
            "iteration": iteration,
            "prompt_id": incumbent.id,
            "parent_id": incumbent.parent_id or "",
            "prompt_hash": incumbent.content_hash(),
        },
        tags={
            **run_tags,
            "promptopt.champion_id": record.champion.id,
            "promptopt.accepted": str(record.accepted),
        },
    )
    usage = usage_metrics(pd.concat([baseline_predictions, candidate_predictions], ignore_index=True))
    optimizer_usage = candidate_prompts.get("usage", {})
    usage["llm_calls"] += float(optimizer_usage.get("calls", 0))
    usage["llm_prompt_tokens"] += float(optimizer_usage.get("prompt_tokens", 0))
    usage["llm_completion_tokens"] += float(optimizer_usage.get("completion_tokens", 0))
    usage["llm_cost_usd"] += float(optimizer_usage.get("cost_usd", 0.0))
    usage["llm_seconds"] += float(optimizer_usage.get("llm_seconds", 0.0))
    usage["llm_tokens"] = usage["llm_prompt_tokens"] + usage["llm_completion_tokens"]
    usage["llm_latency_mean_s"] = usage["llm_seconds"] / usage["llm_calls"] if usage["llm_calls"] else 0.0
    parent.metrics = {
        **_split_metrics(baseline_metrics["aggregates"], "incumbent."),
        **usage,
        "optimizer_calls": float(optimizer_usage.get("calls", 0)),
        "total_llm_calls": float(record.total_calls),
        "total_llm_tokens": float(record.total_tokens),
        "incumbent_val_score": record.incumbent_val_score,
        "incumbent_train_score": record.incumbent_train_score,
        "val_score": record.champion_val_score,
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

    scored = _with_scores(baseline_predictions, list(baseline_metrics.get("rows", [])), ["row_id", "split"])
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
            "warnings": list(candidate_prompts.get("warnings", [])),
        },
        indent=2,
        default=str,
    )
    parent.texts["prompts/incumbent.json"] = _prompt_json(incumbent)
    parent.texts["prompts/champion.json"] = _prompt_json(record.champion, val_score=record.champion_val_score)
    parent.texts["decision.json"] = record.model_dump_json(indent=2, exclude={"bandit"})

    # --- nested runs, one per candidate ---
    cand_rows = list(candidate_metrics.get("rows", []))
    cand_aggs = candidate_metrics.get("aggregates", {})
    logs = []
    for cand in candidates:
        cid = cand.prompt.id
        score = scores.get(cid)
        preds = candidate_predictions[candidate_predictions["candidate_id"].astype(str) == cid]
        rows = [r for r in cand_rows if str(r.get("candidate_id")) == cid]
        metrics = {**_split_metrics(cand_aggs.get(cid, {}), ""), **usage_metrics(preds)}
        metrics["prompt_chars"] = float(len(cand.prompt.system_prompt) + len(cand.prompt.output_prompt))
        metrics["accepted"] = float(record.accepted_id == cid)
        if score is not None:
            metrics["train_score"] = score.train_score
            metrics["gain_vs_incumbent"] = score.train_score - record.incumbent_train_score
            if score.val_score is not None:
                metrics["val_score"] = score.val_score
        predicted = cand.prompt.metadata.get("predicted_score")
        if predicted is not None:
            metrics["predicted_score"] = float(predicted)
        logs.append(
            CandidateLog(
                candidate_id=cid,
                params={
                    **models_params,
                    "iteration": iteration,
                    "prompt_id": cid,
                    "parent_id": cand.prompt.parent_id or "",
                    "prompt_hash": cand.prompt.content_hash(),
                    "strategy": cand.strategy,
                    "system_prompt": cand.prompt.system_prompt,
                    "output_prompt": cand.prompt.output_prompt,
                },
                metrics=metrics,
                tags={**run_tags, "promptopt.strategy": cand.strategy},
                texts={"prompt.json": _prompt_json(cand.prompt), "rationale.txt": cand.rationale or ""},
                tables={
                    "predictions.json": _with_scores(
                        preds.drop(columns=["candidate_id"]),
                        [{k: v for k, v in r.items() if k != "candidate_id"} for r in rows],
                        ["row_id", "split"],
                    )
                },
            )
        )

    # --- Prompt Registry ---
    best = record.champion_val_score >= record.best_val_score - 1e-9
    prompts: list[PromptVersionLog] = []
    if iteration == 0:
        prompts.append(
            PromptVersionLog(
                prompt=incumbent,
                commit_message="seed prompt",
                tags={
                    TAG_PROMPT_ID: incumbent.id,
                    "iteration": iteration,
                    "val_score": record.incumbent_val_score,
                    "train_score": record.incumbent_train_score,
                    "strategy": "seed",
                    "answer_parser": incumbent.answer_parser,
                },
                champion=best and not record.accepted,
            )
        )
    if record.accepted and record.accepted_id:
        winner = next(c for c in candidates if c.prompt.id == record.accepted_id)
        score = scores.get(record.accepted_id)
        prompts.append(
            PromptVersionLog(
                prompt=winner.prompt,
                commit_message=winner.rationale or winner.strategy,
                tags={
                    TAG_PROMPT_ID: winner.prompt.id,
                    "parent_id": winner.prompt.parent_id or "",
                    "iteration": iteration,
                    "strategy": winner.strategy,
                    "val_score": record.champion_val_score,
                    "train_score": score.train_score if score else "",
                    "incumbent_val_score": record.incumbent_val_score,
                    # apply core.answers.parse_answer(reply, this) to the model's reply
                    "answer_parser": winner.prompt.answer_parser,
                },
                champion=best,
                candidate_id=winner.prompt.id,
            )
        )
    return IterationLog(study.name, iteration, parent, logs, prompts)


def _log_run(tracker: MlflowTracker, run_id: str, log: RunLog, step: int) -> None:
    tracker.log_metrics(run_id, log.metrics, step=step)
    for path, text in log.texts.items():
        tracker.log_text(run_id, text, path)
    for path, table in log.tables.items():
        tracker.log_table(run_id, table, path)


def log_iteration(tracker: MlflowTracker, log: IterationLog) -> LoggedIteration:
    """Write `log` to MLflow. During an outage every call is queued in the tracker's outbox and
    replayed later; nothing here raises for an outage. A rejected iteration registers nothing:
    the alias stays on the champion it already points at."""
    run_id = tracker.iteration_run(log.study, log.iteration, params=log.parent.params, tags=log.parent.tags)
    _log_run(tracker, run_id, log.parent, log.iteration)
    candidate_runs: dict[str, str] = {}
    for cand in log.candidates:
        cand_run = tracker.candidate_run(run_id, cand.candidate_id, params=cand.params, tags=cand.tags)
        _log_run(tracker, cand_run, cand, log.iteration)
        tracker.end_run(cand_run)
        candidate_runs[cand.candidate_id] = cand_run
    versions: dict[str, int | None] = {}
    for item in log.prompts:
        existing = tracker.prompt_version_of(log.study, item.prompt.id)
        if existing is not None:
            if item.champion:
                tracker.set_champion(log.study, existing)
            versions[item.prompt.id] = existing
            continue
        versions[item.prompt.id] = tracker.register_prompt(
            log.study,
            item.prompt.system_prompt,
            item.prompt.output_prompt,
            commit_message=item.commit_message,
            tags=item.tags,
            champion=item.champion,
            run_id=candidate_runs.get(item.candidate_id or "", run_id),
        )
    tracker.end_run(run_id)
    return LoggedIteration(run_id, candidate_runs, versions, len(tracker.pending()))
