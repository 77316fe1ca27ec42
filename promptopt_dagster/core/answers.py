"""How a prompt's reply becomes its answer. A prompt may ask the model to frame its answer
(`Answer: ...`) or may only be read up to its first line; the parser is part of the prompt
(PromptState.answer_parser), travels with it into the Prompt Registry, and production callers
apply the same `parse_answer` to what their model returns."""

from __future__ import annotations

import re
from typing import Literal

AnswerParser = Literal["raw", "first_line", "answer_field"]
ANSWER_PARSERS: tuple[str, ...] = ("raw", "first_line", "answer_field")
ANSWER_FIELD = "Answer:"
FRAMING_LINE = f"End your reply with one line of the form `{ANSWER_FIELD} <answer>`."

_WRAPPERS = "\"'`*"
_FIELD = re.compile(r"^\W*answer\W*:\s*(.*)$", re.IGNORECASE)


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip().strip(_WRAPPERS).strip()
    return ""


def parse_answer(text: str, parser: str = "raw") -> str:
    """The answer in a model's reply: `raw` the whole reply (stripped), `first_line` its first
    non-empty line, `answer_field` what follows the last `Answer:` (its first line when the reply
    has none)."""
    if parser == "raw":
        return text.strip()
    if parser == "first_line":
        return _first_line(text)
    if parser == "answer_field":
        found = [m.group(1) for line in text.splitlines() if (m := _FIELD.match(line.strip()))]
        return found[-1].strip().strip(_WRAPPERS).strip() if found else _first_line(text)
    raise ValueError(f"unknown answer parser {parser!r}; use one of {ANSWER_PARSERS}")
