"""combine: the best instruction, output template, demonstration set and answer parser measured
so far (a joint search over instruction x demonstrations, as MIPROv2's, over what this study
has already measured)."""

from __future__ import annotations

from collections.abc import Callable

from promptopt_dagster.optimizer.context import ProposalContext, Tried
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal


def _value(t: Tried) -> tuple[float, float]:
    """Validation score where measured, then the minibatch score."""
    return (t.val_score if t.val_score is not None else -1.0, t.train_score)


def _best(tried: list[Tried], keep: Callable[[Tried], bool]) -> Tried | None:
    pool = [t for t in tried if keep(t)]
    return max(pool, key=_value) if pool else None


class Combine:
    name = "combine"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        instruction = _best(ctx.tried, lambda t: t.strategy in ("reflect", "seed"))
        template = _best(ctx.tried, lambda t: t.strategy in ("restate_task", "seed"))
        demos = _best(ctx.tried, lambda t: bool(t.parts.demo_ids))
        parser = _best(ctx.tried, lambda t: t.parts.answer_parser != "raw")
        new = parts
        if instruction is not None:
            new = new.with_(instruction=instruction.parts.instruction)
        if template is not None:
            new = new.with_(output_prompt=template.parts.output_prompt)
        if demos is not None:
            new = new.with_(demo_ids=demos.parts.demo_ids)
        if parser is not None and _value(parser) >= _value(instruction or parser):
            new = new.with_(answer_parser=parser.parts.answer_parser)
        new = new.with_(format_rule=new.format_rule or ctx.format_rule)
        if new == parts:
            return []
        return [Proposal(new, "best instruction, demonstrations and answer parser measured so far")]
