"""Asking the optimizer LLM: short, direct meta-prompts (small models follow these, not long
ones), replies as JSON validated by pydantic (grammar-constrained on the local model,
`response_schema` on Gemini), retried with a new sampling seed when a reply does not parse (the
response cache would otherwise return the same bad reply), within the calls the budget leaves."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.llm.base import ChatRequest, LLMClient, Message, Usage
from promptopt_dagster.optimizer.context import Failure, HistoryEntry

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


def restate_messages(
    examples: Sequence[tuple[Mapping[str, str], str]], placeholders: Sequence[str], answer: str, k: int
) -> list[Message]:
    """Ask for the question that turns each example input into its wanted reply. Shown only the
    examples (not the incumbent's wording, which may mislead: "Tell me about {country}."), a
    small model writes questions about one example ("What is the capital city of Japan?"); the
    strategy turns the example's values back into placeholders. The inputs are shown field by
    field and the reply is named by its column (`answer`): shown "857; 854" -> "857" a 0.5B model
    asked "What is the closest integer to 857?"; shown "a: 857; b: 854" and "the wanted reply is
    its larger" it asks "What is the larger of 857 and 854?"."""
    shown = "\n\n".join(
        f"Input: {_clip('; '.join(f'{name}: {value}' for name, value in fields.items()), 300)}\n"
        f"Wanted reply ({answer}): {_clip(reply, 100)}"
        for fields, reply in examples
    )
    slots = ", ".join(f"{{{p}}}" for p in placeholders)
    user = (
        f"Each input has the fields {', '.join(placeholders)}; the wanted reply is its {answer}.\n"
        f"Inputs and the exact reply wanted for each:\n{shown}\n\n"
        f"Write {k} different question(s) that make a language model give the wanted reply. "
        f"Put {slots} where the input goes, and end each question with: Reply with only the answer.\n"
        'Reply with JSON: {"candidates": [{"system_prompt": "...", "rationale": "..."}]}'
    )
    return [
        Message(role="system", content="You write prompts for a language model. Reply with JSON only."),
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


_CANDIDATE_START = re.compile(r'\{\s*"system_prompt"')


def _complete_candidates(text: str) -> list[dict[str, Any]]:
    """The whole candidate objects in a reply cut off by max_tokens (small models write long
    rationales): each `{"system_prompt": ...}` object that decodes on its own."""
    decoder = json.JSONDecoder()
    found = []
    for match in _CANDIDATE_START.finditer(text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found.append(obj)
    return found


def parse_proposals(text: str) -> list[ProposedPrompt]:
    """Validate an optimizer reply; raises ValueError saying what was wrong. A reply cut off
    after some whole candidates keeps those."""
    try:
        data = _extract_json(text)
    except json.JSONDecodeError as exc:
        whole = _complete_candidates(text)
        if not whole:
            raise ValueError(f"not JSON ({exc.msg})") from exc
        data = {"candidates": whole}
    if isinstance(data, list):
        data = {"candidates": data}
    elif isinstance(data, dict) and "candidates" not in data and "system_prompt" in data:
        data = {"candidates": [data]}
    try:
        return ProposalReply.model_validate(data).candidates
    except ValidationError as exc:
        raise ValueError(f"JSON of the wrong shape: {exc.errors()[0]['msg']}") from exc


@dataclass
class Asked:
    """What asking the optimizer LLM gave: proposals (None if no reply parsed), the calls it
    cost (failed attempts included), what went wrong, and whether the budget cut it short."""

    proposals: list[ProposedPrompt] | None
    usage: Usage
    problems: list[str]
    out_of_budget: bool = False


def ask(
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


def no_json_error(llm: LLMClient, asked: Asked) -> OptimizerError:
    attempts = asked.usage.calls + asked.usage.cached_calls
    return OptimizerError(
        f"the optimizer model ({llm.backend}:{llm.model}) gave no usable JSON in {attempts} "
        f"attempt{'' if attempts == 1 else 's'} ({'; '.join(asked.problems)}). Use a stronger "
        "optimizer_model in the study, or raise its max_tokens if replies are cut off."
    )


