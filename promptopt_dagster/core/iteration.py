"""The five steps of one iteration as plain functions; the Dagster assets call these one each.

1. primary inference     run_prompt(incumbent) on the train minibatch and the validation split
                         (core/inference.py)
2. evaluation            score_predictions (core/scoring.py)
3. refinement            propose_candidates (core/proposal.py, the optimizer package)
4. refined inference     screen_and_confirm: every candidate on the minibatch (stopped early
                         once it cannot match the incumbent or enter the best screened there),
                         the best on val
5. evaluation + decision candidate_scores (core/scoring.py), then decide

The rows come from load_study_data (core/study_data.py); the budget rules from core/budget.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from promptopt_dagster.core.budget import live_calls, min_iteration_calls
from promptopt_dagster.core.inference import PREDICTION_COLUMNS, run_prompt
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import BANDIT_STRATEGIES, tried_on_champion
from promptopt_dagster.core.records import Candidate, CandidateScore, IterationRecord
from promptopt_dagster.core.scoring import score_of, score_predictions
from promptopt_dagster.core.stopping import StopRules, decide_stop
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.llm.base import LLMClient, Usage
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.selection import EPS, choose_for_validation, pick_winner
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES

Progress = Callable[[str], None]
# A 10-row minibatch is noisy: the best two candidates there go on to validation (successive
# halving in its smallest form), when the budget allows.
CONFIRM_TOP = 2
# Minibatch rows a candidate is screened on at a time: after each block, a candidate that can no
# longer reach the screening bar (even with every remaining row right) stops.
SCREEN_BLOCK = 4


@dataclass(frozen=True)
class Screened:
    """A candidate's minibatch predictions and each row's target-metric score, in row order."""

    predictions: pd.DataFrame
    scores: list[float]

    @property
    def score(self) -> float:
        """The mean over the rows screened (the aggregate score_predictions gives them)."""
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


def screen_candidate(
    llm: LLMClient,
    evaluator: EvaluatorService,
    study: StudyConfig,
    prompt: PromptState,
    train: pd.DataFrame,
    bar: float,
    block: int = SCREEN_BLOCK,
) -> Screened:
    """The candidate's predictions on the minibatch `train`, block by block, stopping once even
    a perfect score on the rows left could not bring its mean up to `bar` (the incumbent's
    minibatch score, or a higher one candidates already screened set): such a candidate never
    goes on to validation, so its remaining rows would be calls spent for nothing. Per-row
    scores of every metric here are at most 1, and do not depend on the other rows scored with
    them, so the blocks' scores are the rows' scores."""
    n = len(train)
    frames, scores = [], []
    for start in range(0, n, max(1, block)):
        preds = run_prompt(llm, prompt, train.iloc[start : start + block], study.primary_model, study)
        scored, _ = score_predictions(evaluator, preds, study.target_metric, ["split"])
        frames.append(preds)
        scores.extend(float(x) for x in scored["score"])
        done = len(scores)
        if done < n and (sum(scores) + (n - done)) / n < bar - EPS:
            break
    return Screened(pd.concat(frames, ignore_index=True), scores)


def screening_bar(full_scores: list[float], incumbent_train_score: float, confirm_top: int) -> float:
    """The minibatch score a candidate must still be able to reach to be worth screening on:
    the incumbent's, or, once `confirm_top` candidates were screened on every row, the lowest
    of the best `confirm_top` of them. A candidate that cannot reach it is beaten on the
    minibatch by `confirm_top` others and would not be validated, so stopping it changes
    nothing but the calls spent (racing)."""
    best = sorted(full_scores, reverse=True)[: max(1, confirm_top)]
    if len(best) < max(1, confirm_top):
        return incumbent_train_score
    return max(incumbent_train_score, best[-1])


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
    """Every candidate on the train minibatch (`screen_candidate`: stopped early once it can
    neither match the incumbent there nor enter the best `confirm_top`, see `screening_bar`);
    those that match or beat the incumbent there, the
    best `confirm_top`, on validation, as many as `calls_left` (the budget, None for none) pays
    for after screening; propose_candidates keeps at least one validation affordable. Returns
    all predictions with a `candidate_id` column."""
    study = data.study
    rows = data.iteration_rows(iteration)
    train = rows[rows["split"] == "train"]
    val = rows[rows["split"] == "val"]
    frames = []
    scores = []
    full_scores: list[float] = []
    for i, cand in enumerate(candidates):
        if progress:
            progress(f"screening candidate {i + 1}/{len(candidates)} ({cand.strategy})")
        bar = screening_bar(full_scores, incumbent_train_score, confirm_top)
        screened = screen_candidate(llm, evaluator, study, cand.prompt, train, bar)
        preds = screened.predictions
        if len(preds) == len(train):
            full_scores.append(screened.score)
        frames.append(preds.assign(candidate_id=cand.prompt.id))
        if calls_left is not None:
            calls_left -= live_calls(preds)
        if progress and len(preds) < len(train):
            progress(
                f"candidate {i + 1} ({cand.strategy}) stopped after {len(preds)} of {len(train)} minibatch "
                f"rows: it can no longer reach {bar:.2f} there (the incumbent or the best screened)"
            )
        scores.append(score_of(cand, screened.score))
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
        StopRules.model_validate(study, from_attributes=True),
        unexplored=unexplored,
        best_score=best,
        iterations_done=iteration + 1,
        iterations_without_improvement=streak,
        calls_spent=total_calls,
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
