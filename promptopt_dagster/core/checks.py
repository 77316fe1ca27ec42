"""What the asset checks verify (assets/checks.py runs them on each iteration's assets): pure
functions from values to a passed / failed outcome with a sentence and numbers to show.

- the accepted prompt's instruction has no unfilled ``{placeholder}`` and no fragment of a
  training row (the optimizer's cleaning rules, optimizer/cleaning.py);
- predictions cover every row they should, and at most MAX_ERROR_RATE of them failed;
- the champion's validation score is not below the seed's;
- the evaluation summaries count the rows that were scored and predicted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pandas as pd
from pydantic import BaseModel, Field

from promptopt_dagster.core.prompt_state import PLACEHOLDER, PromptState
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.optimizer.cleaning import clean_instruction
from promptopt_dagster.optimizer.parts import PromptParts

MAX_ERROR_RATE = 0.1  # the share of prediction rows with an LLM error a check tolerates
# A score lower than another by less than this is equal to it (float sums in other orders).
SCORE_TOLERANCE = 1e-9

MetadataScalar = str | int | float | bool | None


class CheckOutcome(BaseModel):
    """A check's verdict, the sentence that explains it and the numbers behind it."""

    passed: bool
    description: str
    metadata: dict[str, MetadataScalar | list[str]] = Field(default_factory=dict)

    @classmethod
    def from_problems(
        cls, subject: str, problems: Sequence[str], ok: str, metadata: dict[str, MetadataScalar | list[str]]
    ) -> CheckOutcome:
        """Passed when there is no problem: ``<subject>: <problems>``, or ``<subject><ok>``."""
        description = f"{subject}: " + "; ".join(problems) if problems else f"{subject}{ok}"
        return cls(passed=not problems, description=description, metadata=metadata)


# --- the accepted prompt -------------------------------------------------------------------------


def instruction_text(prompt: PromptState) -> str:
    """The system prompt without its demonstrations: the instruction and the format rule of a
    composed prompt, the whole system prompt of a seed or a hand-written one. Demonstrations are
    training rows on purpose (optimizer/parts.py composes them), so they are not checked."""
    parts = PromptParts.of(prompt)
    return "\n".join(t for t in (parts.instruction, parts.format_rule or "") if t.strip())


def prompt_hygiene(prompt: PromptState, training_rows: Sequence[Sequence[str]]) -> CheckOutcome:
    """Fails when the instruction has an unfilled `{placeholder}` (the system prompt is sent as
    written, nothing fills it) or a line that is a fragment of a training row: a training value
    alone on a line, or a line most of whose words come from one row (optimizer/cleaning.py)."""
    text = instruction_text(prompt)
    placeholders = sorted(set(PLACEHOLDER.findall(prompt.system_prompt)))
    fragments = clean_instruction(text, training_rows, input_templates=[prompt.output_prompt]).fragments
    problems = []
    if placeholders:
        problems.append(f"unfilled placeholder(s) {placeholders} in the system prompt")
    if fragments:
        problems.append(f"{len(fragments)} line(s) copied from training rows: {fragments}")
    return CheckOutcome.from_problems(
        f"prompt {prompt.id}",
        problems,
        ": no unfilled placeholder, no training-row fragment",
        {
            "prompt_id": prompt.id,
            "placeholders": placeholders,
            "training_fragments": fragments,
            "instruction_lines": len([line for line in text.splitlines() if line.strip()]),
        },
    )


# --- predictions ---------------------------------------------------------------------------------


