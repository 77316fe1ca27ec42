"""stack: the edits that need no LLM, all at once, on a bare prompt (no demonstrations, the reply
read as is): the inferred format rule, the framed answer and four demonstrations shown in that
frame. On a vague seed each of them alone rarely lifts a small model far, while together they
often do; found one per iteration, the combination costs an iteration of calls or more. Once
per study: after it was measured, its slot goes to strategies that change one part at a time."""

from __future__ import annotations

from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.parts import choose_demonstrations
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal

# add_examples' first size, drawn the same way: the two candidates then differ by the frame alone
DEMONSTRATIONS = 4


class Stack:
    name = "stack"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        if parts.demo_ids or parts.answer_parser != "raw" or any(t.strategy == self.name for t in ctx.tried):
            return []
        seed = ctx.seed + ctx.iteration
        demos = choose_demonstrations(
            ctx.train, ctx.minibatch_ids, ctx.reference_column, DEMONSTRATIONS, seed
        )
        if not demos:
            return []
        new = parts.with_(
            format_rule=parts.format_rule or ctx.format_rule, answer_parser="answer_field", demo_ids=demos
        )
        return [Proposal(new, f"format rule, framed answer and {len(demos)} demonstration(s) at once")]
