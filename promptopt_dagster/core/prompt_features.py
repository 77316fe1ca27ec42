"""Numeric cues of a prompt's text that the meta-model learns from: lengths, format and
constraint words, examples, label-like tokens, placeholders, and the parent prompt's score."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from promptopt_dagster.core.prompt_state import PLACEHOLDER

# Cue name -> pattern (case-insensitive). Counted, not just flagged: "only ... only" is a stronger rule.
CUES: dict[str, str] = {
    "only": r"\bonly\b",
    "exactly": r"\bexactly\b",
    "one_of": r"\bone of\b",
    "reply": r"\b(?:reply|respond|answer)\b",
    "json": r"\bjson\b",
    "format": r"\bformat\b",
    "must": r"\b(?:must|always|never)\b",
    "negation": r"\b(?:do not|don't|no)\b",
    "nothing_else": r"\bnothing else\b|\bno (?:explanation|other text)\b",
    "single": r"\b(?:single|one word|one line)\b",
    "number": r"\b(?:number|digits?|integer)\b",
    "step_by_step": r"\bstep[- ]by[- ]step\b|\bthink\b|\breason",
    "example": r"\bexamples?\b",
    "input_output": r"^\s*(?:input|output|q|a)\s*:",
}
_COMPILED = {name: re.compile(p, re.IGNORECASE | re.MULTILINE) for name, p in CUES.items()}
_LABEL_TOKEN = re.compile(r"\b[A-Z][A-Z0-9_]{1,}\b|\"[^\"\n]{1,30}\"|'[^'\n]{1,30}'")


def prompt_features(
    system_prompt: str, output_prompt: str, study_features: Mapping[str, Any] | None = None
) -> dict[str, float]:
    """Numeric cues of one prompt. `study_features` may carry ``parent_score`` and any numeric
    facts about the study (prefixed ``study_`` in the result), e.g. number of labels."""
    text = f"{system_prompt}\n{output_prompt}"
    words = text.split()
    feats: dict[str, float] = {
        "system_chars": float(len(system_prompt)),
        "output_chars": float(len(output_prompt)),
        "log_chars": math.log1p(len(text)),
        "words": float(len(words)),
        "lines": float(len([ln for ln in text.splitlines() if ln.strip()])),
        "has_system": float(bool(system_prompt.strip())),
        "placeholders": float(len(set(PLACEHOLDER.findall(output_prompt)))),
        "label_tokens": float(len(set(_LABEL_TOKEN.findall(text)))),
        "examples": float(bool(_COMPILED["example"].search(text) or _COMPILED["input_output"].search(text))),
    }
    for name, pattern in _COMPILED.items():
        feats[f"cue_{name}"] = float(len(pattern.findall(text)))
    study_features = dict(study_features or {})
    parent = study_features.pop("parent_score", None)
    known = parent is not None and not (isinstance(parent, float) and math.isnan(parent))
    feats["has_parent_score"] = float(known)
    feats["parent_score"] = float(parent) if known else 0.0
    for key, value in study_features.items():
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("score", "study"):
            feats[f"study_{key}"] = float(value)
    return feats
