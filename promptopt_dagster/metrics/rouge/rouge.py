"""ROUGE-L F-measure (longest common subsequence) through Google's `rouge_score` package."""

from __future__ import annotations

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """ROUGE-L F-measure per row (0..1) from `rouge_score`; the aggregate `rouge` is the mean
over rows. Tokenisation lowercases and keeps only ASCII letters and digits, so it suits English text."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    use_stemmer: apply the Porter stemmer before matching (default False).
Returns:
    rouge: mean ROUGE-L F over rows; scores: one float per row.
"""


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, C.-Y. (2004). ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], use_stemmer: bool = False
    ) -> dict[str, float | list[float]]:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [
            float(scorer.score(r, p)["rougeL"].fmeasure)
            for p, r in zip(predictions, references, strict=True)
        ]
        return {"rouge": float(sum(scores) / len(scores)) if scores else 0.0, "scores": scores}
