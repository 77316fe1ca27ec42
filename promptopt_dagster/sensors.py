"""Sensors: start iteration 0 of a newly registered study, and carry a study on iteration after
iteration until its decision says stop (then request its report)."""

import json

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG

from promptopt_dagster.assets.backfill import DatasetsResource
from promptopt_dagster.core import evaluation_catalog
from promptopt_dagster.core.prompt_store import PromptStore, iteration_key
from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.jobs import (
    EVALUATION_JOB,
    ITERATION_JOB,
    REPORT_JOB,
    comparison_job,
    evaluation_job,
    iteration_job,
    report_job,
)
from promptopt_dagster.partitions import STUDY_ITERATION, evaluation_key, parse_key, study_iteration_key
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster.study_runs import is_reported, latest_decision, materialized_iterations


def run_key(store: PromptStore, study: str, iteration: int | str) -> str:
    """Unique per registration of a study, so a study registered again starts afresh."""
    step = iteration_key(iteration) if isinstance(iteration, int) else iteration
    return f"{study}/{store.registration_id(study)}/{step}"


def _has_run(instance: dg.DagsterInstance, key: str) -> bool:
    return bool(instance.get_runs(filters=dg.RunsFilter(tags={RUN_KEY_TAG: key}), limit=1))


@dg.sensor(job=iteration_job, minimum_interval_seconds=5, default_status=dg.DefaultSensorStatus.RUNNING)
def new_study_sensor(
    context: dg.SensorEvaluationContext, prompt_store: PromptStoreResource
) -> dg.SensorResult:
    """A study registered in the prompt store (by `promptopt run` or the start_study job) gets
    its study partition, the partition of its iteration 0 and a run of it, once per registration
    (the run key says which). Iteration partitions a study kept from an earlier registration
    (a forget cut short before it removed them) are removed then."""
    store = prompt_store.store
    instance = context.instance
    known = set(instance.get_dynamic_partitions("study"))
    done = materialized_iterations(instance)
    new = [
        s
        for s in store.studies()
        if s not in known
        or (
            latest_decision(instance, s, store.registration_id(s), done.get(s, {})) is None
            and not _has_run(instance, run_key(store, s, 0))
        )
    ]
    if not new:
        return dg.SensorResult(skip_reason=f"no new study ({len(known)} registered)")
    existing = set(instance.get_dynamic_partitions(STUDY_ITERATION))
    firsts = [study_iteration_key(s, 0) for s in new]
    stale = sorted(k for k in existing if parse_key(k)[0] in new and k not in firsts)
    unknown = [s for s in new if s not in known]
    added = [k for k in firsts if k not in existing]
    return dg.SensorResult(
        dynamic_partitions_requests=[
            *([dg.AddDynamicPartitionsRequest("study", unknown)] if unknown else []),
            *([dg.DeleteDynamicPartitionsRequest(STUDY_ITERATION, stale)] if stale else []),
            *([dg.AddDynamicPartitionsRequest(STUDY_ITERATION, added)] if added else []),
        ],
        run_requests=[
            dg.RunRequest(
                partition_key=study_iteration_key(s, 0),
                run_key=run_key(store, s, 0),
                tags={"study": s},
            )
            for s in new
        ],
    )


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
    done = materialized_iterations(instance)
    existing = set(instance.get_dynamic_partitions(STUDY_ITERATION))
    run_requests: list[dg.RunRequest] = []
    new_keys: list[str] = []
    stopped: list[str] = []
    for study in store.studies():
        registration = store.registration_id(study)
        latest = latest_decision(instance, study, registration, done.get(study, {}))
        if latest is None:
            continue
        if latest.stop:
            stopped.append(f"{study}: stopped after iteration {latest.iteration} ({latest.stop_message})")
            if not is_reported(instance, study, registration):
                run_requests.append(
                    dg.RunRequest(
                        job_name=REPORT_JOB,
                        partition_key=study,
                        run_key=run_key(store, study, "report"),
                        tags={"study": study},
                    )
                )
            continue
        nxt = study_iteration_key(study, latest.iteration + 1)
        if nxt not in existing:
            new_keys.append(nxt)  # the partition appears when its run is requested
        run_requests.append(
            dg.RunRequest(
                job_name=ITERATION_JOB,
                partition_key=nxt,
                run_key=run_key(store, study, latest.iteration + 1),
                tags={"study": study},
            )
        )
    # The stop reasons go in the skip reason only: the iteration that stopped a study logged
    # "study X stopped: reason" once in its run, so a tick every 5 s does not repeat it as a log line.
    if not run_requests:
        return dg.SensorResult(skip_reason="; ".join(stopped) or "no study has a finished iteration yet")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest(STUDY_ITERATION, new_keys)]
        if new_keys
        else [],
    )


# --- Evaluations over other datasets (assets/backfill.py) ------------------------------------
# A dataset file dropped in the datasets location and a new prompt version (a study's seed or an
# accepted prompt) each become a partition of prompt_evaluation; the user backfills from the UI
# (or, with BACKFILL_AUTO_EVALUATE, these sensors request the compatible evaluations).

EVALUATION = dg.AssetKey("prompt_evaluation")