def prediction_coverage(
    predictions: pd.DataFrame,
    expected: Mapping[str, Collection[str]],
    *,
    group_by: str | None = None,
    groups: Collection[str] = (),
    all_or_none: Collection[str] = (),
    partial_unless: Mapping[str, str] | None = None,
    max_error_rate: float = MAX_ERROR_RATE,
) -> CheckOutcome:
    """Fails when a prediction is missing or repeated, or when more than `max_error_rate` of the
    rows carry an LLM error. `expected` is {split: row ids}. With `group_by` (candidate_id) each
    of `groups` must cover them, except the splits in `all_or_none`, which a group covers entirely
    or not at all (a candidate that did not go on to validation has no val rows), and a split
    `s` of `partial_unless` {s: t}, which a group may cover in part only when it has no rows of
    split `t` (screening stopped early on the minibatch, so the candidate was not validated)."""
    rows = len(predictions)
    errors = int(predictions["error"].notna().sum()) if rows else 0
    rate = errors / rows if rows else 0.0
    if group_by:
        present = {str(k): g for k, g in predictions.groupby(group_by, sort=True)} if rows else {}
        empty = predictions.iloc[0:0]
        frames = {name: present.get(name, empty) for name in sorted({*map(str, groups), *present})}
    else:
        frames = {"": predictions}
    missing: list[str] = []
    unexpected: list[str] = []
    repeated = 0
    for name, frame in frames.items():
        label = f"{name}/" if name else ""
        for split, ids in expected.items():
            got = frame.loc[frame["split"] == split, "row_id"].astype(str)
            repeated += int(got.duplicated().sum())
            if split in all_or_none and got.empty:
                continue
            unless = (partial_unless or {}).get(split)
            partial_ok = unless is not None and not (frame["split"] == unless).any() and not got.empty
            if not partial_ok:
                missing += [f"{label}{split}/{r}" for r in sorted(set(map(str, ids)) - set(got))]
            unexpected += [f"{label}{split}/{r}" for r in sorted(set(got) - set(map(str, ids)))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} expected row(s) have no prediction (first: {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} prediction(s) for rows not expected (first: {unexpected[:5]})")
    if repeated:
        problems.append(f"{repeated} row(s) predicted more than once")
    if rate > max_error_rate:
        problems.append(f"{errors} of {rows} rows failed ({rate:.1%} > {max_error_rate:.0%})")
    what = f"{rows} predictions" + (f" of {len(frames)} {group_by}s" if group_by else "")
    return CheckOutcome.from_problems(
        what,
        problems,
        f" cover every expected row; {errors} failed ({rate:.1%}, at most {max_error_rate:.0%})",
        {
            "rows": rows,
            "missing_rows": len(missing),
            "unexpected_rows": len(unexpected),
            "repeated_rows": repeated,
            "error_rows": errors,
            "error_rate": rate,
            "max_error_rate": max_error_rate,
        },
    )


# --- scores --------------------------------------------------------------------------------------


def champion_not_below_seed(seed_val: float, champion_val: float, champion_id: str) -> CheckOutcome:
    """Fails when the champion scores lower than the seed on validation: a decision accepted a
    candidate that is worse than where the study started."""
    gap = champion_val - seed_val
    passed = gap >= -SCORE_TOLERANCE
    relation = "at or above" if passed else "below"
    return CheckOutcome(
        passed=passed,
        description=(
            f"champion {champion_id}: validation score {champion_val:.4g} is {relation} the seed's "
            f"{seed_val:.4g}"
        ),
        metadata={"seed_val_score": seed_val, "champion_val_score": champion_val, "gain": gap},
    )


def _counts_outcome(
    what: str, summary: Mapping[str, int], scored: Mapping[str, int], predicted: Mapping[str, int]
) -> CheckOutcome:
    keys = sorted(set(summary) | set(scored) | set(predicted))
    mismatched = [
        f"{k}: summary {summary.get(k, 0)}, scored rows {scored.get(k, 0)}, predictions {predicted.get(k, 0)}"
        for k in keys
        if not summary.get(k, 0) == scored.get(k, 0) == predicted.get(k, 0)
    ]
    total = sum(predicted.values())
    return CheckOutcome.from_problems(
        what,
        [f"counts disagree ({'; '.join(mismatched)})"] if mismatched else [],
        f": {len(keys)} summaries count the {total} scored and predicted rows",
        {
            "summaries": len(keys),
            "predictions": total,
            "scored_rows": sum(scored.values()),
            "summary_rows": sum(summary.values()),
            "mismatched": mismatched,
        },
    )


def _value_counts(frame: pd.DataFrame, columns: list[str]) -> dict[str, int]:
    if frame.empty:
        return {}
    return {
        "/".join(map(str, k if isinstance(k, tuple) else (k,))): int(n)
        for k, n in frame.groupby(columns).size().items()
    }


def incumbent_counts_match(metrics: EvaluationMetrics, predictions: pd.DataFrame) -> CheckOutcome:
    """Fails when a split's summary (its `n`), its scored rows and its predictions differ in number."""
    summary = {split: int(agg.get("n", 0)) for split, agg in metrics.aggregates.items()}
    scored = _value_counts(pd.DataFrame(metrics.rows, columns=["split"]), ["split"])
    return _counts_outcome("incumbent", summary, scored, _value_counts(predictions, ["split"]))


def candidate_counts_match(metrics: CandidateMetrics, predictions: pd.DataFrame) -> CheckOutcome:
    """Fails when a candidate's summary per split, its scored rows and its predictions differ in
    number, or when its score says validated and no validation summary exists (or the reverse)."""
    summary = {
        f"{cand}/{split}": int(agg.get("n", 0))
        for cand, splits in metrics.aggregates.items()
        for split, agg in splits.items()
    }
    scored = _value_counts(
        pd.DataFrame(metrics.rows, columns=["candidate_id", "split"]), ["candidate_id", "split"]
    )
    outcome = _counts_outcome(
        "candidates", summary, scored, _value_counts(predictions, ["candidate_id", "split"])
    )
    inconsistent = [
        s.candidate_id
        for s in metrics.scores
        if (s.val_score is not None) != ("val" in metrics.aggregates.get(s.candidate_id, {}))
    ]
    if inconsistent:
        outcome.passed = False
        outcome.description += f"; val_score and validation summary disagree for {inconsistent}"
    outcome.metadata["val_score_mismatch"] = inconsistent
    return outcome
