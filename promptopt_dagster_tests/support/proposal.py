"""The proposal context the optimizer and strategy tests start from: a text -> label task."""

from __future__ import annotations

from typing import Any

from promptopt_dagster.optimizer.context import ProposalContext


def label_task_context(**fields: Any) -> ProposalContext:
    """Iteration 0 (seed 0) of a task that maps `text` to `label`, scored by exact_match, whose
    minibatch is rows r0 and r1; `fields` give the rest (incumbent, train, failures, ...) and may
    override any of these."""
    task: dict[str, Any] = {
        "metric": "exact_match",
        "minibatch_ids": {"r0", "r1"},
        "input_columns": ["text"],
        "reference_column": "label",
        "iteration": 0,
        "seed": 0,
    }
    return ProposalContext(**(task | fields))
