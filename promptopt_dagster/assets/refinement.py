"""Step 3: the optimizer proposes candidate prompts from the incumbent's failures."""

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.common import iteration_asset, study_data, study_iteration
from promptopt_dagster.assets.metadata import number, prompt_markdown
from promptopt_dagster.core.meta_model import ranking_plan
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet, propose_candidates
from promptopt_dagster.core.scoring import EvaluationMetrics
from promptopt_dagster.instance_config import LLM_POOL
from promptopt_dagster.resources import LLMResource, PromptStoreResource


@iteration_asset(kinds={"python"}, pool=LLM_POOL)
def candidate_prompts(
    context: dg.AssetExecutionContext,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    current_prompt: PromptState,
    baseline_predictions: pd.DataFrame,
    baseline_metrics: EvaluationMetrics,
) -> CandidateSet:
    """Candidates from the optimizer's strategies (optimizer/strategies): reflection by the
    optimizer LLM, the data-inferred format rule, demonstrations, answer parsing, combination of
    the best parts measured so far, and edits; untried strategies first, then the bandit's."""
    study, iteration = study_iteration(context, prompt_store)
    scored = baseline_predictions.merge(baseline_metrics.row_scores(), on=["row_id", "split"], how="left")
    # The meta-model (meta_model asset), only when its cross-validated quality cleared the bar.
    plan = ranking_plan(
        prompt_store.store.root,
        float(scored.loc[scored["split"] == "train", "score"].mean()),
        study.candidates_per_iteration,
    )
    context.log.info(plan.note)
    result = propose_candidates(
        llm.optimizer(study),
        study_data(study),
        current_prompt,
        scored,
        prompt_store.store.records_before(study.name, iteration),
        iteration,
        **plan.kwargs(),
    )
    for warning in result.warnings:
        context.log.warning(warning)
    metadata: dict[str, dg.MetadataValue | str | int] = {
        "count": len(result.candidates),
        "candidate_ids": ", ".join(c.prompt.id for c in result.candidates),
        "strategies": ", ".join(c.strategy for c in result.candidates),
        "meta_model": plan.note,
        "optimizer_calls": result.usage.calls,
        "optimizer_tokens": result.usage.tokens,
        "optimizer_cost_usd": number(result.usage.cost_usd),
    }
    metadata["strategies_tried"] = ", ".join(result.attempted)
    for cand in result.candidates:  # keyed by the ids candidate_metrics shows
        metadata[f"candidate {cand.prompt.id} ({cand.strategy})"] = prompt_markdown(
            cand.prompt.system_prompt, cand.prompt.output_prompt
        )
    context.add_output_metadata(metadata)
    return CandidateSet.of(result)
