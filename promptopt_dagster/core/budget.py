"""The study's LLM-call budget (study.budget_calls): what one iteration needs at least, what is
left, and how many candidates what is left can still measure."""

from __future__ import annotations

import pandas as pd

from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.optimizer.context import ProposalResult


def min_iteration_calls(minibatch_rows: int, val_rows: int) -> int:
    """The most LLM calls the smallest useful iteration can spend (no reply cached): the incumbent
    on the minibatch and validation, one candidate on the minibatch, and that candidate on
    validation. The stop rule ends a study whose budget has less left than this."""
    return 2 * (minibatch_rows + val_rows)


def budget_left(study: StudyConfig, records: list[IterationRecord], spent_now: int = 0) -> int | None:
    """LLM calls the study may still spend (None without a budget): budget_calls minus what
    earlier iterations spent minus `spent_now` in this one."""
    if study.budget_calls is None:
        return None
    return study.budget_calls - (records[-1].total_calls if records else 0) - spent_now


def live_calls(predictions: pd.DataFrame) -> int:
    """Uncached calls behind these predictions; every row when the frame cannot tell."""
    if "cached" not in predictions.columns:
        return len(predictions)
    return int((~predictions["cached"].astype(bool)).sum())


def within_budget(
    result: ProposalResult, left: int | None, screen_calls: int, val_calls: int
) -> ProposalResult:
    """Keep only the candidates the budget left can screen and validate (the first ones: the
    order the optimizer, or the ranker, put them in)."""
    if left is None:
        return result
    result.calls_left = left - result.usage.calls
    affordable = max(0, (left - result.usage.calls - val_calls) // screen_calls)
    if len(result.candidates) > affordable:
        result.warnings.append(
            f"budget: {left - result.usage.calls} LLM calls left for screening and validation; kept "
            f"{affordable} of {len(result.candidates)} candidates ({screen_calls} calls each on the "
            f"minibatch, {val_calls} to validate the best)"
        )
        result.candidates = result.candidates[:affordable]
        result.strategies = result.strategies[:affordable]
    return result
