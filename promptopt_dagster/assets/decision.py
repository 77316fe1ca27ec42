"""Step 5 (second half): accept or reject, and apply the stop rules. The continuation sensor
reads this asset's metadata. The iteration that stops a study logs "study X stopped: reason"
once, in its run; the study report repeats it in its `summary`."""

import time

import dagster as dg
import pandas as pd

from promptopt_dagster.assets.checks import DECISION_CHECKS, decision_checks
from promptopt_dagster.assets.common import iteration_asset, study_data, study_iteration
from promptopt_dagster.assets.metadata import number, prompt_markdown
from promptopt_dagster.core.inference import usage_of
from promptopt_dagster.core.iteration import decide
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.report import stop_summary
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster.study_runs import REGISTRATION


@iteration_asset(kinds={"python"}, check_specs=DECISION_CHECKS, dagster_type=IterationRecord)
def iteration_decision(
    context: dg.AssetExecutionContext,
    prompt_store: PromptStoreResource,
    current_prompt: PromptState,
    baseline_predictions: pd.DataFrame,
    baseline_metrics: EvaluationMetrics,
    candidate_prompts: CandidateSet,
    candidate_predictions: pd.DataFrame,
    candidate_metrics: CandidateMetrics,
) -> dg.MaterializeResult:
    """The iteration's record; its champion is saved in the prompt store for iteration N+1."""
    study, iteration = study_iteration(context, prompt_store)
    store = prompt_store.store
    usage = (
        usage_of(baseline_predictions) + usage_of(candidate_predictions) + candidate_prompts.optimizer_usage()
    )
    previous = store.records_before(study.name, iteration)
    record = decide(
        study,
        iteration,
        current_prompt,
        baseline_metrics.aggregates,
        candidate_prompts.candidates,
        candidate_metrics.scores,
        previous,
        usage,
        warnings=candidate_prompts.warnings,
        attempted=candidate_prompts.attempted,
    )
    stats = context.instance.get_run_stats(context.run_id)
    started = stats.start_time or stats.launch_time  # launch_time: a run that logged no start event
    if started is not None:
        record = record.model_copy(update={"wall_seconds": time.time() - started})
    for cand in candidate_prompts.candidates:  # every text, for the meta-model's history
        store.save_prompt(study.name, cand.prompt)
    store.save_record(record)
    context.log.info(
        f"{study.name} iteration {iteration}: "
        f"{'accepted ' + str(record.accepted_id) if record.accepted else 'rejected all candidates'}; "
        f"val {record.champion_val_score:.4g} (best {record.best_val_score:.4g}); {record.stop_message}"
    )
    if record.stop:
        context.log.info(stop_summary(record))
    metadata = {
        "accepted": record.accepted,
        "stop": record.stop,
        "stop_reason": record.stop_reason or "",
        "stop_message": record.stop_message,
        "val_score": number(record.champion_val_score),
        "incumbent_val_score": number(record.incumbent_val_score),
        "best_val_score": number(record.best_val_score),
        "champion_id": record.champion.id,
        REGISTRATION: store.registration_id(study.name),
        "llm_calls": record.calls,
        "llm_tokens": record.tokens,
        "wall_seconds": number(record.wall_seconds),
        "total_llm_calls": record.total_calls,
        "llm_cost_usd": number(record.cost_usd),
        "total_llm_cost_usd": number(sum(r.cost_usd for r in previous) + record.cost_usd),
        "champion": prompt_markdown(record.champion.system_prompt, record.champion.output_prompt),
    }
    return dg.MaterializeResult(
        value=record,
        metadata=metadata,
        check_results=decision_checks(study, study_data(study), previous, record),
    )