def _evaluation_requests(pairs: list[tuple[str, str]], signatures: dict[str, str]) -> list[dg.RunRequest]:
    """Idempotent: one run per prompt version x dataset x version of the dataset file."""
    return [
        dg.RunRequest(
            job_name=EVALUATION_JOB,
            partition_key=evaluation_key(version, dataset),
            run_key=f"evaluate/{version}/{dataset}/{signatures.get(dataset, '')}",
            tags={"prompt_version": version, "dataset": dataset},
        )
        for version, dataset in pairs
    ]


def _compatible(store: PromptStore, version: str, info: evaluation_catalog.DatasetInfo) -> list[str]:
    """Columns `info` lacks for `version` ([] when it can be evaluated there)."""
    study, prompt_id = evaluation_catalog.parse_prompt_version(version)
    prompt, study_config = store.load_prompt(study, prompt_id), store.load_study(study)
    return evaluation_catalog.missing_columns(prompt, study_config, info)


@dg.sensor(jobs=[evaluation_job], minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def new_dataset_sensor(
    context: dg.SensorEvaluationContext, prompt_store: PromptStoreResource, datasets: DatasetsResource
) -> dg.SensorResult:
    """Registers each new or changed dataset file that some prompt version can be evaluated on;
    a malformed file, or one no prompt version fits, is reported on the tick and skipped (and
    looked at again when it changes or new prompt versions appear)."""
    store = prompt_store.store
    cursor = json.loads(context.cursor) if context.cursor else {}
    seen: dict[str, str] = cursor.get("files", {})
    versions = evaluation_catalog.prompt_versions(store)
    versions_stamp = str(len(versions)) + ":" + (versions[-1] if versions else "")
    registered = set(context.instance.get_dynamic_partitions("dataset"))
    new: list[str] = []
    problems: list[str] = []
    pairs: list[tuple[str, str]] = []
    signatures: dict[str, str] = {}
    for name, uri in datasets.files().items():
        try:
            sig = evaluation_catalog.signature(uri)
            if seen.get(name) == sig and (name in registered or cursor.get("versions") == versions_stamp):
                continue
            seen[name] = sig
            info = datasets.inspect(name)
        except PromptoptError as exc:
            problems.append(f"skipped {name}: {exc}")
            continue
        fits = {v: _compatible(store, v, info) for v in versions}
        ok = [v for v, missing in fits.items() if not missing]
        if not ok:
            needs = "; ".join(f"{v} needs {m}" for v, m in fits.items()) or "no study is registered yet"
            problems.append(f"skipped {name}: no prompt version can be evaluated on it ({needs})")
            continue
        signatures[name] = info.signature
        if name not in registered:
            new.append(name)
        pairs.extend((v, name) for v in ok)
        context.log.info(f"dataset {name}: fits {len(ok)} prompt version(s): {', '.join(ok)}")
    for line in problems:
        context.log.warning(line)
    new_cursor = json.dumps({"files": seen, "versions": versions_stamp}, sort_keys=True)
    requests = _evaluation_requests(pairs, signatures) if datasets.auto_evaluate else []
    if not new and not requests:
        reason = "; ".join(problems) or f"no new dataset in {datasets.uri} ({len(registered)} registered)"
        return dg.SensorResult(skip_reason=reason, cursor=new_cursor)
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest("dataset", new)] if new else [],
        cursor=new_cursor,
    )


@dg.sensor(jobs=[evaluation_job], minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def new_prompt_version_sensor(
    context: dg.SensorEvaluationContext, prompt_store: PromptStoreResource, datasets: DatasetsResource
) -> dg.SensorResult:
    """Registers every study's seed and each newly accepted prompt as a prompt version, to be
    evaluated over the registered datasets."""
    store = prompt_store.store
    registered = set(context.instance.get_dynamic_partitions("prompt_version"))
    new = [v for v in evaluation_catalog.prompt_versions(store) if v not in registered]
    if not new:
        return dg.SensorResult(skip_reason=f"no new prompt version ({len(registered)} registered)")
    requests: list[dg.RunRequest] = []
    if datasets.auto_evaluate:
        pairs: list[tuple[str, str]] = []
        signatures: dict[str, str] = {}
        for name in context.instance.get_dynamic_partitions("dataset"):
            try:
                info = datasets.inspect(name)
            except PromptoptError as exc:
                context.log.warning(f"dataset {name} not evaluated: {exc}")
                continue
            signatures[name] = info.signature
            pairs.extend((v, name) for v in new if not _compatible(store, v, info))
        requests = _evaluation_requests(pairs, signatures)
    context.log.info(f"new prompt version(s): {', '.join(new)}")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[dg.AddDynamicPartitionsRequest("prompt_version", new)],
    )


@dg.sensor(job=comparison_job, minimum_interval_seconds=10, default_status=dg.DefaultSensorStatus.RUNNING)
def evaluation_comparison_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Refreshes evaluation_comparison once new evaluations have landed (cursor: the storage id of
    the latest prompt_evaluation materialization it has seen)."""
    after = int(context.cursor) if context.cursor else 0
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=EVALUATION, after_storage_id=after), limit=1000
    ).records
    if not records:
        return dg.SensorResult(skip_reason="no new evaluation")
    latest = max(r.storage_id for r in records)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"comparison/{latest}")], cursor=str(latest))
