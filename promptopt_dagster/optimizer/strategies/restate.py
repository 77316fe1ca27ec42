"""restate_task: the optimizer LLM rewrites the instruction to be clear, precise and short."""

from __future__ import annotations

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.reply import restate_messages
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal
from promptopt_dagster.optimizer.strategies.reflect import cleaned_proposals


class RestateTask:
    name = "restate_task"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        shown = PromptState(system_prompt=ctx.parts.instruction, output_prompt=ctx.parts.output_prompt)
        replies = llm.ask(self.name, restate_messages(shown, ctx.format_rule), ctx.seed + ctx.iteration)
        return cleaned_proposals(self.name, ctx, replies[:room], llm)
