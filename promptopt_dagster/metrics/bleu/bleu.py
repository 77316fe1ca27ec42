"""BLEU through `sacrebleu`, scaled to 0..1 so it sits on the same axis as the other metrics."""

from __future__ import annotations

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = """Per row: sentence BLEU (effective order, exponential smoothing) / 100. Aggregate `bleu`:
corpus BLEU over all rows / 100, which is not the mean of the per-row values (BLEU pools n-gram
counts over the corpus)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of strings.
    references: list of strings, one per prediction.
    lowercase: compare lowercased text (default False).
    tokenize: sacrebleu tokenizer name (default "13a").
Returns:
    bleu: corpus BLEU / 100; scores: one float per row (sentence BLEU / 100).
"""


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, M. (2018). A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions: list[str], references: list[str], lowercase: bool = False, tokenize: str = "13a"
    ) -> dict[str, float | list[float]]:
        sentence = BLEU(lowercase=lowercase, tokenize=tokenize, effective_order=True)
        scores = [
            float(sentence.sentence_score(p, [r]).score) / 100.0
            for p, r in zip(predictions, references, strict=True)
        ]
        corpus = BLEU(lowercase=lowercase, tokenize=tokenize)
        total = 0.0
        if scores:
            total = float(corpus.corpus_score(list(predictions), [list(references)]).score) / 100.0
        return {"bleu": total, "scores": scores}
