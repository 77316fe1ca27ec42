"""The five steps of one iteration as plain functions; the Dagster assets call these one each.

1. primary inference     run_prompt(incumbent) on the train minibatch and the validation split
2. evaluation            score_predictions
3. refinement            propose_candidates (the optimizer package)
4. refined inference     screen_and_confirm: every candidate on the minibatch, the best on val
5. evaluation + decision decide
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from promptopt_dagster.core.dataset import load_dataset, minibatch, split_dataset
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, CandidateScore, IterationRecord
from promptopt_dagster.core.stopping import decide_stop
from promptopt_dagster.core.study import ModelConfig, StudyConfig
from promptopt_dagster.errors import DatasetError, StudyConfigError
from promptopt_dagster.llm.base import ChatRequest, GenerationParams, LLMClient, Usage
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.context import (
    HistoryEntry,
    ProposalContext,
    ProposalResult,
    Ranker,
    Tried,
)
from promptopt_dagster.optimizer.optimizer import Optimizer
from promptopt_dagster.optimizer.parts import PromptParts, infer_format_rule
from promptopt_dagster.optimizer.selection import choose_for_validation, collect_failures, pick_winner
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES
from promptopt_dagster.redaction import redact

Progress = Callable[[str], None]
PREDICTION_COLUMNS = (
    "row_id",
    "split",
    "prediction",
    "reply",
    "error",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "cost_usd",
)
BANDIT_STRATEGIES = STRATEGY_NAMES
# A 10-row minibatch is noisy: the best two candidates there go on to validation (successive
# halving in its smallest form), when the budget allows.
CONFIRM_TOP = 2
# With the incumbent at zero on the minibatch, propose this many times the candidates: the search
# widens instead of stopping.
WIDEN_AT_ZERO = 2


# The smallest study that can measure anything: fewer rows, or a split with fewer rows, is
# refused; validation or test splits smaller than WARN_SPLIT_ROWS give warnings.
MIN_ROWS = 10
MIN_SPLIT_ROWS = 2
WARN_SPLIT_ROWS = 10
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


@dataclass
class StudyData:
    """A study's rows, split. `warnings` are plain sentences about data too small to measure
    well (e.g. a validation split under 10 rows), for the CLI and asset metadata to show."""

    study: StudyConfig
    splits: dict[str, pd.DataFrame]
    warnings: list[str] = field(default_factory=list)

    def iteration_rows(self, iteration: int) -> pd.DataFrame:
        """The rows an incumbent is measured on: this iteration's train minibatch, and val."""
        mb = minibatch(self.splits["train"], self.study.minibatch_size, self.study.seed, iteration)
        return pd.concat(
            [mb.assign(split="train"), self.splits["val"].assign(split="val")], ignore_index=True
        )

    def rows(self, split: str) -> pd.DataFrame:
        return self.splits[split].assign(split=split)


