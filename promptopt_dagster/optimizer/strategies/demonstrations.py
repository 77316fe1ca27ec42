"""add_examples: demonstrations from the train split (never the screening minibatch). The number
of demonstrations and the rows themselves are searched: each size (0, 2, 4, 8) is a candidate,
sizes not yet measured with the incumbent's instruction and template come first, then another
draw of the incumbent's own size (which rows are shown moves a small model's score as much as
how many), and the minibatch and validation measure them all."""

from __future__ import annotations

from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.parts import PromptParts, choose_demonstrations
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal

SIZES = (4, 2, 8, 0)
# Draws tried per size before giving up on finding a set not measured yet.
DRAWS = 8


def draw_demonstrations(ctx: ProposalContext, k: int, draw: int = 0) -> tuple[str, ...]:
    """Draw number `draw` of k demonstration rows for this iteration (never the minibatch)."""
    seed = ctx.seed + ctx.iteration + 1000 * draw
    return choose_demonstrations(ctx.train, ctx.minibatch_ids, ctx.reference_column, k, seed)


class AddExamples:
    name = "add_examples"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        current = len(parts.demo_ids)
        # sizes measured with this prompt's other parts: after a new instruction or template was
        # accepted, every size is worth measuring again before another draw of the same size
        base = self._base(ctx, parts)
        tried_sizes = {len(t.parts.demo_ids) for t in ctx.tried if self._base(ctx, t.parts) == base}
        others = [k for k in SIZES if k != current and (k > 0 or parts.demo_ids)]
        untried = [k for k in others if k not in tried_sizes]
        redraw = [current] if current else []
        plan = untried + redraw + [k for k in others if k in tried_sizes]
        # with the format rule every proposal carries, so a set differing only by it is no news
        measured = {
            p.with_(format_rule=p.format_rule or ctx.format_rule)
            for p in [parts, *(t.parts for t in ctx.tried)]
        }
        out = []
        for k in plan:
            if len(out) >= max(1, room):
                break
            new = self._draw(ctx, k, measured)
            if new is None:
                continue
            measured.add(new)
            demos = new.demo_ids
            what = "another draw of" if k == current else "a set of"
            out.append(Proposal(new, f"{what} {len(demos)} demonstration(s) from the train split"))
        return out

    @staticmethod
    def _base(ctx: ProposalContext, parts: PromptParts) -> PromptParts:
        """`parts` without demonstrations, with the format rule every proposal carries."""
        return parts.with_(demo_ids=(), format_rule=parts.format_rule or ctx.format_rule)

    @staticmethod
    def _draw(ctx: ProposalContext, k: int, measured: set[PromptParts]) -> PromptParts | None:
        """The incumbent's parts with k demonstration rows, a combination not measured before in
        this study (k=0: none), or None."""
        parts = ctx.parts
        for draw in range(DRAWS if k else 1):
            demos = draw_demonstrations(ctx, k, draw)
            if k and not demos:
                return None
            new = parts.with_(demo_ids=demos, format_rule=parts.format_rule or ctx.format_rule)
            if new not in measured:
                return new
        return None
