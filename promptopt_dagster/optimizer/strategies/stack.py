"""stack: the edits that need no LLM, all at once, on a bare prompt (no demonstrations, the reply
read as is): the inferred format rule, the framed answer and four demonstrations shown in that
frame. On a vague seed each of them alone rarely lifts a small model far, while together they
often do; found one per iteration, the combination costs an iteration of calls or more. Once
per study: after it was measured, its slot goes to strategies that change one part at a time."""

from __future__ import annotations

from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal
from promptopt_dagster.optimizer.strategies.demonstrations import SIZES, draw_demonstrations

# add_examples' first size and first draw: the two candidates then differ by the frame alone
DEMONSTRATIONS = SIZES[0]


class Stack:
    name = "stack"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        if parts.demo_ids or parts.answer_parser != "raw" or any(t.strategy == self.name for t in ctx.tried):
            return []
        demos = draw_demonstrations(ctx, DEMONSTRATIONS)
        if not demos:
            return []
        new = parts.with_(
            format_rule=parts.format_rule or ctx.format_rule, answer_parser="answer_field", demo_ids=demos
        )
        return [Proposal(new, f"format rule, framed answer and {len(demos)} demonstration(s) at once")]
