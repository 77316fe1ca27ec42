"""restate_task: the optimizer LLM sees a few train inputs with their wanted replies, not the
incumbent's wording, and writes the question that asks for them; that question becomes the
output template. This is how a misleading seed template ("Tell me about {country}." for a
capital look-up) gets replaced, which no edit of the system prompt can do.

The examples name their fields and the reply's column, which is what lets a small model say
what is asked ("the larger" of two numbers). Small models write the question about one example
("What is the capital city of Japan?"), so the example's input values are put back as
placeholders; a question that does not place every input column, or that gives away an
example's reply, is dropped."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import pandas as pd

from promptopt_dagster.core.prompt_state import PLACEHOLDER, template_error, template_fields
from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.parts import choose_demonstrations, rows_by_id
from promptopt_dagster.optimizer.reply import restate_messages
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal

EXAMPLES = 4


def _word(value: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(value)}(?!\w)", re.IGNORECASE)


def as_template(text: str, row: Mapping[str, object], input_columns: Sequence[str]) -> str | None:
    """`text` with `row`'s input values replaced by their `{column}` placeholders (longest value
    first); None unless the result is a valid template that places every input column."""
    out = " ".join(text.split())
    marks: dict[str, str] = {}
    for i, column in enumerate(sorted(input_columns, key=lambda c: -len(str(row[c])))):
        value = " ".join(str(row[column]).split())
        if value:
            mark = f"\x00{i}\x00"
            out, n = _word(value).subn(mark, out)
            if n:
                marks[mark] = f"{{{column}}}"
    for mark, placeholder in marks.items():
        out = out.replace(mark, placeholder)
    if template_error(out) is not None or set(template_fields(out)) != set(input_columns):
        return None
    return out


def gives_away(template: str, references: Sequence[str]) -> bool:
    """Whether the template, its placeholders aside, names one of the example replies."""
    text = PLACEHOLDER.sub(" ", template)
    return any(len(ref) >= 2 and _word(ref).search(text) for ref in references)


def example_rows(ctx: ProposalContext) -> pd.DataFrame:
    """A few train rows outside the screening minibatch (covering the labels), else any."""
    ids = choose_demonstrations(
        ctx.train, ctx.minibatch_ids, ctx.reference_column, EXAMPLES, ctx.seed + ctx.iteration
    )
    return rows_by_id(ctx.train, ids) if ids else ctx.train.head(EXAMPLES)


class RestateTask:
    name = "restate_task"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        rows = example_rows(ctx).to_dict("records")
        if not rows:
            return []
        columns, reference = ctx.input_columns, ctx.reference_column
        examples = [({c: str(r[c]) for c in columns}, str(r[reference])) for r in rows]
        messages = restate_messages(examples, columns, reference, 2)
        replies = llm.ask(self.name, messages, ctx.seed + ctx.iteration)
        # a reply that recurs among the train references is a label, which a question may name
        counts = ctx.train[reference].astype(str).value_counts()
        unique_refs = [ref for _, ref in examples if counts.get(ref, 0) <= 1]
        parts = ctx.parts
        out: list[Proposal] = []
        seen = {parts.output_prompt}
        for reply in replies:
            template = next(
                (t for r in rows if (t := as_template(reply.system_prompt, r, columns))), None
            )
            if template in seen:
                continue
            if template is None or gives_away(template, unique_refs):
                llm.result.warnings.append(
                    f"{self.name}: dropped a question that is not a template of every input column "
                    f"or gives an answer away: {reply.system_prompt[:120]!r}"
                )
                continue
            seen.add(template)
            new = parts.with_(output_prompt=template, format_rule=parts.format_rule or ctx.format_rule)
            # the model's rationale mostly answers its own example question: not kept
            out.append(Proposal(new, "the task asked as a question written from train examples"))
        return out[: max(1, room)]
