"""What a proposal strategy is given, and what the optimizer returns."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate
from promptopt_dagster.llm.base import Usage
from promptopt_dagster.optimizer.parts import PromptParts


@dataclass
class Failure:
    inputs: dict[str, Any]
    expected: str
    got: str


@dataclass
class HistoryEntry:
    system_prompt: str
    score: float


@dataclass(frozen=True)
class Tried:
    """A candidate measured in an earlier iteration: its parts and scores (validation when it was
    confirmed there, else None)."""

    parts: PromptParts
    strategy: str
    train_score: float
    val_score: float | None


@dataclass
class ProposalContext:
    """Everything a proposal needs about the current iteration."""

    incumbent: PromptState
    metric: str
    incumbent_score: float
    failures: list[Failure]
    history: list[HistoryEntry]
    train: pd.DataFrame
    minibatch_ids: set[str]
    input_columns: list[str]
    reference_column: str
    iteration: int
    seed: int
    tried: list[Tried] = field(default_factory=list)
    format_rule: str | None = None

    @property
    def parts(self) -> PromptParts:
        return PromptParts.of(self.incumbent)


@dataclass
class ProposalResult:
    candidates: list[Candidate]
    usage: Usage = field(default_factory=Usage)
    warnings: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    # every strategy that was run on the incumbent, whether or not it produced a candidate
    attempted: list[str] = field(default_factory=list)
    # LLM calls the budget leaves for screening and validation (None: no budget)
    calls_left: int | None = None


Ranker = Callable[[list[Candidate]], list[float]]