def load_study_data(study: StudyConfig) -> StudyData:
    """Load, check and split the study's dataset. Raises DatasetError when the data cannot measure
    anything: fewer than MIN_ROWS rows, or a split with fewer than MIN_SPLIT_ROWS rows. Smaller
    than WARN_SPLIT_ROWS validation or test splits are allowed, with a warning each."""
    df = load_dataset(study.dataset, study.input_columns, study.reference_column, study.id_column)
    shown = redact(study.dataset)
    fractions = study.splits
    if len(df) < MIN_ROWS:
        raise DatasetError(
            f"dataset {shown} has {len(df)} rows; a study needs at least {MIN_ROWS} (with at least "
            f"{MIN_SPLIT_ROWS} rows in each of train, val and test) to measure anything, and 30 or "
            "more to measure it well. Add rows to the dataset."
        )
    splits = split_dataset(df, fractions.train, fractions.val, study.seed, study.reference_column)
    sizes = {name: len(part) for name, part in splits.items()}
    shown_sizes = ", ".join(f"{name} {size}" for name, size in sizes.items())
    small = [name for name, size in sizes.items() if size < MIN_SPLIT_ROWS]
    if small:
        raise DatasetError(
            f"dataset {shown} has {len(df)} rows, split {shown_sizes} by `splits: {{train: "
            f"{fractions.train:g}, val: {fractions.val:g}, test: {fractions.test:g}}}`; train, val and "
            f"test need at least {MIN_SPLIT_ROWS} rows each to measure anything ({' and '.join(small)} "
            f"{'has' if len(small) == 1 else 'have'} fewer). Add rows to the dataset, or raise "
            + " and ".join(f"splits.{name}" for name in small)
            + " in the study."
        )
    if study.budget_calls is not None:
        needed = min_iteration_calls(min(study.minibatch_size, sizes["train"]), sizes["val"])
        if study.budget_calls < needed:
            raise StudyConfigError(
                f"budget_calls {study.budget_calls} cannot pay for one iteration of study "
                f"{study.name!r}: the smallest iteration may need {needed} LLM calls (the incumbent and "
                f"one candidate, each on the {min(study.minibatch_size, sizes['train'])}-row minibatch "
                f"and the {sizes['val']} validation rows). Raise budget_calls to at least {needed}, or "
                "lower minibatch_size or splits.val."
            )
    warnings = [
        f"{SPLIT_NAMES[name]} has {sizes[name]} rows (fewer than {WARN_SPLIT_ROWS}): one row moves its "
        f"score by {1 / sizes[name]:.2f}, so {'decisions' if name == 'val' else 'the test score'} "
        f"will be coarse. Add rows, or raise splits.{name} in the study."
        for name in ("val", "test")
        if sizes[name] < WARN_SPLIT_ROWS
    ]
    return StudyData(study=study, splits=splits, warnings=warnings)


def min_iteration_calls(minibatch_rows: int, val_rows: int) -> int:
    """The most LLM calls the smallest useful iteration can spend (no reply cached): the incumbent
    on the minibatch and validation, one candidate on the minibatch, and that candidate on
    validation. The stop rule ends a study whose budget has less left than this."""
    return 2 * (minibatch_rows + val_rows)


def budget_left(study: StudyConfig, records: list[IterationRecord], spent_now: int = 0) -> int | None:
    """LLM calls the study may still spend (None without a budget): budget_calls minus what
    earlier iterations spent minus `spent_now` in this one."""
    if study.budget_calls is None:
        return None
    return study.budget_calls - (records[-1].total_calls if records else 0) - spent_now


def evaluator_for(study: StudyConfig) -> EvaluatorService:
    return EvaluatorService(study.all_metrics(), study.metric_options)


def check_prompt_columns(prompt: PromptState, study: StudyConfig, columns: list[str]) -> None:
    missing = prompt.missing_columns(columns)
    if missing:
        raise DatasetError(
            f"prompt {prompt.id} uses {missing} but the dataset of study {study.name!r} has no such "
            f"column; available columns: {sorted(columns)}"
        )


def run_prompt(
    llm: LLMClient, prompt: PromptState, rows: pd.DataFrame, model: ModelConfig, study: StudyConfig
) -> pd.DataFrame:
    """One prediction per row; failed rows keep an `error` instead of raising."""
    check_prompt_columns(prompt, study, list(rows.columns))
    params = GenerationParams(temperature=model.temperature, max_tokens=model.max_tokens, seed=study.seed)
    records = rows.to_dict(orient="records")
    requests = [ChatRequest(messages=tuple(prompt.render(r)), params=params) for r in records]
    responses = llm.generate(requests)
    out = pd.DataFrame(
        {
            "row_id": rows["row_id"].astype(str).to_numpy(),
            "split": rows["split"].to_numpy(),
            "prediction": [prompt.parse(r.text) for r in responses],
            "reply": [r.text for r in responses],
            "error": [r.error for r in responses],
            "cached": [r.cached for r in responses],
            "prompt_tokens": [r.prompt_tokens for r in responses],
            "completion_tokens": [r.completion_tokens for r in responses],
            "seconds": [r.seconds for r in responses],
            "cost_usd": [r.cost_usd for r in responses],
        }
    )
    out["reference"] = rows[study.reference_column].astype(str).to_numpy()
    for col in study.input_columns:
        out[col] = rows[col].to_numpy()
    return out


