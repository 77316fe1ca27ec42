"""Which candidates earn validation calls, which one wins, and which failures the optimizer LLM
is shown. The test split is never seen here."""

from __future__ import annotations

import pandas as pd

from promptopt_dagster.core.records import CandidateScore
from promptopt_dagster.optimizer.context import Failure

EPS = 1e-9


def rank_for_confirmation(scores: list[CandidateScore]) -> list[CandidateScore]:
    """Best minibatch score first; on ties the shorter prompt."""
    return sorted(scores, key=lambda s: (-s.train_score, s.prompt_chars))


def choose_for_validation(
    scores: list[CandidateScore], incumbent_train: float, top: int
) -> list[CandidateScore]:
    """The best `top` candidates that match or beat the incumbent on the minibatch: a 10-row
    minibatch is noisy, so more than one goes on to validation when the budget allows. Among
    candidates tied on the minibatch, one of a strategy not yet chosen goes first: two draws of
    one idea teach validation less than two ideas."""
    ranked = [s for s in rank_for_confirmation(scores) if s.train_score >= incumbent_train - EPS]
    chosen: list[CandidateScore] = []
    while ranked and len(chosen) < top:
        tied = [s for s in ranked if s.train_score >= ranked[0].train_score - EPS]
        fresh = [s for s in tied if s.strategy not in {c.strategy for c in chosen}]
        chosen.append((fresh or tied)[0])
        ranked.remove(chosen[-1])
    return chosen


def pick_winner(
    scores: list[CandidateScore], incumbent_val: float, incumbent_chars: int | None = None
) -> CandidateScore | None:
    """The validated candidate with the best validation score (then minibatch score, then the
    shorter), if it beats the incumbent on validation, or ties a non-zero incumbent with a
    shorter prompt (the shorter, cleaner prompt wins a tie)."""
    validated = [s for s in scores if s.val_score is not None]
    if not validated:
        return None
    best = sorted(validated, key=lambda s: (-(s.val_score or 0.0), -s.train_score, s.prompt_chars))[0]
    val = best.val_score or 0.0
    if val > incumbent_val + EPS:
        return best
    tie = abs(val - incumbent_val) <= EPS and incumbent_val > 0
    if tie and incumbent_chars is not None and best.prompt_chars < incumbent_chars:
        return best
    return None


def collect_failures(
    rows: pd.DataFrame, input_columns: list[str], reference: str, limit: int = 4
) -> list[Failure]:
    """Rows the prompt got wrong (score below 1), worst first; `rows` has prediction and score."""
    wrong = rows[rows["score"] < 1.0].sort_values("score", kind="stable").head(limit)
    return [
        Failure(inputs={c: r[c] for c in input_columns}, expected=str(r[reference]), got=str(r["prediction"]))
        for _, r in wrong.iterrows()
    ]
