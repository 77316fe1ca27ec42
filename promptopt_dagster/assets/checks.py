"""Asset checks: a green or red light on each iteration's predictions, evaluation summaries and
decision, in the asset's Checks tab. Each check is partitioned like its asset (study_iteration)
and runs in the iteration's run, after its asset, on that partition's value. The verdicts are
core/checks.py; these functions only load their inputs and translate. A failed check does not
fail the run: it shows red, with the reason in its description and the numbers in its metadata."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.common import StudyIteration, study_data, study_iteration
from promptopt_dagster.assets.decision import iteration_decision
from promptopt_dagster.assets.evaluation import baseline_metrics, candidate_metrics
from promptopt_dagster.assets.inference import baseline_predictions, candidate_predictions
from promptopt_dagster.assets.metadata import number
from promptopt_dagster.core import checks
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.partitions import study_iteration_partitions
from promptopt_dagster.resources import PromptStoreResource


def _result(outcome: checks.CheckOutcome) -> dg.AssetCheckResult:
    metadata: dict[str, dg.MetadataValue | str | int | bool | list[str]] = {}
    for key, value in outcome.metadata.items():
        if isinstance(value, float):
            metadata[key] = number(value)
        elif value is not None:
            metadata[key] = value
    return dg.AssetCheckResult(passed=outcome.passed, description=outcome.description, metadata=metadata)


def _study_iteration(
    context: dg.AssetCheckExecutionContext, prompt_store: PromptStoreResource
) -> StudyIteration:
    """The study and iteration of the check's partition, read as the asset reads its own."""
    return study_iteration(dg.AssetExecutionContext(context.op_execution_context), prompt_store)


def _expected_rows(rows: pd.DataFrame) -> dict[str, list[str]]:
    return {str(split): g["row_id"].astype(str).tolist() for split, g in rows.groupby("split")}


@dg.asset_check(
    asset=iteration_decision,
    partitions_def=study_iteration_partitions,
    description="The accepted prompt (the champion iteration N+1 starts from) has no unfilled "
    "{placeholder} in its system prompt and no line copied from a training row in its instruction "
    "(demonstrations excluded).",
)
def champion_prompt_is_clean(
    context: dg.AssetCheckExecutionContext,
    prompt_store: PromptStoreResource,
    iteration_decision: IterationRecord,
) -> dg.AssetCheckResult:
    study = _study_iteration(context, prompt_store).study
    train = study_data(study).splits["train"]
    rows = train[[*study.input_columns, study.reference_column]].astype(str).values.tolist()
    return _result(checks.prompt_hygiene(iteration_decision.champion, rows))


@dg.asset_check(
    asset=iteration_decision,
    partitions_def=study_iteration_partitions,
    description="The champion's validation score is at or above the seed's (iteration 0's incumbent).",
)
def champion_not_below_seed(
    context: dg.AssetCheckExecutionContext,
    prompt_store: PromptStoreResource,
    iteration_decision: IterationRecord,
) -> dg.AssetCheckResult:
    study, iteration = _study_iteration(context, prompt_store)
    earlier = prompt_store.store.records_before(study.name, iteration)
    first = min([*earlier, iteration_decision], key=lambda r: r.iteration)  # iteration 0: the seed
    return _result(
        checks.champion_not_below_seed(
            first.incumbent_val_score, iteration_decision.champion_val_score, iteration_decision.champion.id
        )
    )


@dg.asset_check(
    asset=baseline_predictions,
    partitions_def=study_iteration_partitions,
    description=f"The incumbent has one prediction for every row of the iteration's train minibatch "
    f"and of validation, and at most {checks.MAX_ERROR_RATE:.0%} of them are LLM errors.",
)
def baseline_predictions_cover_every_row(
    context: dg.AssetCheckExecutionContext,
    prompt_store: PromptStoreResource,
    baseline_predictions: pd.DataFrame,
) -> dg.AssetCheckResult:
    study, iteration = _study_iteration(context, prompt_store)
    expected = _expected_rows(study_data(study).iteration_rows(iteration))
    return _result(checks.prediction_coverage(baseline_predictions, expected))


@dg.asset_check(
    asset=candidate_predictions,
    partitions_def=study_iteration_partitions,
    additional_ins={"candidate_prompts": dg.AssetIn("candidate_prompts")},
    description=f"Every candidate has one prediction for every row of the train minibatch, and "
    f"those that went on to validation one for every validation row; at most "
    f"{checks.MAX_ERROR_RATE:.0%} of the rows are LLM errors.",
)
def candidate_predictions_cover_every_row(
    context: dg.AssetCheckExecutionContext,
    prompt_store: PromptStoreResource,
    candidate_predictions: pd.DataFrame,
    candidate_prompts: CandidateSet,
) -> dg.AssetCheckResult:
    study, iteration = _study_iteration(context, prompt_store)
    expected = _expected_rows(study_data(study).iteration_rows(iteration))
    return _result(
        checks.prediction_coverage(
            candidate_predictions,
            expected,
            group_by="candidate_id",
            groups=[c.prompt.id for c in candidate_prompts.candidates],
            all_or_none=["val"],
        )
    )


@dg.asset_check(
    asset=baseline_metrics,
    partitions_def=study_iteration_partitions,
    additional_ins={"baseline_predictions": dg.AssetIn("baseline_predictions")},
    description="Each split's summary counts as many rows as were scored and predicted.",
)
def baseline_metrics_match_rows(
    baseline_metrics: EvaluationMetrics, baseline_predictions: pd.DataFrame
) -> dg.AssetCheckResult:
    return _result(checks.incumbent_counts_match(baseline_metrics, baseline_predictions))


@dg.asset_check(
    asset=candidate_metrics,
    partitions_def=study_iteration_partitions,
    additional_ins={"candidate_predictions": dg.AssetIn("candidate_predictions")},
    description="Each candidate's summary per split counts as many rows as were scored and "
    "predicted, and a candidate has a validation score exactly when it has a validation summary.",
)
def candidate_metrics_match_rows(
    candidate_metrics: CandidateMetrics, candidate_predictions: pd.DataFrame
) -> dg.AssetCheckResult:
    return _result(checks.candidate_counts_match(candidate_metrics, candidate_predictions))


ITERATION_CHECKS = [
    baseline_predictions_cover_every_row,
    baseline_metrics_match_rows,
    candidate_predictions_cover_every_row,
    candidate_metrics_match_rows,
    champion_prompt_is_clean,
    champion_not_below_seed,
]
