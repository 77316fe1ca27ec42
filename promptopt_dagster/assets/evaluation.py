"""Steps 2 and 5 (first half): score predictions with Hugging Face `evaluate` metrics."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.checks import (
    BASELINE_METRICS_CHECKS,
    CANDIDATE_METRICS_CHECKS,
    baseline_metrics_checks,
    candidate_metrics_checks,
)
from promptopt_dagster.assets.common import iteration_asset, study_iteration
from promptopt_dagster.assets.metadata import number, table_value
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.scoring import (
    CandidateMetrics,
    EvaluationMetrics,
    evaluate_candidates,
    evaluate_incumbent,
    evaluator_for,
)
from promptopt_dagster.resources import PromptStoreResource


@iteration_asset(kinds={"python"}, check_specs=BASELINE_METRICS_CHECKS, dagster_type=EvaluationMetrics)
def baseline_metrics(
    context: dg.AssetExecutionContext, prompt_store: PromptStoreResource, baseline_predictions: pd.DataFrame
) -> dg.MaterializeResult:
    """Aggregates per split and per-row scores of the incumbent."""
    study = study_iteration(context, prompt_store).study
    metrics = evaluate_incumbent(evaluator_for(study), baseline_predictions, study)
    metadata = {
        f"{split}_{m}": number(metrics.score(split, m))
        for split in metrics.aggregates
        for m in study.all_metrics()
    }
    return dg.MaterializeResult(
        value=metrics, metadata=metadata, check_results=baseline_metrics_checks(metrics, baseline_predictions)
    )


# The `scores` table of candidate_metrics; a blank cell is a value the candidate does not have.
SCORE_COLUMNS = [
    dg.TableColumn("candidate_id", "string", description="the prompt id, as in candidate_prompts"),
    dg.TableColumn("strategy", "string", description="the optimizer strategy that proposed it"),
    dg.TableColumn("train_score", "float", description="target metric on the train minibatch"),
    dg.TableColumn(
        "screened_rows",
        "int",
        description="minibatch rows train_score is over; fewer than the minibatch when screening "
        "stopped early because the candidate could no longer match the incumbent or enter the best "
        "two screened",
    ),
    dg.TableColumn(
        "val_score",
        "float",
        description="target metric on validation; blank: not validated (screening on the minibatch "
        "did not put it among the best that match the incumbent, or the budget left none)",
    ),
    dg.TableColumn(
        "predicted_score",
        "float",
        description="the meta-model's prediction; blank unless the meta-model ranked the candidates "
        "(its cross-validated quality cleared the bar)",
    ),
    dg.TableColumn("prompt_chars", "int", description="length of system and output prompt"),
]


@iteration_asset(kinds={"python"}, check_specs=CANDIDATE_METRICS_CHECKS, dagster_type=CandidateMetrics)
def candidate_metrics(
    context: dg.AssetExecutionContext,
    prompt_store: PromptStoreResource,
    candidate_prompts: CandidateSet,
    candidate_predictions: pd.DataFrame,
) -> dg.MaterializeResult:
    """Each candidate's minibatch score and, for those that went on, its validation score."""
    study = study_iteration(context, prompt_store).study
    metrics = evaluate_candidates(
        evaluator_for(study), candidate_predictions, candidate_prompts.candidates, study
    )
    metadata = {
        "scores": dg.MetadataValue.table(
            records=[
                dg.TableRecord({c.name: table_value(getattr(s, c.name)) for c in SCORE_COLUMNS})
                for s in metrics.scores
            ],
            schema=dg.TableSchema(columns=SCORE_COLUMNS),
        ),
        "candidates": len(metrics.scores),
        "validated": sum(s.val_score is not None for s in metrics.scores),
    }
    return dg.MaterializeResult(
        value=metrics,
        metadata=metadata,
        check_results=candidate_metrics_checks(metrics, candidate_predictions),
    )
