"""add_examples: demonstrations from the train split (never the screening minibatch). The number
of demonstrations is searched (0, 2, 4, 8): each size is a candidate, the minibatch measures
them, and sizes not yet tried on this study come first."""

from __future__ import annotations

from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.parts import choose_demonstrations
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal

SIZES = (4, 2, 8, 0)


class AddExamples:
    name = "add_examples"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        tried_sizes = {len(t.parts.demo_ids) for t in ctx.tried if t.strategy == self.name}
        sizes = [k for k in SIZES if k != len(parts.demo_ids) and (k > 0 or parts.demo_ids)]
        sizes.sort(key=lambda k: k in tried_sizes)  # untried sizes first, stable otherwise
        out = []
        for k in sizes[: max(1, room)]:
            demos = choose_demonstrations(
                ctx.train, ctx.minibatch_ids, ctx.reference_column, k, ctx.seed + ctx.iteration
            )
            if k and not demos:
                continue
            new = parts.with_(demo_ids=demos, format_rule=parts.format_rule or ctx.format_rule)
            out.append(Proposal(new, f"{len(demos)} demonstration(s) from the train split"))
        return out
