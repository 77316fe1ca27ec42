"""Jobs: one iteration of a study, and the study report. In-process execution: the multiprocess
executor costs about 3 s of process start per step (DESIGN.md)."""

from __future__ import annotations

import dagster as dg

from promptopt_dagster.partitions import study_iteration_partitions, study_partitions

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
