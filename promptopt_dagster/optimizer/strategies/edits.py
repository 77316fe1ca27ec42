"""Edits that need no LLM: the inferred output-format rule, a shorter instruction, and the two
ways of reading the answer out of a reply (its first line, or a framed `Answer:` field)."""

from __future__ import annotations

import re

from promptopt_dagster.optimizer.context import ProposalContext
from promptopt_dagster.optimizer.strategies.base import OptimizerLLM, Proposal


class AddFormatRule:
    name = "add_format_rule"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        parts = ctx.parts
        if not ctx.format_rule or parts.format_rule == ctx.format_rule:
            return []
        return [Proposal(parts.with_(format_rule=ctx.format_rule), "output format inferred from the data")]


def shorten(text: str) -> str | None:
    """Drop repeated sentences and the longest remaining one; None when nothing can go."""
    seen: set[str] = set()
    kept: list[str] = []
    for s in (s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)):
        if s and s.lower() not in seen:
            seen.add(s.lower())
            kept.append(s)
    if len(kept) >= 3:
        kept.pop(max(range(len(kept)), key=lambda i: len(kept[i])))
    short = " ".join(kept)
    return short if short and len(short) < len(text.strip()) else None


class Shorten:
    name = "shorten"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        short = shorten(ctx.parts.instruction)
        if not short:
            return []
        return [Proposal(ctx.parts.with_(instruction=short), "removed a repeated or the longest sentence")]


class FirstLine:
    """Small models often answer, then explain: read only the first line."""

    name = "first_line"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        if ctx.parts.answer_parser != "raw":
            return []
        return [Proposal(ctx.parts.with_(answer_parser="first_line"), "read the answer from the first line")]


class FrameAnswer:
    """Ask for the answer in a marked field and parse it (DSPy's adapters do the same)."""

    name = "frame_answer"

    def propose(self, ctx: ProposalContext, room: int, llm: OptimizerLLM) -> list[Proposal]:
        if ctx.parts.answer_parser == "answer_field":
            return []
        return [Proposal(ctx.parts.with_(answer_parser="answer_field"), "answer framed as 'Answer: ...'")]
