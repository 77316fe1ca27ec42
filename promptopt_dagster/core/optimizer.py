"""The optimizer: propose candidate prompts from several sources, then let measurement pick.

A small optimizer LLM writes weak prompts (long, pasting the feedback back in), so reflection is
only one source among several. The others need no LLM: an output-format rule inferred from the
reference labels, demonstrations from the train split, and edits of the incumbent. A bandit
(core.explorer) learns which strategies pay off for a study. Candidates are screened on a train
minibatch; only the best go to validation, and a candidate is accepted only on a validation
improvement. The test split is never seen here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from promptopt_dagster.core.errors import OptimizerError
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import Candidate, CandidateScore
from promptopt_dagster.llm.base import ChatRequest, LLMClient, Message, Usage

LLM_STRATEGIES = ("reflect", "restate_task")
ALL_STRATEGIES = ("reflect", "add_format_rule", "add_examples", "shorten", "restate_task", "add_reasoning")
MAX_PROMPT_CHARS = 2500
PARSE_ATTEMPTS = 3


class ProposedPrompt(BaseModel):
    """One candidate as the optimizer LLM must return it."""

    system_prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT_CHARS)
    output_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    rationale: str = Field("", max_length=1000)


class ProposalReply(BaseModel):
    candidates: list[ProposedPrompt] = Field(..., min_length=1)


PROPOSAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "candidates": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "system_prompt": {"type": "string"},
                    "rationale": {"type": "string"},
                },
                "required": ["system_prompt", "rationale"],
            },
        }
    },
    "required": ["candidates"],
}


@dataclass
class Failure:
    inputs: dict[str, Any]
    expected: str
    got: str


@dataclass
class HistoryEntry:
    system_prompt: str
    score: float


@dataclass
class ProposalResult:
    candidates: list[Candidate]
    usage: Usage = field(default_factory=Usage)
    warnings: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Output format inferred from the references, no LLM involved.


def infer_format_rule(references: Sequence[str], max_labels: int = 12) -> str | None:
    """An explicit output-format instruction that fits every reference, or None."""
    refs = [str(r).strip() for r in references if str(r).strip()]
    if not refs:
        return None
    distinct = sorted(set(refs))
    if len(distinct) <= max_labels and len(distinct) * 2 <= len(refs):
        labels = ", ".join(distinct)
        return f"Answer with exactly one of: {labels}. Reply with that label only, no other words."
    if all(re.fullmatch(r"-?\d+(\.\d+)?", r) for r in refs):
        return "Reply with only the final number, digits only, no words or units."
    words = sorted(len(r.split()) for r in refs)
    longest = words[int(0.9 * (len(words) - 1))]
    if longest <= 8:
        rule = f"Reply with only the answer, at most {longest} words, no explanation."
        if all(r == r.lower() for r in refs):
            rule += " Use lowercase."
        elif all(r == r.upper() for r in refs):
            rule += " Use uppercase."
        return rule
    return None


def _append(system_prompt: str, addition: str) -> str:
    base = system_prompt.strip()
    return f"{base}\n{addition}".strip() if base else addition


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def shorten(system_prompt: str) -> str | None:
    """Drop repeated sentences and the longest remaining one; None when nothing can go."""
    seen: set[str] = set()
    kept: list[str] = []
    for s in _sentences(system_prompt):
        if s.lower() not in seen:
            seen.add(s.lower())
            kept.append(s)
    if len(kept) >= 3:
        longest = max(range(len(kept)), key=lambda i: len(kept[i]))
        kept.pop(longest)
    text = " ".join(kept)
    return text if text and len(text) < len(system_prompt.strip()) else None


def format_examples(rows: pd.DataFrame, input_columns: list[str], reference: str) -> str:
    lines = ["Examples:"]
    for _, row in rows.iterrows():
        shown = "; ".join(str(row[c]) for c in input_columns)
        lines.append(f"Input: {shown}\nOutput: {row[reference]}")
    return "\n".join(lines)


def pick_demonstrations(
    train: pd.DataFrame, exclude: set[str], reference: str, k: int, seed: int
) -> pd.DataFrame:
    """Up to k train rows outside the screening minibatch, covering distinct labels first."""
    pool = train[~train["row_id"].isin(exclude)]
    if pool.empty:
        return pool
    pool = pool.sample(frac=1.0, random_state=seed)
    first = pool.drop_duplicates(subset=[reference])
    rest = pool.drop(first.index)
    return pd.concat([first, rest]).head(k)


# ---------------------------------------------------------------------------------------------
# The optimizer LLM.


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reflection_messages(
    prompt: PromptState,
    metric: str,
    score: float,
    failures: Sequence[Failure],
    history: Sequence[HistoryEntry],
    k: int,
) -> list[Message]:
    """A short, direct meta-prompt: small optimizer models follow these, not long ones."""
    cases = "\n\n".join(
        f"Input: {_clip('; '.join(str(v) for v in f.inputs.values()), 300)}\n"
        f"Expected: {_clip(f.expected, 100)}\nGot: {_clip(f.got, 150)}"
        for f in failures
    )
    earlier = "\n".join(f"- score {h.score:.2f}: {_clip(h.system_prompt, 200)}" for h in history[-4:])
    user = (
        f'A language model gets this instruction:\n"{prompt.system_prompt.strip() or "(none)"}"\n'
        f'and then this message, with {{...}} filled from the data:\n"{prompt.output_prompt}"\n\n'
        f"Its {metric} score is {score:.2f}. Cases it got wrong:\n\n{cases or '(none shown)'}\n\n"
        + (f"Earlier instructions and their scores:\n{earlier}\n\n" if earlier else "")
        + f"Write {k} new short instruction(s) that make the model reply exactly like 'Expected'. "
        "State the task and the exact output format. Do not copy the cases.\n"
        'Reply with JSON: {"candidates": [{"system_prompt": "...", "rationale": "..."}]}'
    )
    return [
        Message(
            role="system", content="You improve instructions for a language model. Reply with JSON only."
        ),
        Message(role="user", content=user),
    ]


def restate_messages(prompt: PromptState, format_rule: str | None) -> list[Message]:
    user = (
        f"Rewrite this instruction for a language model so it is clear, precise and short:\n"
        f'"{prompt.system_prompt.strip() or prompt.output_prompt}"\n'
        + (f"The reply format must be: {format_rule}\n" if format_rule else "")
        + 'Reply with JSON: {"candidates": [{"system_prompt": "...", "rationale": "..."}]}'
    )
    return [
        Message(role="system", content="You rewrite instructions. Reply with JSON only."),
        Message(role="user", content=user),
    ]


def _extract_json(text: str) -> Any:
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fence:
        text = fence.group(1).strip()
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start > 0:
        text = text[start:]
    return json.loads(text)


def parse_proposals(text: str) -> list[ProposedPrompt]:
    """Validate an optimizer reply; raises ValueError saying what was wrong."""
    try:
        data = _extract_json(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg})") from exc
    if isinstance(data, list):
        data = {"candidates": data}
    elif isinstance(data, dict) and "candidates" not in data and "system_prompt" in data:
        data = {"candidates": [data]}
    try:
        return ProposalReply.model_validate(data).candidates
    except ValidationError as exc:
        raise ValueError(f"JSON of the wrong shape: {exc.errors()[0]['msg']}") from exc


def copied_case(text: str, failures: Sequence[Failure], min_chars: int = 6) -> str | None:
    """An input of a shown case that a proposal pasted in verbatim (small models do): such a
    prompt overfits one row and leaks training data into the instruction."""
    lowered = text.lower()
    for f in failures:
        for value in f.inputs.values():
            value = " ".join(str(value).split()).lower()
            if len(value) >= min_chars and value in lowered:
                return value
    return None


@dataclass
class Asked:
    """What asking the optimizer LLM gave: proposals (None if no reply parsed), the calls it
    cost (failed attempts included), what went wrong, and whether the budget cut it short."""

    proposals: list[ProposedPrompt] | None
    usage: Usage
    problems: list[str]
    out_of_budget: bool = False


def _ask(
    llm: LLMClient,
    messages: list[Message],
    temperature: float,
    max_tokens: int,
    seed: int,
    max_calls: int | None = None,
) -> Asked:
    usage = Usage()
    problems: list[str] = []
    for attempt in range(PARSE_ATTEMPTS):
        if max_calls is not None and usage.calls >= max_calls:
            problems.append(f"stopped after {usage.calls} call(s): the LLM-call budget is spent")
            return Asked(None, usage, problems, out_of_budget=True)
        request = ChatRequest.of(
            messages,
            temperature=max(temperature, 0.3 if attempt else temperature),
            max_tokens=max_tokens,
            json_schema=PROPOSAL_SCHEMA,
            seed=seed * 1000 + attempt,
        )
        [response] = llm.generate([request])
        usage = usage + Usage.from_responses([response])
        if not response.ok:
            problems.append(f"call failed: {response.error}")
            continue
        try:
            return Asked(parse_proposals(response.text), usage, problems)
        except ValueError as exc:
            problems.append(f"{exc}; reply began {_clip(response.text, 80)!r}")
    return Asked(None, usage, problems)


def _no_json(llm: LLMClient, asked: Asked) -> OptimizerError:
    attempts = asked.usage.calls + asked.usage.cached_calls
    return OptimizerError(
        f"the optimizer model ({llm.backend}:{llm.model}) gave no usable JSON in {attempts} "
        f"attempt{'' if attempts == 1 else 's'} ({'; '.join(asked.problems)}). Use a stronger "
        "optimizer_model in the study, or raise its max_tokens if replies are cut off."
    )


def ask_optimizer(
    llm: LLMClient,
    messages: list[Message],
    temperature: float,
    max_tokens: int,
    seed: int,
    max_calls: int | None = None,
) -> tuple[list[ProposedPrompt], Usage]:
    """Ask until the reply parses (at most PARSE_ATTEMPTS times), varying the sampling seed so a
    cached bad reply isn't reused. With `max_calls`, no attempt starts once that many live
    (uncached) calls are spent. Raises OptimizerError when no reply parsed."""
    asked = _ask(llm, messages, temperature, max_tokens, seed, max_calls)
    if asked.proposals is None:
        raise _no_json(llm, asked)
    return asked.proposals, asked.usage


# ---------------------------------------------------------------------------------------------
# Proposal.


@dataclass
class ProposalContext:
    """Everything a proposal needs about the current iteration."""

    incumbent: PromptState
    metric: str
    incumbent_score: float
    failures: list[Failure]
    history: list[HistoryEntry]
    train: pd.DataFrame
    minibatch_ids: set[str]
    input_columns: list[str]
    reference_column: str
    iteration: int
    seed: int


class Optimizer:
    def __init__(
        self,
        llm: LLMClient,
        *,
        temperature: float = 0.7,
        max_tokens: int = 512,
        strategies: Sequence[str] = ALL_STRATEGIES,
        demonstrations: int = 4,
    ) -> None:
        unknown = set(strategies) - set(ALL_STRATEGIES)
        if unknown:
            raise OptimizerError(f"unknown strategies {sorted(unknown)}; choose from {ALL_STRATEGIES}")
        self.llm = llm
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.strategies = tuple(strategies)
        self.demonstrations = demonstrations
        self._max_calls: int | None = None
        self._budget_hit = False

    def propose(
        self, ctx: ProposalContext, k: int, bandit: StrategyBandit, max_calls: int | None = None
    ) -> ProposalResult:
        """Up to k distinct candidates. Reflection is always tried when the optimizer LLM is in
        the strategy list; the other slots go to the strategies the bandit picks.

        `max_calls` caps the optimizer LLM's live calls (the study's budget): a strategy that needs
        the LLM is skipped, or stops retrying, once they are spent. If that leaves no candidate the
        result is empty (with a warning) instead of an error."""
        result = ProposalResult(candidates=[])
        self._max_calls = max_calls
        self._budget_hit = False
        format_rule = infer_format_rule(ctx.train[ctx.reference_column].astype(str).tolist())
        picked = []
        if "reflect" in self.strategies:
            picked.append("reflect")
        others = [s for s in bandit.select(len(self.strategies)) if s in self.strategies and s not in picked]
        picked += others
        seen = {ctx.incumbent.content_hash()}
        for strategy in picked:
            if len(result.candidates) >= k:
                break
            try:
                made = self._make(strategy, ctx, format_rule, k - len(result.candidates), result)
            except OptimizerError as exc:
                result.warnings.append(str(exc))
                continue
            for cand in made:
                if cand.prompt.content_hash() not in seen and len(result.candidates) < k:
                    seen.add(cand.prompt.content_hash())
                    result.candidates.append(cand)
                    result.strategies.append(strategy)
        if not result.candidates and self._budget_hit:
            result.warnings.append("budget: no candidate could be proposed within the LLM calls left")
            return result
        if not result.candidates:
            raise OptimizerError(
                "no candidate prompt could be proposed: "
                + ("; ".join(result.warnings) or "every strategy returned the incumbent unchanged")
            )
        return result

    def _child(
        self, ctx: ProposalContext, system: str, strategy: str, rationale: str, output: str | None = None
    ) -> Candidate:
        """A candidate derived from the incumbent. A proposed output template is used only if it
        is a valid template that keeps at least one placeholder and names no unknown column."""
        out = ctx.incumbent.output_prompt
        if output:
            proposed = PromptState(system_prompt="", output_prompt=output)
            if (
                proposed.template_error() is None
                and proposed.placeholders()
                and not proposed.missing_columns(ctx.input_columns)
            ):
                out = output
        prompt = ctx.incumbent.child(
            system[:MAX_PROMPT_CHARS], out, strategy=strategy, rationale=rationale, iteration=ctx.iteration
        )
        return Candidate(prompt=prompt, strategy=strategy, rationale=rationale)

    def _make(
        self, strategy: str, ctx: ProposalContext, format_rule: str | None, room: int, result: ProposalResult
    ) -> list[Candidate]:
        if strategy in LLM_STRATEGIES:
            return self._from_llm(strategy, ctx, format_rule, room, result)
        inc = ctx.incumbent.system_prompt
        if strategy == "add_format_rule":
            if not format_rule or format_rule in inc:
                return []
            return [
                self._child(ctx, _append(inc, format_rule), strategy, "output format inferred from the data")
            ]
        if strategy == "add_examples":
            return self._with_examples(ctx, format_rule)
        if strategy == "shorten":
            short = shorten(inc)
            return (
                [self._child(ctx, short, strategy, "removed repeated or longest sentence")] if short else []
            )
        if strategy == "add_reasoning":
            line = "Think about the task carefully, but write only the final answer."
            return [] if line in inc else [self._child(ctx, _append(inc, line), strategy, "asks for care")]
        return []

    def _from_llm(
        self, strategy: str, ctx: ProposalContext, format_rule: str | None, room: int, result: ProposalResult
    ) -> list[Candidate]:
        if strategy == "reflect":
            messages = reflection_messages(
                ctx.incumbent, ctx.metric, ctx.incumbent_score, ctx.failures, ctx.history, min(room, 2)
            )
        else:
            messages = restate_messages(ctx.incumbent, format_rule)
        left = None if self._max_calls is None else self._max_calls - result.usage.calls
        if left is not None and left <= 0:
            self._budget_hit = True
            raise OptimizerError(f"{strategy}: skipped, the LLM-call budget has no calls left for it")
        asked = _ask(
            self.llm, messages, self.temperature, self.max_tokens, ctx.seed + ctx.iteration, left
        )
        result.usage = result.usage + asked.usage  # failed attempts cost calls too
        if asked.proposals is None:
            self._budget_hit = self._budget_hit or asked.out_of_budget
            raise _no_json(self.llm, asked)
        proposals = asked.proposals
        made = []
        for p in proposals[:room]:
            system = p.system_prompt.strip()
            copied = copied_case(system, ctx.failures)
            if copied:
                result.warnings.append(
                    f"{strategy}: dropped a proposal that copies a training case ({copied!r})"
                )
                continue
            # The data-derived format rule rides along: measurement decides if it helps.
            if format_rule and format_rule not in system:
                system = _append(system, format_rule)
            made.append(self._child(ctx, system, strategy, p.rationale or strategy, p.output_prompt))
        return made

    def _with_examples(self, ctx: ProposalContext, format_rule: str | None) -> list[Candidate]:
        inc = ctx.incumbent.system_prompt
        if "Examples:" in inc:
            return []
        demos = pick_demonstrations(
            ctx.train, ctx.minibatch_ids, ctx.reference_column, self.demonstrations, ctx.seed + ctx.iteration
        )
        if demos.empty:
            return []
        block = format_examples(demos, ctx.input_columns, ctx.reference_column)
        system = _append(inc, format_rule) if format_rule and format_rule not in inc else inc
        return [self._child(ctx, _append(system, block), "add_examples", f"{len(demos)} train examples")]


# ---------------------------------------------------------------------------------------------
# Selection.


def rank_for_confirmation(scores: list[CandidateScore]) -> list[CandidateScore]:
    """Best train score first; on ties the shorter prompt."""
    return sorted(scores, key=lambda s: (-s.train_score, s.prompt_chars))


def choose_for_validation(
    scores: list[CandidateScore], incumbent_train: float, top: int
) -> list[CandidateScore]:
    """Candidates worth validation calls: the best `top` that match or beat the incumbent on the
    minibatch."""
    return [s for s in rank_for_confirmation(scores) if s.train_score >= incumbent_train][:top]


def pick_winner(
    scores: list[CandidateScore], incumbent_val: float, min_gain: float = 1e-9
) -> CandidateScore | None:
    """The validated candidate with the best validation score, if it beats the incumbent."""
    validated = [s for s in scores if s.val_score is not None]
    if not validated:
        return None
    best = sorted(validated, key=lambda s: (-(s.val_score or 0.0), -s.train_score, s.prompt_chars))[0]
    return best if (best.val_score or 0.0) > incumbent_val + min_gain else None


def collect_failures(
    rows: pd.DataFrame, input_columns: list[str], reference: str, limit: int = 4
) -> list[Failure]:
    """Rows the prompt got wrong (score below 1), worst first; `rows` has prediction and score."""
    wrong = rows[rows["score"] < 1.0].sort_values("score", kind="stable").head(limit)
    return [
        Failure(inputs={c: r[c] for c in input_columns}, expected=str(r[reference]), got=str(r["prediction"]))
        for _, r in wrong.iterrows()
    ]


Ranker = Callable[[list[Candidate]], list[float]]
