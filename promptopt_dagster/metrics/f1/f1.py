"""Token-level F1 as in SQuAD: partial credit when the answer overlaps the reference."""

from __future__ import annotations

import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = """Harmonic mean of token precision and recall between prediction and reference, after
SQuAD normalisation (lowercase, no punctuation, no English articles, single spaces).
Returns the mean under `f1` and the per-row values under `scores`."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    normalize: apply SQuAD normalisation before tokenising on whitespace (default True).
Returns:
    f1: mean over rows (0..1); scores: one float per row.
"""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD v1.1 evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str, normalize: bool = True) -> float:
    pred = (squad_normalize(prediction) if normalize else prediction).split()
    ref = (squad_normalize(reference) if normalize else reference).split()
    if not pred or not ref:
        # Both empty is a perfect answer; only one empty shares nothing.
        return float(pred == ref)
    common = collections.Counter(pred) & collections.Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred)
    recall = same / len(ref)
    return float(2 * precision * recall / (precision + recall))


class F1(evaluate.Metric):
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
        self, predictions: list[str], references: list[str], normalize: bool = True
    ) -> dict[str, float | list[float]]:
        scores = [token_f1(p, r, normalize) for p, r in zip(predictions, references, strict=True)]
        return {"f1": float(sum(scores) / len(scores)) if scores else 0.0, "scores": scores}
