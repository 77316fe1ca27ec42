"""Label accuracy for string labels (the Hub's `accuracy` wants integer class ids)."""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """1.0 when the predicted label equals the reference label after stripping surrounding
whitespace, else 0.0. Returns the mean under `accuracy` and the per-row values under `scores`."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    ignore_case: compare lowercased labels (default False).
Returns:
    accuracy: mean over rows (0..1); scores: one float per row.
"""


class Accuracy(evaluate.Metric):
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
        self, predictions: list[str], references: list[str], ignore_case: bool = False
    ) -> dict[str, float | list[float]]:
        def label(text: str) -> str:
            text = text.strip()
            return text.lower() if ignore_case else text

        scores = [float(label(p) == label(r)) for p, r in zip(predictions, references, strict=True)]
        return {"accuracy": float(sum(scores) / len(scores)) if scores else 0.0, "scores": scores}
