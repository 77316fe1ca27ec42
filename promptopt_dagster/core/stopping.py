"""Stop rules: target reached, patience exhausted, max iterations, budget spent."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

StopReason = Literal["target_reached", "patience", "max_iterations", "budget"]

REASON_TEXT: dict[str, str] = {
    "target_reached": "target reached",
    "patience": "no improvement for {patience} iterations, every strategy tried",
    "max_iterations": "max_iterations ({max_iterations}) reached",
    "budget": "budget of {budget_calls} LLM calls spent",
}
BUDGET_SHORT = (
    "budget of {budget_calls} LLM calls: {calls_spent} spent, {left} left, fewer than the "
    "{next_iteration_calls} the next iteration may need"
)


class StopDecision(BaseModel):
    stop: bool
    reason: StopReason | None = None
    message: str = "continue"


class StopRules(BaseModel):
    """A study's stop settings (`StopRules.model_validate(study, from_attributes=True)`)."""

    target_threshold: float
    patience: int
    max_iterations: int
    budget_calls: int | None = None


def decide_stop(
    rules: StopRules,
    *,
    best_score: float,
    iterations_done: int,
    iterations_without_improvement: int,
    calls_spent: int,
    next_iteration_calls: int = 0,
    unexplored: list[str] | None = None,
) -> StopDecision:
    """Check the rules in a fixed order, so the reason reported is the most informative one.

    The budget is a hard cap: it stops the study once the calls spent reach it, and also when
    what is left is less than `next_iteration_calls`, the most the smallest next iteration can
    spend (see core.iteration.min_iteration_calls), so no iteration can start that might
    overrun it.

    Patience ends a study only when no strategy is left `unexplored` on its champion: a study
    stuck at a low score goes on (within max_iterations and the budget) until every way of
    proposing has had its turn."""
    left = None if rules.budget_calls is None else rules.budget_calls - calls_spent
    params = {
        **rules.model_dump(),
        "calls_spent": calls_spent,
        "left": left,
        "next_iteration_calls": next_iteration_calls,
    }
    reason: StopReason | None = None
    if best_score >= rules.target_threshold:
        reason = "target_reached"
    elif iterations_without_improvement >= rules.patience and not unexplored:
        reason = "patience"
    elif iterations_done >= rules.max_iterations:
        reason = "max_iterations"
    elif left is not None and (left <= 0 or left < next_iteration_calls):
        reason = "budget"
    if reason is None:
        return StopDecision(stop=False)
    message = REASON_TEXT[reason].format(**params)
    if reason == "budget" and left is not None and left > 0:
        message = BUDGET_SHORT.format(**params)
    if reason == "target_reached":
        message = f"target reached: {best_score:.3f} >= {rules.target_threshold:.3f}"
    return StopDecision(stop=True, reason=reason, message=message)
