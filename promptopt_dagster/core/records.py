"""What one iteration leaves behind: the candidates it tried and the decision it took."""

from __future__ import annotations

from pydantic import BaseModel, Field

from promptopt_dagster.core.prompt_state import PromptState


class Candidate(BaseModel):
    """A proposed prompt, with the strategy that produced it and why."""

    prompt: PromptState
    strategy: str
    rationale: str = ""


class CandidateScore(BaseModel):
    candidate_id: str
    strategy: str
    prompt_chars: int
    train_score: float
    val_score: float | None = None
    predicted_score: float | None = None
    # minibatch rows train_score is over: fewer than the minibatch when screening stopped early
    # (the candidate could no longer match the incumbent there, or enter the best screened);
    # None in older records
    screened_rows: int | None = None
    parts: dict | None = None  # what it was composed from (optimizer.parts.PromptParts)


class IterationRecord(BaseModel):
    """The decision of iteration N. The champion is the prompt iteration N+1 starts from."""

    study: str
    iteration: int
    incumbent_id: str
    incumbent_train_score: float
    incumbent_val_score: float
    candidates: list[CandidateScore] = Field(default_factory=list)
    accepted: bool
    accepted_id: str | None = None
    champion: PromptState
    champion_val_score: float
    best_val_score: float
    iterations_without_improvement: int
    calls: int
    tokens: int
    llm_seconds: float
    wall_seconds: float | None = None  # from the start of the iteration's run to its decision
    cost_usd: float = 0.0
    total_calls: int
    total_tokens: int
    stop: bool
    stop_reason: str | None = None
    stop_message: str = "continue"
    bandit: dict = Field(default_factory=dict)
    # strategies run on the champion since it became champion: patience may stop a study only
    # once every strategy has been tried on it
    tried_on_champion: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
