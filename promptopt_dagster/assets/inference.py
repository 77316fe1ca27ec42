"""Steps 1 and 4: the primary LLM runs the incumbent, then the candidates."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.checks import (
    BASELINE_PREDICTIONS_CHECKS,
    CANDIDATE_PREDICTIONS_CHECKS,
    baseline_predictions_checks,
    candidate_predictions_checks,
)
from promptopt_dagster.assets.common import iteration_asset, study_data, study_iteration
from promptopt_dagster.assets.metadata import markdown_table, usage_metadata
from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.iteration import screen_and_confirm
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.scoring import EvaluationMetrics, evaluator_for
from promptopt_dagster.instance_config import LLM_POOL
from promptopt_dagster.resources import LLMResource, PromptStoreResource


@iteration_asset(
    kinds={"pandas"}, check_specs=BASELINE_PREDICTIONS_CHECKS, dagster_type=pd.DataFrame, pool=LLM_POOL
)
def baseline_predictions(
    context: dg.AssetExecutionContext,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    current_prompt: PromptState,
) -> dg.MaterializeResult:
    """The incumbent's predictions on this iteration's train minibatch and on validation."""
    study, iteration = study_iteration(context, prompt_store)
    data = study_data(study)
    rows = data.iteration_rows(iteration)
    context.log.info(f"primary inference: {len(rows)} rows")
    preds = run_prompt(
        llm.primary(study),
        current_prompt,
        rows,
        study.primary_model,
        study,
    )
    for line in data.warnings:
        context.log.warning(line)
    metadata = {
        "rows": len(preds),
        "split_sizes": ", ".join(f"{name} {len(df)}" for name, df in data.splits.items()),
        "data_warnings": "; ".join(data.warnings) or "none",
        "preview": dg.MetadataValue.md(markdown_table(preds.head(8))),
    } | usage_metadata(usage_of(preds).as_dict())
    return dg.MaterializeResult(
        value=preds, metadata=metadata, check_results=baseline_predictions_checks(rows, preds)
    )


@iteration_asset(
    kinds={"pandas"}, check_specs=CANDIDATE_PREDICTIONS_CHECKS, dagster_type=pd.DataFrame, pool=LLM_POOL
)
def candidate_predictions(
    context: dg.AssetExecutionContext,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    candidate_prompts: CandidateSet,
    baseline_metrics: EvaluationMetrics,
) -> dg.MaterializeResult:
    """Every candidate on the train minibatch, each stopped once it can neither match the
    incumbent there nor enter the best few; the best few that match it go on to validation."""
    study, iteration = study_iteration(context, prompt_store)
    data = study_data(study)
    preds = screen_and_confirm(
        llm.primary(study),
        evaluator_for(study),
        data,
        candidate_prompts.candidates,
        incumbent_train_score=baseline_metrics.score("train", study.target_metric),
        iteration=iteration,
        progress=context.log.info,
        calls_left=candidate_prompts.calls_left,
    )
    metadata = {
        "rows": len(preds),
        "candidates_validated": int(preds.loc[preds["split"] == "val", "candidate_id"].nunique()),
    } | usage_metadata(usage_of(preds).as_dict())
    return dg.MaterializeResult(
        value=preds,
        metadata=metadata,
        check_results=candidate_predictions_checks(data, iteration, preds, candidate_prompts),
    )
