"""The one interface every proposal strategy implements, and the optimizer LLM access they share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from promptopt_dagster.llm.base import LLMClient, Message
from promptopt_dagster.optimizer.context import ProposalContext, ProposalResult
from promptopt_dagster.optimizer.parts import PromptParts
from promptopt_dagster.optimizer.reply import ProposedPrompt, ask, no_json_error


@dataclass(frozen=True)
class Proposal:
    parts: PromptParts
    rationale: str


class Strategy(Protocol):
    """Proposes new parts for the incumbent; [] when it has nothing new to offer."""

    name: str

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]: ...


class OptimizerLLM:
    """The optimizer LLM for one proposal round: counts its calls into `result`, stops at
    `max_calls` live calls, and records why a reply was unusable."""

    def __init__(
        self,
        llm: LLMClient,
        temperature: float,
        max_tokens: int,
        result: ProposalResult,
        max_calls: int | None,
    ) -> None:
        self.llm, self.temperature, self.max_tokens = llm, temperature, max_tokens
        self.result, self.max_calls = result, max_calls
        self.budget_hit = False
        self.unusable = False  # a reply never parsed: the optimizer model itself is the problem

    def ask(self, name: str, messages: list[Message], seed: int) -> list[ProposedPrompt]:
        left = None if self.max_calls is None else self.max_calls - self.result.usage.calls
        if left is not None and left <= 0:
            self.budget_hit = True
            self.result.warnings.append(f"{name}: skipped, the LLM-call budget has no calls left for it")
            return []
        asked = ask(self.llm, messages, self.temperature, self.max_tokens, seed, left)
        self.result.usage = self.result.usage + asked.usage  # failed attempts cost calls too
        if asked.proposals is None:
            self.budget_hit = self.budget_hit or asked.out_of_budget
            self.unusable = self.unusable or not asked.out_of_budget
            self.result.warnings.append(f"{name}: {no_json_error(self.llm, asked)}")
            return []
        return asked.proposals
