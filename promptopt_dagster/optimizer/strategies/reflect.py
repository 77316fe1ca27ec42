"""reflect: the optimizer LLM reads the failures and the score history and writes new
instructions; stray lines are cleaned out before screening."""

from __future__ import annotations

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.optimizer.cleaning import clean_instruction
from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.reply import ProposedPrompt, reflection_messages
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal


def training_rows(ctx: ProposalContext) -> list[list[str]]:
    """Each train row's inputs and reference, the text an instruction must not paste."""
    columns = [*ctx.input_columns, ctx.reference_column]
    return ctx.train[columns].astype(str).values.tolist()


def cleaned_proposals(
    name: str, ctx: ProposalContext, replies: list[ProposedPrompt], llm: OptimizerLLM
) -> list[Proposal]:
    """The replies as new instructions for the incumbent's parts, without stray lines; a
    proposed output template is taken only if it is valid and uses known columns."""
    base = ctx.parts
    rows = training_rows(ctx)
    out = []
    for reply in replies:
        templates = [base.output_prompt, reply.output_prompt or ""]
        cleaned = clean_instruction(reply.system_prompt, rows, input_templates=templates)
        if cleaned.dropped:
            llm.result.warnings.append(f"{name}: dropped stray line(s) {cleaned.dropped}")
        if not cleaned.text:
            continue
        output = base.output_prompt
        if reply.output_prompt:
            proposed = PromptState(system_prompt="", output_prompt=reply.output_prompt)
            if (
                proposed.template_error() is None
                and proposed.placeholders()
                and not proposed.missing_columns(ctx.input_columns)
            ):
                output = reply.output_prompt
        # The data-derived format rule rides along: measurement decides whether it helps.
        parts = base.with_(
            instruction=cleaned.text, output_prompt=output, format_rule=base.format_rule or ctx.format_rule
        )
        out.append(Proposal(parts, reply.rationale or name))
    return out


class Reflect:
    name = "reflect"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        shown = PromptState(system_prompt=ctx.parts.instruction, output_prompt=ctx.parts.output_prompt)
        messages = reflection_messages(
            shown, ctx.metric, ctx.incumbent_score, ctx.failures, ctx.history, min(room, 2)
        )
        replies = llm.ask(self.name, messages, ctx.seed + ctx.iteration)
        return cleaned_proposals(self.name, ctx, replies[:room], llm)