def usage_of(predictions: pd.DataFrame) -> Usage:
    live = predictions[~predictions["cached"].astype(bool)]
    return Usage(
        calls=len(live),
        cached_calls=int(predictions["cached"].astype(bool).sum()),
        failed_calls=int(live["error"].notna().sum()),
        prompt_tokens=int(live["prompt_tokens"].sum()),
        completion_tokens=int(live["completion_tokens"].sum()),
        seconds=float(live["seconds"].sum()),
        cost_usd=float(live["cost_usd"].sum()) if "cost_usd" in live else 0.0,
    )


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


def history_of(records: list[IterationRecord]) -> list[HistoryEntry]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r.champion.id not in seen:
            seen.add(r.champion.id)
            instruction = PromptParts.of(r.champion).instruction
            out.append(HistoryEntry(system_prompt=instruction, score=r.champion_val_score))
    return out


def tried_of(records: list[IterationRecord], seed: PromptState) -> list[Tried]:
    """Every measured prompt of earlier iterations as parts and scores: each incumbent (the seed
    first) and each screened candidate."""
    out: list[Tried] = []
    for r in records:
        if r.incumbent_id == seed.id:
            out.append(Tried(PromptParts.of(seed), "seed", r.incumbent_train_score, r.incumbent_val_score))
        for c in r.candidates:
            if c.parts is not None:
                out.append(Tried(PromptParts.from_dict(c.parts), c.strategy, c.train_score, c.val_score))
    return out


def tried_on_champion(records: list[IterationRecord]) -> list[str]:
    return list(records[-1].tried_on_champion) if records else []


def bandit_from(records: list[IterationRecord], seed: int) -> StrategyBandit:
    state = records[-1].bandit if records and records[-1].bandit else None
    return StrategyBandit(BANDIT_STRATEGIES, seed=seed, state=state)


def propose_candidates(
    optimizer_llm: LLMClient,
    data: StudyData,
    incumbent: PromptState,
    baseline_scored: pd.DataFrame,
    records: list[IterationRecord],
    iteration: int,
    ranker: Ranker | None = None,
    overgenerate: int = 1,
    keep: int | None = None,
) -> ProposalResult:
    """The optimizer's candidates: `candidates_per_iteration` of them, twice as many when the
    incumbent scores zero on the minibatch (the search widens rather than stops). With a
    `ranker` (the meta-model, when it is trusted) it proposes `overgenerate` times as many, and
    only the `keep` best predicted (default: as many as without a ranker) go on to screening;
    each keeps its prediction in ``prompt.metadata["predicted_score"]``.

    With a budget (study.budget_calls) this is where the iteration is sized to what is left
    after the earlier iterations and this one's primary inference: the optimizer LLM may use
    what remains beyond one candidate's screening and validation, and only as many candidates
    are kept as can then be screened on the minibatch with the best CONFIRM_TOP validated
    (counting every call as uncached), so screen_and_confirm cannot overrun the budget."""
    study = data.study
    train_rows = baseline_scored[baseline_scored["split"] == "train"]
    left = budget_left(study, records, _live_calls(baseline_scored))
    screen_calls, val_calls = max(1, len(train_rows)), len(data.splits["val"])
    max_calls = None if left is None else max(0, left - screen_calls - val_calls)
    score = float(train_rows["score"].mean()) if len(train_rows) else 0.0
    train = data.splits["train"]
    ctx = ProposalContext(
        incumbent=incumbent,
        metric=study.target_metric,
        incumbent_score=score,
        failures=collect_failures(train_rows, study.input_columns, "reference"),
        history=history_of(records),
        train=train,
        minibatch_ids=set(train_rows["row_id"].astype(str)),
        input_columns=study.input_columns,
        reference_column=study.reference_column,
        iteration=iteration,
        seed=study.seed,
        tried=tried_of(records, study.seed_prompt_state()),
        format_rule=infer_format_rule(train[study.reference_column].astype(str).tolist()),
    )
    optimizer = Optimizer(
        optimizer_llm,
        temperature=study.optimizer_model.temperature,
        max_tokens=study.optimizer_model.max_tokens,
    )
    k = study.candidates_per_iteration * (WIDEN_AT_ZERO if score == 0.0 else 1)
    bandit = bandit_from(records, study.seed)
    tried = tried_on_champion(records)
    if ranker is None:
        result = optimizer.propose(ctx, k, bandit, max_calls, tried)
        return _within_budget(result, left, screen_calls, val_calls)
    result = optimizer.propose(ctx, k * max(1, overgenerate), bandit, max_calls, tried)
    predicted = ranker(result.candidates)
    order = sorted(
        range(len(result.candidates)),
        key=lambda i: (-round(predicted[i], 9), len(result.candidates[i].prompt.system_prompt), i),
    )[: max(1, keep or k)]
    for i in order:
        result.candidates[i].prompt.metadata["predicted_score"] = float(predicted[i])
    result.candidates = [result.candidates[i] for i in order]
    result.strategies = [result.strategies[i] for i in order] if result.strategies else []
    return _within_budget(result, left, screen_calls, val_calls)


