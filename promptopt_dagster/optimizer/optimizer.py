"""The optimizer: runs proposal strategies on the incumbent and returns distinct candidates.

Strategies not yet tried on the current incumbent go first, in the order of
`optimizer.strategies.STRATEGIES`; remaining room goes to the strategies the bandit picks, and
slots a strategy leaves empty to those that need no LLM and have more to offer.
Every candidate is composed from its parts (`optimizer.parts`), so its text has one shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from promptopt_dagster.core.records import Candidate
from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.llm.base import LLMClient
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.context import ProposalContext, ProposalResult
from promptopt_dagster.optimizer.parts import compose
from promptopt_dagster.optimizer.reply import MAX_PROMPT_CHARS
from promptopt_dagster.optimizer.strategies import (
    LLM_STRATEGIES,
    STRATEGIES,
    OptimizerLLM,
    Proposal,
    Strategy,
)


class Optimizer:
    def __init__(
        self,
        llm: LLMClient,
        *,
        temperature: float = 0.7,
        max_tokens: int = 512,
        strategies: Sequence[str] | None = None,
    ) -> None:
        known = {s.name: s for s in STRATEGIES}
        names = list(strategies) if strategies is not None else list(known)
        unknown = set(names) - set(known)
        if unknown:
            raise OptimizerError(f"unknown strategies {sorted(unknown)}; choose from {sorted(known)}")
        self.llm = llm
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.strategies: list[Strategy] = [known[n] for n in names]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.strategies]

    def order(self, bandit: StrategyBandit, tried_on_incumbent: Sequence[str]) -> list[Strategy]:
        """Untried strategies first (in their fixed order), then the rest as the bandit ranks them."""
        done = set(tried_on_incumbent)
        first = [s for s in self.strategies if s.name not in done]
        ranked = [n for n in bandit.select(len(bandit.strategies)) if n in done]
        by_name = {s.name: s for s in self.strategies}
        rest = [by_name[n] for n in ranked if n in by_name]
        rest += [s for s in self.strategies if s.name in done and s not in rest]
        return first + rest

    def propose(
        self,
        ctx: ProposalContext,
        k: int,
        bandit: StrategyBandit,
        max_calls: int | None = None,
        tried_on_incumbent: Sequence[str] = (),
    ) -> ProposalResult:
        """Up to k distinct candidates. `max_calls` caps the optimizer LLM's live calls (the
        budget): an LLM strategy is skipped, or stops retrying, once they are spent. No candidate
        is an empty result with a warning, unless the optimizer LLM's replies never parsed
        (OptimizerError, naming the fix)."""
        result = ProposalResult(candidates=[])
        llm = OptimizerLLM(self.llm, self.temperature, self.max_tokens, result, max_calls)
        seen = {ctx.incumbent.content_hash()}
        order = self.order(bandit, tried_on_incumbent)
        untried = [s.name for s in order if s.name not in set(tried_on_incumbent)]
        asked: dict[str, int] = {}  # room given to each strategy that filled it
        for strategy in order:
            left = k - len(result.candidates)
            if left <= 0:
                break
            # one slot for each untried strategy still waiting; the surplus to this one
            waiting = len(untried[untried.index(strategy.name) + 1 :]) if strategy.name in untried else 0
            room = max(1, left - waiting)
            result.attempted.append(strategy.name)
            if self._add(ctx, strategy, strategy.propose(ctx, room, llm), result, seen, k) >= room:
                asked[strategy.name] = room
        self._fill_spare_slots(ctx, order, asked, llm, result, seen, k)
        if not result.candidates:
            if llm.budget_hit:
                result.warnings.append("budget: no candidate could be proposed within the LLM calls left")
                return result
            if llm.unusable:
                raise OptimizerError("no candidate prompt could be proposed: " + "; ".join(result.warnings))
            # Every strategy ran and had nothing new (or only text the clean-up removed): the
            # iteration screens nothing, and patience can end the study.
            result.warnings.append("no new candidate: every strategy gave the incumbent or nothing usable")
        return result

    def _add(
        self,
        ctx: ProposalContext,
        strategy: Strategy,
        proposals: list[Proposal],
        result: ProposalResult,
        seen: set[str],
        k: int,
    ) -> int:
        """Add the proposals not seen yet, up to k candidates in all; returns how many proposals
        the strategy made."""
        for proposal in proposals:
            candidate = self._candidate(ctx, strategy.name, proposal)
            if candidate.prompt.content_hash() in seen or len(result.candidates) >= k:
                continue
            seen.add(candidate.prompt.content_hash())
            result.candidates.append(candidate)
            result.strategies.append(strategy.name)
        return len(proposals)

    def _fill_spare_slots(
        self,
        ctx: ProposalContext,
        order: list[Strategy],
        asked: dict[str, int],
        llm: OptimizerLLM,
        result: ProposalResult,
        seen: set[str],
        k: int,
    ) -> None:
        """Slots left by strategies that had nothing to offer go, one per round, to the strategies
        that need no LLM and filled the room they were given (another demonstration size, say):
        a slot left empty is a candidate the study never measures. LLM strategies are not asked
        again, so spare slots cost no optimizer calls."""
        growing = [s for s in order if s.name in asked and s.name not in LLM_STRATEGIES]
        while growing and len(result.candidates) < k:
            for strategy in list(growing):
                if len(result.candidates) >= k:
                    return
                before = len(result.candidates)
                asked[strategy.name] += 1
                made = self._add(
                    ctx, strategy, strategy.propose(ctx, asked[strategy.name], llm), result, seen, k
                )
                if made < asked[strategy.name] or len(result.candidates) == before:
                    growing.remove(strategy)

    @staticmethod
    def _candidate(ctx: ProposalContext, strategy: str, proposal: Proposal) -> Candidate:
        system, output = compose(proposal.parts, ctx.train, ctx.input_columns, ctx.reference_column)
        prompt = ctx.incumbent.child(
            system[:MAX_PROMPT_CHARS],
            output,
            proposal.parts.answer_parser,  # type: ignore[arg-type]
            strategy=strategy,
            rationale=proposal.rationale,
            iteration=ctx.iteration,
            parts=proposal.parts.to_dict(),
        )
        return Candidate(prompt=prompt, strategy=strategy, rationale=proposal.rationale)
