"""Steps 2 and 5 (first half): score predictions with Hugging Face `evaluate` metrics."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.common import GROUP, study_iteration
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.scoring import (
    CandidateMetrics,
    EvaluationMetrics,
    evaluate_candidates,
    evaluate_incumbent,
    evaluator_for,
)
from promptopt_dagster.partitions import study_iteration_partitions
from promptopt_dagster.resources import PromptStoreResource


@dg.asset(partitions_def=study_iteration_partitions, group_name=GROUP, kinds={"python"})
def baseline_metrics(
    context: dg.AssetExecutionContext, prompt_store: PromptStoreResource, baseline_predictions: pd.DataFrame
) -> EvaluationMetrics:
    """Aggregates per split and per-row scores of the incumbent."""
    study = study_iteration(context, prompt_store).study
    metrics = evaluate_incumbent(evaluator_for(study), baseline_predictions, study)
    context.add_output_metadata(
        {
            f"{split}_{m}": dg.MetadataValue.float(metrics.score(split, m))
            for split in metrics.aggregates
            for m in study.all_metrics()
        }
    )
    return metrics


@dg.asset(partitions_def=study_iteration_partitions, group_name=GROUP, kinds={"python"})
def candidate_metrics(
    context: dg.AssetExecutionContext,
    prompt_store: PromptStoreResource,
    candidate_prompts: CandidateSet,
    candidate_predictions: pd.DataFrame,
) -> CandidateMetrics:
    """Each candidate's minibatch score and, for those that went on, its validation score."""
    study = study_iteration(context, prompt_store).study
    metrics = evaluate_candidates(
        evaluator_for(study), candidate_predictions, candidate_prompts.candidates, study
    )
    table = pd.DataFrame([s.model_dump() for s in metrics.scores])
    context.add_output_metadata({"scores": dg.MetadataValue.md(table.to_markdown(index=False))})
    return metrics