def _live_calls(predictions: pd.DataFrame) -> int:
    """Uncached calls behind these predictions; every row when the frame cannot tell."""
    if "cached" not in predictions.columns:
        return len(predictions)
    return int((~predictions["cached"].astype(bool)).sum())


def _within_budget(
    result: ProposalResult, left: int | None, screen_calls: int, val_calls: int
) -> ProposalResult:
    """Keep only the candidates the budget left can screen and validate (the first ones: the
    order the optimizer, or the ranker, put them in)."""
    if left is None:
        return result
    result.calls_left = left - result.usage.calls
    affordable = max(0, (left - result.usage.calls - val_calls) // screen_calls)
    if len(result.candidates) > affordable:
        result.warnings.append(
            f"budget: {left - result.usage.calls} LLM calls left for screening and validation; kept "
            f"{affordable} of {len(result.candidates)} candidates ({screen_calls} calls each on the "
            f"minibatch, {val_calls} to validate the best)"
        )
        result.candidates = result.candidates[:affordable]
        result.strategies = result.strategies[:affordable]
    return result


def screen_and_confirm(
    llm: LLMClient,
    evaluator: EvaluatorService,
    data: StudyData,
    candidates: list[Candidate],
    incumbent_train_score: float,
    iteration: int,
    confirm_top: int = CONFIRM_TOP,
    progress: Progress | None = None,
    calls_left: int | None = None,
) -> pd.DataFrame:
    """Every candidate on the train minibatch; those that match or beat the incumbent there, the
    best `confirm_top`, on validation, as many as `calls_left` (the budget, None for none) pays
    for after screening; propose_candidates keeps at least one validation affordable. Returns
    all predictions with a `candidate_id` column."""
    study = data.study
    rows = data.iteration_rows(iteration)
    train = rows[rows["split"] == "train"]
    val = rows[rows["split"] == "val"]
    frames = []
    scores = []
    for i, cand in enumerate(candidates):
        if progress:
            progress(f"screening candidate {i + 1}/{len(candidates)} ({cand.strategy})")
        preds = run_prompt(llm, cand.prompt, train, study.primary_model, study)
        scored, agg = score_predictions(evaluator, preds, study.target_metric, ["split"])
        frames.append(preds.assign(candidate_id=cand.prompt.id))
        if calls_left is not None:
            calls_left -= _live_calls(preds)
        scores.append(score_of(cand, agg["train"][study.target_metric]))
    if calls_left is not None:
        confirm_top = min(confirm_top, max(0, calls_left) // max(1, len(val)))
    by_id = {c.prompt.id: c for c in candidates}
    for chosen in choose_for_validation(scores, incumbent_train_score, confirm_top):
        if progress:
            progress(f"validating candidate {chosen.candidate_id} ({chosen.strategy})")
        preds = run_prompt(llm, by_id[chosen.candidate_id].prompt, val, study.primary_model, study)
        frames.append(preds.assign(candidate_id=chosen.candidate_id))
    if not frames:  # no candidate (the budget left none): an empty frame of the same shape
        columns = [*PREDICTION_COLUMNS, "reference", *study.input_columns, "candidate_id"]
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)


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


def decide(
    study: StudyConfig,
    iteration: int,
    incumbent: PromptState,
    baseline_aggregates: dict[str, Any],
    candidates: list[Candidate],
    scores: list[CandidateScore],
    records: list[IterationRecord],
    usage: Usage,
    bandit_state: dict | None = None,
    warnings: list[str] | None = None,
    attempted: list[str] | None = None,
) -> IterationRecord:
    """Accept the best validated candidate if it beats the incumbent on validation (or ties it
    with a shorter prompt), reward the bandit with each candidate's minibatch gain, and apply
    the stop rules; patience ends a study only once every strategy was tried on its champion.
    `attempted` names the strategies run on the incumbent this iteration."""
    target = study.target_metric
    inc_train = baseline_aggregates["train"][target]
    inc_val = baseline_aggregates["val"][target]
    winner = pick_winner(scores, inc_val, len(incumbent.system_prompt + incumbent.output_prompt))
    by_id = {c.prompt.id: c for c in candidates}
    champion = by_id[winner.candidate_id].prompt if winner else incumbent
    champion_val = winner.val_score if winner and winner.val_score is not None else inc_val
    previous_best = max([r.best_val_score for r in records] + [inc_val])
    improved = champion_val > previous_best + 1e-9
    best = max(previous_best, champion_val)
    streak = 0 if improved else (records[-1].iterations_without_improvement + 1 if records else 1)
    total_calls = (records[-1].total_calls if records else 0) + usage.calls
    total_tokens = (records[-1].total_tokens if records else 0) + usage.tokens

    bandit = StrategyBandit(
        BANDIT_STRATEGIES, seed=study.seed, state=bandit_state or (records[-1].bandit if records else None)
    )
    for s in scores:
        if s.strategy in BANDIT_STRATEGIES:
            bandit.update(s.strategy, s.train_score - inc_train)

    if winner is not None:
        tried = []
    else:
        tried = list(dict.fromkeys([*tried_on_champion(records), *(attempted or [])]))
    unexplored = [name for name in STRATEGY_NAMES if name not in tried]
    stop = decide_stop(
        unexplored=unexplored,
        best_score=best,
        iterations_done=iteration + 1,
        iterations_without_improvement=streak,
        calls_spent=total_calls,
        target_threshold=study.target_threshold,
        patience=study.patience,
        max_iterations=study.max_iterations,
        budget_calls=study.budget_calls,
        # the next iteration measures on as many rows as this one's incumbent did
        next_iteration_calls=min_iteration_calls(
            int(baseline_aggregates["train"].get("n", 0)), int(baseline_aggregates["val"].get("n", 0))
        ),
    )
    return IterationRecord(
        study=study.name,
        iteration=iteration,
        incumbent_id=incumbent.id,
        incumbent_train_score=inc_train,
        incumbent_val_score=inc_val,
        candidates=scores,
        accepted=winner is not None,
        accepted_id=winner.candidate_id if winner else None,
        champion=champion,
        champion_val_score=champion_val,
        best_val_score=best,
        iterations_without_improvement=streak,
        calls=usage.calls,
        tokens=usage.tokens,
        llm_seconds=usage.seconds,
        cost_usd=usage.cost_usd,
        total_calls=total_calls,
        total_tokens=total_tokens,
        stop=stop.stop,
        stop_reason=stop.reason,
        stop_message=stop.message,
        bandit=bandit.to_dict(),
        tried_on_champion=tried,
        warnings=warnings or [],
    )


def evaluate_prompt(
    llm: LLMClient, evaluator: EvaluatorService, data: StudyData, prompt: PromptState, split: str
) -> tuple[dict[str, float], Usage]:
    """Score a prompt on a whole split (the test split only for reporting)."""
    preds = run_prompt(llm, prompt, data.rows(split), data.study.primary_model, data.study)
    _, agg = score_predictions(evaluator, preds, data.study.target_metric, ["split"])
    return agg[split], usage_of(preds)


def timed() -> Callable[[], float]:
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
