"""Step 3 of an iteration: the optimizer's candidates for the incumbent, from its failures, the
study's history and the budget left."""

from __future__ import annotations

import pandas as pd
from pydantic import BaseModel, Field

from promptopt_dagster.core.budget import budget_left, live_calls, within_budget
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, IterationRecord
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.llm.base import LLMClient, Usage
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
from promptopt_dagster.optimizer.selection import collect_failures
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES

BANDIT_STRATEGIES = STRATEGY_NAMES
# With the incumbent at zero on the minibatch, propose this many times the candidates: the search
# widens instead of stopping.
WIDEN_AT_ZERO = 2


class CandidateSet(BaseModel):
    """What step 3 hands on: the candidates, in the order they are to be screened, and what
    proposing them cost and left."""

    candidates: list[Candidate] = Field(default_factory=list)
    usage: dict[str, float | int] = Field(default_factory=dict)  # the optimizer LLM's, Usage.as_dict()
    warnings: list[str] = Field(default_factory=list)
    attempted: list[str] = Field(default_factory=list)  # every strategy run on the incumbent
    calls_left: int | None = None  # for screening and validation (None: no budget)

    @classmethod
    def of(cls, result: ProposalResult) -> CandidateSet:
        return cls(
            candidates=result.candidates,
            usage=result.usage.as_dict(),
            warnings=result.warnings,
            attempted=result.attempted,
            calls_left=result.calls_left,
        )

    def optimizer_usage(self) -> Usage:
        return Usage.from_dict(self.usage)


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
    left = budget_left(study, records, live_calls(baseline_scored))
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
        return within_budget(result, left, screen_calls, val_calls)
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
    return within_budget(result, left, screen_calls, val_calls)
