"""Jobs: one iteration of a study, and the study report. In-process execution: the multiprocess
executor starts a Python process per step, about 3 s each on this project's imports."""

from __future__ import annotations

import dagster as dg

from promptopt_dagster.partitions import evaluation_partitions, study_iteration_partitions, study_partitions

ITERATION_JOB = "iteration_job"
REPORT_JOB = "report_job"

iteration_job = dg.define_asset_job(
    ITERATION_JOB,
    selection=dg.AssetSelection.groups("iteration"),
    partitions_def=study_iteration_partitions,
    executor_def=dg.in_process_executor,
    description="The five steps of one iteration of one study.",
)
report_job = dg.define_asset_job(
    REPORT_JOB,
    selection=dg.AssetSelection.assets("study_report"),
    partitions_def=study_partitions,
    executor_def=dg.in_process_executor,
    description="Scores the seed and the final prompt on the held-out test split.",
)

# Evaluations over other datasets (assets/backfill.py). Backfills from the UI run the asset
# directly; these jobs are what the sensors request.
EVALUATION_JOB = "evaluation_job"
COMPARISON_JOB = "comparison_job"

evaluation_job = dg.define_asset_job(
    EVALUATION_JOB,
    selection=dg.AssetSelection.assets("prompt_evaluation"),
    partitions_def=evaluation_partitions,
    executor_def=dg.in_process_executor,
    description="Scores one prompt version on one dataset file (a prompt version x dataset partition).",
)
comparison_job = dg.define_asset_job(
    COMPARISON_JOB,
    selection=dg.AssetSelection.assets("evaluation_comparison"),
    executor_def=dg.in_process_executor,
    description="Gathers every evaluation into the prompt version x dataset x metric table.",
)
