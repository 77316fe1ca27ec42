"""Clean an instruction an optimizer LLM wrote before it is screened.

Small optimizer models paste parts of the cases they were shown into the instruction: a training
question, a paraphrase of it, an expected answer alone on a line ("123", "15 - 14"), or a
`{column}` placeholder that nothing fills in a system prompt. Such lines overfit one row and leak
training data into the prompt that gets shipped. Lines are dropped when most of their words come
from a single training row (by token overlap, so paraphrases are caught, not only verbatim
copies), when they hold no word of three letters or more (numbers, arithmetic, "3kg"), or when
they carry a placeholder; a line that merely names one value of a row (a country in a look-up
task) stays.
Demonstrations are composed separately (optimizer.parts) and never pass through here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from promptopt_dagster.core.prompt_state import PLACEHOLDER

_TOKEN = re.compile(r"[a-z0-9]+")
_WORD = re.compile(r"[A-Za-z]{2,}")
# A word of three or more letters standing alone (any script): "3kg", "11 kg; g" and "15 - 14"
# have none.
_REAL_WORD = re.compile(r"(?<![^\W_])[^\W\d_]{3,}(?![^\W_])")
_STOP = frozenset(
    {"a", "an", "the", "of", "to", "in", "on", "for", "and", "or", "is", "are", "be", "it"}
    | {"this", "that", "with", "as", "by", "at", "from", "your", "you"}
)


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


@dataclass
class Cleaned:
    text: str
    dropped: list[str] = field(default_factory=list)
    # the dropped lines that copy training data (a value, a row fragment, a rendered template),
    # as opposed to lines dropped for a placeholder or for having no word
    fragments: list[str] = field(default_factory=list)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"\n+|(?<=[a-z0-9]{2}[.!?])\s+(?=[A-Z])", text) if line.strip()]


def _rendering_patterns(templates: Iterable[str]) -> list[re.Pattern[str]]:
    """For each template with at least two words of its own, a pattern that matches it with any
    text in place of its placeholders. A bare `{text}` template has none: it would match anything."""
    patterns = []
    for template in templates:
        literals = PLACEHOLDER.split(template)
        if len(literals) < 2 or len(_WORD.findall(" ".join(literals))) < 2:
            continue
        body = ".+?".join(r"\s+".join(re.escape(w) for w in part.split()) for part in literals)
        patterns.append(re.compile(rf"\W*{body}\W*", re.IGNORECASE | re.DOTALL))
    return patterns


def _fragment_of(line: str, rows: Sequence[set[str]], threshold: float) -> bool:
    """Most words of the line come from one row; a short line (2-3 words) only when all of them
    do ("11 kg; g" from the row 11 kg, g, 11000)."""
    tokens = _tokens(line)
    distinct = set(tokens)
    if len(distinct) < 2:
        return False
    if len(tokens) < 4:
        return any(distinct <= row for row in rows)
    return any(len(distinct & row) / len(distinct) >= threshold for row in rows)


def clean_instruction(
    text: str,
    training_rows: Iterable[Iterable[str]],
    threshold: float = 0.5,
    input_templates: Iterable[str] = (),
) -> Cleaned:
    """`text` without stray lines: a training value alone on a line, fragments of a training row
    (inputs and outputs of one row count together), lines with no words, lines with a
    `{placeholder}`, and renderings of one of `input_templates` (the prompt's output templates)."""
    renderings = _rendering_patterns(input_templates)
    values: set[str] = set()
    token_rows: list[set[str]] = []
    for row in training_rows:
        row = [str(v) for v in row]
        values.update(" ".join(_TOKEN.findall(v.lower())) for v in row)
        tokens = set(_tokens(" ".join(row)))
        if len(tokens) >= 2:
            token_rows.append(tokens)
    kept, dropped, fragments = [], [], []
    for line in _lines(text):
        placeholder = PLACEHOLDER.search(line)
        copied = (
            " ".join(_TOKEN.findall(line.lower())) in values
            or _fragment_of(line, token_rows, threshold)
            or any(p.fullmatch(line) for p in renderings)
        )
        if copied or placeholder or not _REAL_WORD.search(line):
            dropped.append(line)
            if copied and not placeholder:
                fragments.append(line)
        else:
            kept.append(line)
    return Cleaned(text="\n".join(kept), dropped=dropped, fragments=fragments)
