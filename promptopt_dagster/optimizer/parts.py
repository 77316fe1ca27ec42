"""A candidate prompt as parts: an instruction, an output-format rule, a set of demonstrations
and an answer parser, composed into the system prompt by one function.

Strategies change one part at a time (or combine the best parts seen so far), so a prompt's text
is always instruction + format rule + demonstrations in that order, nothing an optimizer LLM
writes can slip into the demonstrations, and the best instruction can be joined with the best
demonstration set (the joint search MIPROv2 runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import pandas as pd

from promptopt_dagster.core.answers import ANSWER_FIELD, FRAMING_LINE
from promptopt_dagster.core.prompt_state import PromptState

DEMO_HEADER = "Examples:"


@dataclass(frozen=True)
class PromptParts:
    instruction: str
    output_prompt: str
    format_rule: str | None = None
    demo_ids: tuple[str, ...] = ()
    answer_parser: str = "raw"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"demo_ids": list(self.demo_ids)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PromptParts:
        return cls(**{**raw, "demo_ids": tuple(raw.get("demo_ids", ()))})

    @classmethod
    def of(cls, prompt: PromptState) -> PromptParts:
        """The parts a prompt was composed from, or (a seed, a hand-written prompt) the whole
        system prompt as its instruction."""
        raw = prompt.metadata.get("parts")
        if isinstance(raw, dict):
            return cls.from_dict(raw)
        return cls(
            instruction=prompt.system_prompt.strip(),
            output_prompt=prompt.output_prompt,
            answer_parser=prompt.answer_parser,
        )

    def with_(self, **changes: Any) -> PromptParts:
        return replace(self, **changes)


def format_demonstrations(
    rows: pd.DataFrame, input_columns: Sequence[str], reference: str, answer_parser: str
) -> str:
    """Input/output pairs as the model should answer them (framed the same way as its answer)."""
    blocks = []
    for _, row in rows.iterrows():
        if len(input_columns) == 1:
            shown = f"Input: {row[input_columns[0]]}"
        else:
            shown = "\n".join(f"{c}: {row[c]}" for c in input_columns)
        answer = str(row[reference])
        if answer_parser == "answer_field":
            answer = f"{ANSWER_FIELD} {answer}"
        blocks.append(f"{shown}\nOutput: {answer}")
    return f"{DEMO_HEADER}\n" + "\n\n".join(blocks) if blocks else ""


def rows_by_id(train: pd.DataFrame, ids: Sequence[str]) -> pd.DataFrame:
    """The rows of `train` with these `row_id`s, in the order of `ids` (ids not in it skipped)."""
    by_id = train.set_index("row_id")
    return by_id.loc[[i for i in ids if i in by_id.index]].reset_index()


def compose(
    parts: PromptParts, train: pd.DataFrame, input_columns: Sequence[str], reference: str
) -> tuple[str, str]:
    """(system prompt, output prompt) of `parts`; demonstrations are looked up in `train`."""
    blocks = [parts.instruction.strip()]
    if parts.format_rule:
        blocks.append(parts.format_rule)
    if parts.answer_parser == "answer_field":
        blocks.append(FRAMING_LINE)
    system = "\n".join(b for b in blocks if b)
    if parts.demo_ids:
        demos = rows_by_id(train, parts.demo_ids)
        system = f"{system}\n\n{format_demonstrations(demos, input_columns, reference, parts.answer_parser)}"
    return system.strip(), parts.output_prompt


# ---------------------------------------------------------------------------------------------
# The output format, inferred from the references (no LLM).


# A label code: one token such as `billing`, `card_lost`, `A-2`; no spaces, not a number.
LABEL_CODE = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[_.-][A-Za-z0-9]+)*")


def is_label_set(distinct: Sequence[str], n_refs: int, max_labels: int = 12, max_codes: int = 40) -> bool:
    """Whether references drawn from `distinct` values look like a closed set of labels: a few
    labels that each recur, or up to `max_codes` code-shaped labels of which some recur (a study
    with many codes sees most of them only once or twice in its train split)."""
    if len(distinct) <= max_labels and len(distinct) * 2 <= n_refs:
        return True
    codes = all(LABEL_CODE.fullmatch(label) and len(label) <= 40 for label in distinct)
    return codes and len(distinct) <= max_codes and len(distinct) <= 0.8 * n_refs


def infer_format_rule(references: Sequence[str], max_labels: int = 12) -> str | None:
    """An explicit output-format instruction that fits every reference, or None."""
    refs = [str(r).strip() for r in references if str(r).strip()]
    if not refs:
        return None
    distinct = sorted(set(refs))
    if is_label_set(distinct, len(refs), max_labels):
        labels = ", ".join(distinct)
        return f"Answer with exactly one of: {labels}. Reply with that label only, no other words."
    if all(re.fullmatch(r"-?\d+(\.\d+)?", r) for r in refs):
        return "Reply with only the final number, digits only, no words or units."
    if all(r.startswith("{") and r.endswith("}") for r in refs):
        return "Reply with only the JSON object, on one line, with the same keys as the examples."
    words = sorted(len(r.split()) for r in refs)
    longest = words[int(0.9 * (len(words) - 1))]
    if longest <= 8:
        length = "a single word" if longest == 1 else f"at most {longest} words"
        rule = f"Reply with only the answer, {length}, no explanation."
        if all(r == r.lower() for r in refs):
            rule += " Use lowercase."
        elif all(r == r.upper() for r in refs):
            rule += " Use uppercase."
        return rule
    return None


# ---------------------------------------------------------------------------------------------
# Demonstrations.


def choose_demonstrations(
    train: pd.DataFrame, exclude: set[str], reference: str, k: int, seed: int
) -> tuple[str, ...]:
    """Up to k train rows outside the screening minibatch: one per label first (most frequent
    labels first, so the common cases are shown), then the rest, in a seeded order."""
    pool = train[~train["row_id"].isin(exclude)]
    if pool.empty or k <= 0:
        return ()
    pool = pool.sample(frac=1.0, random_state=seed)
    counts = pool[reference].astype(str).value_counts()
    if len(counts) <= max(k, 1) * 2:
        order = {label: i for i, label in enumerate(counts.index)}
        firsts = pool.drop_duplicates(subset=[reference])
        firsts = firsts.assign(_o=firsts[reference].astype(str).map(order)).sort_values("_o", kind="stable")
        chosen = pd.concat([firsts.drop(columns="_o"), pool.drop(firsts.index)])
    else:
        chosen = pool
    return tuple(str(r) for r in chosen["row_id"].head(k))
