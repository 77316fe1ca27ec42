"""Steps 2 and 5 (first half): score predictions with Hugging Face `evaluate` metrics."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.common import GROUP, scope_of
from promptopt_dagster.core.records import Candidate
from promptopt_dagster.core.scoring import candidate_scores, evaluator_for, score_predictions
from promptopt_dagster.partitions import study_iteration_partitions
from promptopt_dagster.resources import PromptStoreResource


@dg.asset(partitions_def=study_iteration_partitions, group_name=GROUP, kinds={"python"})
def baseline_metrics(
    context: dg.AssetExecutionContext, prompt_store: PromptStoreResource, baseline_predictions: pd.DataFrame
) -> dict:
    """Aggregates per split and per-row scores of the incumbent."""
    scope = scope_of(context, prompt_store)
    study = scope.study
    scored, aggregates = score_predictions(
        evaluator_for(study), baseline_predictions, study.target_metric, ["split"]
    )
    metric_cols = study.all_metrics()
    context.add_output_metadata(
        {f"{split}_{m}": dg.MetadataValue.float(v[m]) for split, v in aggregates.items() for m in metric_cols}
    )
    return {
        "aggregates": aggregates,
        "rows": scored[["row_id", "split", "score", *metric_cols]].to_dict(orient="records"),
    }


@dg.asset(partitions_def=study_iteration_partitions, group_name=GROUP, kinds={"python"})
def candidate_metrics(
    context: dg.AssetExecutionContext,
    prompt_store: PromptStoreResource,
    candidate_prompts: dict,
    candidate_predictions: pd.DataFrame,
) -> dict:
    """Each candidate's minibatch score and, for those that went on, its validation score."""
    scope = scope_of(context, prompt_store)
    study = scope.study
    scored, aggregates = score_predictions(
        evaluator_for(study), candidate_predictions, study.target_metric, ["candidate_id", "split"]
    )
    candidates = [Candidate.model_validate(c) for c in candidate_prompts["candidates"]]
    scores = candidate_scores(candidates, aggregates, study.target_metric)
    table = pd.DataFrame([s.model_dump() for s in scores])
    context.add_output_metadata({"scores": dg.MetadataValue.md(table.to_markdown(index=False))})
    return {
        "aggregates": aggregates,
        "scores": [s.model_dump() for s in scores],
        "rows": scored[["candidate_id", "row_id", "split", "score"]].to_dict(orient="records"),
    }
