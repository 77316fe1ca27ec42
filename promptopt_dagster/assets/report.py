"""The study report: the iteration table and the held-out test scores of seed and champion.
The test split is scored here only, after the study stopped, and never feeds a decision."""

import dagster as dg

from promptopt_dagster.assets.metadata import markdown_table, number, prompt_markdown
from promptopt_dagster.core.report import StudyReport, build_report, stop_summary
from promptopt_dagster.core.scoring import evaluator_for
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.instance_config import LLM_POOL
from promptopt_dagster.partitions import study_partitions
from promptopt_dagster.resources import LLMResource, PromptStoreResource
from promptopt_dagster.study_runs import REGISTRATION

# What the columns of the `iterations` table mean, shown under it in lines short enough for the
# metadata panel.
ITERATION_COLUMNS = (
    "- *val_score*: the champion's validation score\n"
    "- *llm_seconds*: time spent waiting on LLM calls\n"
    "- *wall_seconds*: from the run's start to the decision\n"
    "- *cost_usd*: from the price table (0 on local models)"
)


@dg.asset(partitions_def=study_partitions, group_name="report", kinds={"python"}, pool=LLM_POOL)
def study_report(
    context: dg.AssetExecutionContext, llm: LLMResource, prompt_store: PromptStoreResource
) -> StudyReport:
    """Why the study stopped, one row per iteration, and seed vs champion on the test split."""
    store = prompt_store.store
    study = store.load_study(context.partition_key)
    records = store.records(study.name)
    if not records:
        raise dg.Failure(f"study {study.name!r} has no finished iteration yet; materialize iteration 0 first")
    report = build_report(study, records, llm.primary(study), evaluator_for(study), load_study_data(study))
    context.add_output_metadata(
        {
            "summary": stop_summary(records[-1]),
            "stop_reason": records[-1].stop_reason or "",
            "stop_message": report.stop_message,
            "seed_test_score": number(report.seed_test[study.target_metric]),
            "final_test_score": number(report.final_test[study.target_metric]),
            "iterations": dg.MetadataValue.md(f"{markdown_table(report.table())}\n\n{ITERATION_COLUMNS}"),
            REGISTRATION: store.registration_id(study.name),
            "total_llm_calls": report.total_calls,
            "total_llm_cost_usd": number(report.total_cost_usd + report.test_cost_usd),
            "final_prompt": prompt_markdown(
                report.final_prompt.system_prompt, report.final_prompt.output_prompt
            ),
        }
    )
    return report
