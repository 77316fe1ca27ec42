"""Sensors: start iteration 0 of a newly registered study, and carry a study on iteration after
iteration until its decision says stop (then request its report)."""

import dagster as dg

from promptopt_dagster.core.prompt_store import PromptStore, iteration_key
from promptopt_dagster.jobs import ITERATION_JOB, REPORT_JOB, iteration_job, report_job
from promptopt_dagster.partitions import parse_key, study_iteration_key
from promptopt_dagster.resources import PromptStoreResource

DECISION = dg.AssetKey("iteration_decision")
REPORT = dg.AssetKey("study_report")


def run_key(store: PromptStore, study: str, iteration: int | str) -> str:
    """Unique per registration of a study, so a study registered again starts afresh."""
    step = iteration_key(iteration) if isinstance(iteration, int) else iteration
    return f"{study}/{store.registration_id(study)}/{step}"


@dg.sensor(job=iteration_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def new_study_sensor(
    context: dg.SensorEvaluationContext, prompt_store: PromptStoreResource
) -> dg.SensorResult:
    """A study registered in the prompt store (by `promptopt run` or the start_study job) gets
    its partitions and its iteration 0."""
    known = set(context.instance.get_dynamic_partitions("study"))
    new = [s for s in prompt_store.store.studies() if s not in known]
    if not new:
        return dg.SensorResult(skip_reason=f"no new study ({len(known)} registered)")
    iterations = set(context.instance.get_dynamic_partitions("iteration"))
    return dg.SensorResult(
        dynamic_partitions_requests=[
            dg.AddDynamicPartitionsRequest("study", new),
            *([dg.AddDynamicPartitionsRequest("iteration", ["0000"])] if "0000" not in iterations else []),
        ],
        run_requests=[
            dg.RunRequest(
                partition_key=study_iteration_key(s, 0),
                run_key=run_key(prompt_store.store, s, 0),
                tags={"study": s},
            )
            for s in new
        ],
    )


def latest_decisions(instance: dg.DagsterInstance) -> dict[str, int]:
    """The highest iteration with a materialized decision, per study."""
    latest: dict[str, int] = {}
    for key in instance.get_materialized_partitions(DECISION):
        study, iteration = parse_key(key)
        latest[study] = max(latest.get(study, -1), iteration)
    return latest


@dg.sensor(
    jobs=[iteration_job, report_job],
    minimum_interval_seconds=5,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def continue_study_sensor(
    context: dg.SensorEvaluationContext, prompt_store: PromptStoreResource
) -> dg.SensorResult:
    """Reads the latest decision of each study from its materialization metadata: requests the
    next iteration, or, once it says stop, the study report; the stop reasons show on the tick."""
    instance = context.instance
    store = prompt_store.store
    registered = set(store.studies())
    reported = set(instance.get_materialized_partitions(REPORT))
    iterations = set(instance.get_dynamic_partitions("iteration"))
    run_requests: list[dg.RunRequest] = []
    new_keys: list[str] = []
    stopped: list[str] = []
    for study, iteration in sorted(latest_decisions(instance).items()):
        if study not in registered:
            continue
        key = study_iteration_key(study, iteration)
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=DECISION, asset_partitions=[str(key)]), limit=1
        ).records
        meta = record.asset_materialization.metadata if record.asset_materialization else {}
        if meta.get("stop") and meta["stop"].value:
            message = meta["stop_message"].value if "stop_message" in meta else "stopped"
            stopped.append(f"{study}: stopped after iteration {iteration} ({message})")
            if study not in reported:
                run_requests.append(
                    dg.RunRequest(
                        job_name=REPORT_JOB,
                        partition_key=study,
                        run_key=run_key(store, study, "report"),
                        tags={"study": study},
                    )
                )
            continue
        nxt = iteration_key(iteration + 1)
        if nxt not in iterations and nxt not in new_keys:
            new_keys.append(nxt)
        run_requests.append(
            dg.RunRequest(
                job_name=ITERATION_JOB,
                partition_key=study_iteration_key(study, iteration + 1),
                run_key=run_key(store, study, iteration + 1),
                tags={"study": study},
            )
        )
    for line in stopped:
        context.log.info(line)
    if not run_requests:
        return dg.SensorResult(skip_reason="; ".join(stopped) or "no study has a finished iteration yet")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest("iteration", new_keys)]
        if new_keys
        else [],
    )
