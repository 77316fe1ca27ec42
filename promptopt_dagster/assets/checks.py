"""Asset checks: a green or red light on each iteration's predictions, evaluation summaries and
decision, in the asset's Checks tab. Each check is declared on its asset (`check_specs`) and
evaluated inside the asset's own step on the value it has just computed: no extra step, and no
reload of inputs from storage. Each is partitioned like its asset (study_iteration). The verdicts
are core/checks.py; these functions translate them. A failed check does not fail the run: it shows
red, with the reason in its description and the numbers in its metadata."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.metadata import number
from promptopt_dagster.core import checks
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.partitions import study_iteration_partitions


def _spec(asset: str, name: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        name, asset=asset, description=description, partitions_def=study_iteration_partitions
    )


BASELINE_PREDICTIONS_CHECKS = [
    _spec(
        "baseline_predictions",
        "baseline_predictions_cover_every_row",
        f"The incumbent has one prediction for every row of the iteration's train minibatch and of "
        f"validation, and at most {checks.MAX_ERROR_RATE:.0%} of them are LLM errors.",
    )
]
CANDIDATE_PREDICTIONS_CHECKS = [
    _spec(
        "candidate_predictions",
        "candidate_predictions_cover_every_row",
        f"Every candidate has one prediction for every row of the train minibatch, and those that "
        f"went on to validation one for every validation row; at most {checks.MAX_ERROR_RATE:.0%} "
        f"of the rows are LLM errors.",
    )
]
BASELINE_METRICS_CHECKS = [
    _spec(
        "baseline_metrics",
        "baseline_metrics_match_rows",
        "Each split's summary counts as many rows as were scored and predicted.",
    )
]
CANDIDATE_METRICS_CHECKS = [
    _spec(
        "candidate_metrics",
        "candidate_metrics_match_rows",
        "Each candidate's summary per split counts as many rows as were scored and predicted, and a "
        "candidate has a validation score exactly when it has a validation summary.",
    )
]
DECISION_CHECKS = [
    _spec(
        "iteration_decision",
        "champion_prompt_is_clean",
        "The accepted prompt (the champion iteration N+1 starts from) has no unfilled {placeholder} "
        "in its system prompt and no line copied from a training row in its instruction "
        "(demonstrations excluded).",
    ),
    _spec(
        "iteration_decision",
        "champion_not_below_seed",
        "The champion's validation score is at or above the seed's (iteration 0's incumbent).",
    ),
]
ITERATION_CHECK_SPECS = [
    *BASELINE_PREDICTIONS_CHECKS,
    *BASELINE_METRICS_CHECKS,
    *CANDIDATE_PREDICTIONS_CHECKS,
    *CANDIDATE_METRICS_CHECKS,
    *DECISION_CHECKS,
]


def _result(name: str, outcome: checks.CheckOutcome) -> dg.AssetCheckResult:
    metadata: dict[str, dg.MetadataValue | str | int | bool | list[str]] = {}
    for key, value in outcome.metadata.items():
        if isinstance(value, float):
            metadata[key] = number(value)
        elif value is not None:
            metadata[key] = value
    return dg.AssetCheckResult(
        check_name=name, passed=outcome.passed, description=outcome.description, metadata=metadata
    )


def _expected_rows(rows: pd.DataFrame) -> dict[str, list[str]]:
    return {str(split): g["row_id"].astype(str).tolist() for split, g in rows.groupby("split")}


def baseline_predictions_checks(rows: pd.DataFrame, predictions: pd.DataFrame) -> list[dg.AssetCheckResult]:
    """`rows`: the iteration's rows (`StudyData.iteration_rows`) the incumbent was run on."""
    outcome = checks.prediction_coverage(predictions, _expected_rows(rows))
    return [_result("baseline_predictions_cover_every_row", outcome)]


def candidate_predictions_checks(
    data: StudyData, iteration: int, predictions: pd.DataFrame, candidates: CandidateSet
) -> list[dg.AssetCheckResult]:
    outcome = checks.prediction_coverage(
        predictions,
        _expected_rows(data.iteration_rows(iteration)),
        group_by="candidate_id",
        groups=[c.prompt.id for c in candidates.candidates],
        all_or_none=["val"],
        partial_unless={"train": "val"},
    )
    return [_result("candidate_predictions_cover_every_row", outcome)]


def baseline_metrics_checks(
    metrics: EvaluationMetrics, predictions: pd.DataFrame
) -> list[dg.AssetCheckResult]:
    return [_result("baseline_metrics_match_rows", checks.incumbent_counts_match(metrics, predictions))]


def candidate_metrics_checks(
    metrics: CandidateMetrics, predictions: pd.DataFrame
) -> list[dg.AssetCheckResult]:
    return [_result("candidate_metrics_match_rows", checks.candidate_counts_match(metrics, predictions))]


def decision_checks(
    study: StudyConfig, data: StudyData, earlier: list[IterationRecord], record: IterationRecord
) -> list[dg.AssetCheckResult]:
    """`earlier`: the study's records before this iteration."""
    train = data.splits["train"]
    rows = train[[*study.input_columns, study.reference_column]].astype(str).values.tolist()
    first = min([*earlier, record], key=lambda r: r.iteration)  # iteration 0: the seed
    return [
        _result("champion_prompt_is_clean", checks.prompt_hygiene(record.champion, rows)),
        _result(
            "champion_not_below_seed",
            checks.champion_not_below_seed(
                first.incumbent_val_score, record.champion_val_score, record.champion.id
            ),
        ),
    ]
