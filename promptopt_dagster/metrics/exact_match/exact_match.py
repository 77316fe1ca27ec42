"""Exact match after optional normalisation; a local copy so no Hub access is needed."""

from __future__ import annotations

import re
import string

import datasets
import evaluate

_DESCRIPTION = """1.0 when the prediction equals the reference after the chosen normalisation, else 0.0.
Returns the mean under `exact_match` and the per-row values under `scores`."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    ignore_case: compare lowercased strings.
    ignore_punctuation: drop ASCII punctuation before comparing.
    ignore_whitespace: collapse runs of whitespace to one space and strip both ends.
    strip_quotes: remove surrounding quotes, backticks and a trailing period (common chat-model noise).
    regexes_to_ignore: list of regular expressions whose matches are removed before comparing.
Returns:
    exact_match: mean over rows (0..1); scores: one float per row.
"""

_QUOTES = "\"'`\u201c\u201d\u2018\u2019"
_SPACES = re.compile(r"\s+")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(
    text: str,
    ignore_case: bool = False,
    ignore_punctuation: bool = False,
    ignore_whitespace: bool = False,
    strip_quotes: bool = False,
    regexes_to_ignore: list[str] | None = None,
) -> str:
    """The text as compared; shared by both sides so options apply symmetrically."""
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if strip_quotes:
        text = text.strip()
        text = text.rstrip(".").strip()
        while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(_PUNCT)
    if ignore_whitespace:
        text = _SPACES.sub(" ", text).strip()
    return text


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        ignore_case: bool = False,
        ignore_punctuation: bool = False,
        ignore_whitespace: bool = False,
        strip_quotes: bool = False,
        regexes_to_ignore: list[str] | None = None,
    ) -> dict[str, float | list[float]]:
        opts = {
            "ignore_case": ignore_case,
            "ignore_punctuation": ignore_punctuation,
            "ignore_whitespace": ignore_whitespace,
            "strip_quotes": strip_quotes,
            "regexes_to_ignore": regexes_to_ignore,
        }
        scores = [
            1.0 if normalize(p, **opts) == normalize(r, **opts) else 0.0
            for p, r in zip(predictions, references, strict=True)
        ]
        return {"exact_match": float(sum(scores) / len(scores)) if scores else 0.0, "scores": scores}
