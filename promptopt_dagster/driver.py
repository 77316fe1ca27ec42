"""Headless driver: evaluates the same sensors the daemon runs and executes the runs they
request in-process, on a persistent Dagster instance, so `promptopt run` and the UI share
history and run keys."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG

from promptopt_dagster.core.errors import PromptoptError
from promptopt_dagster.jobs import ITERATION_JOB, REPORT_JOB
from promptopt_dagster.partitions import parse_key, study_iteration_key
from promptopt_dagster.sensors import REPORT, continue_study_sensor, latest_decisions, new_study_sensor


class RunFailedError(PromptoptError):
    """A run failed; the study resumes at the same iteration when run again."""


QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class RunOutcome:
    job: str
    partition_key: str
    run_key: str | None
    seconds: float
    success: bool


@dataclass
class DriveResult:
    runs: list[RunOutcome] = field(default_factory=list)
    skip_reasons: list[str] = field(default_factory=list)

    def iteration_seconds(self) -> dict[str, float]:
        return {r.partition_key: r.seconds for r in self.runs if r.job == ITERATION_JOB}


def _already_ran(instance: dg.DagsterInstance, sensor_name: str, run_key: str) -> bool:
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={RUN_KEY_TAG: run_key, SENSOR_NAME_TAG: sensor_name},
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.STARTED],
        ),
        limit=1,
    )
    return bool(runs)


def execute(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    job_name: str,
    partition_key: str | dg.MultiPartitionKey,
    tags: dict[str, str],
    quiet: bool = True,
) -> RunOutcome:
    job = defs.resolve_job_def(job_name)
    start = time.perf_counter()
    result = job.execute_in_process(
        instance=instance,
        partition_key=str(partition_key),
        tags=tags,
        run_config=QUIET_LOGS if quiet else None,
        raise_on_error=False,
    )
    if not result.success:
        raise RunFailedError(f"{job_name} for {partition_key} failed: {failure_summary(result)}")
    return RunOutcome(
        job_name, str(partition_key), tags.get(RUN_KEY_TAG), time.perf_counter() - start, result.success
    )


def _our_error_names() -> set[str]:
    """Our error classes carry the actionable message; a library's cause below them does not."""
    names, todo = set(), [PromptoptError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def failure_summary(result: dg.ExecuteInProcessResult) -> str:
    """The failing step and the innermost of our errors (else the innermost error), without
    Dagster's wrapping."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            chain = [event.event_specific_data.error]  # type: ignore[union-attr]
            while chain[-1].cause is not None or chain[-1].context is not None:
                chain.append(chain[-1].cause or chain[-1].context)
            ours = [e for e in chain if e.cls_name in _our_error_names()]
            error = ours[-1] if ours else chain[-1]
            return f"step {event.step_key}: {error.cls_name}: {error.message.strip()}"
    return "the run failed before any step ran (see the run in the Dagster UI)"


def drive(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    study: str,
    on_run: Callable[[str, str], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
    max_runs: int = 1000,
    quiet: bool = True,
) -> DriveResult:
    """Tick both sensors and execute what they request for `study` until nothing is left.
    A study whose last iteration failed is resumed at that iteration."""
    prompt_store = defs.resources["prompt_store"]
    result = DriveResult()
    for _ in range(max_runs):
        requested = []
        for sensor in (new_study_sensor, continue_study_sensor):
            resources = {"prompt_store": prompt_store}
            context = dg.build_sensor_context(instance=instance, resources=resources, definitions=defs)
            with contextlib.redirect_stderr(io.StringIO()):  # the tick's log lines are for the UI
                tick: dg.SensorResult = sensor(context)  # type: ignore[assignment]
            for req in tick.dynamic_partitions_requests or []:
                instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
            if tick.skip_reason:
                result.skip_reasons.append(str(tick.skip_reason.skip_message))
            for run in tick.run_requests or []:
                if run.tags.get("study") == study and not _already_ran(
                    instance, sensor.name, run.run_key or ""
                ):
                    requested.append((sensor.name, run))
        if not requested:
            pending = _pending_iteration(instance, study)
            if pending is None:
                return result
            requested.append(
                (
                    continue_study_sensor.name,
                    dg.RunRequest(
                        job_name=ITERATION_JOB,
                        partition_key=study_iteration_key(study, pending),
                        tags={"study": study},
                    ),
                )
            )
        sensor_name, run = requested[0]
        job_name = run.job_name or ITERATION_JOB
        if on_run:
            on_run(job_name, str(run.partition_key))
        tags = {**run.tags, SENSOR_NAME_TAG: sensor_name}
        if run.run_key:
            tags[RUN_KEY_TAG] = run.run_key
        outcome = execute(defs, instance, job_name, run.partition_key or "", tags, quiet=quiet)
        result.runs.append(outcome)
        if on_done:
            on_done(outcome)
    return result


def forget_study(defs: dg.Definitions, instance: dg.DagsterInstance, study: str) -> None:
    """Remove a study from the prompt store and its partitions' materializations from Dagster,
    so it can be registered and run again from scratch. Run history stays."""
    defs.resources["prompt_store"].store.forget_study(study)  # type: ignore[attr-defined]
    for asset in defs.resolve_all_asset_specs():
        keys = [
            k
            for k in instance.get_materialized_partitions(asset.key)
            if k == study or (("|" in k) and parse_key(k)[0] == study)
        ]
        if keys:
            instance.wipe_asset_partitions(asset.key, keys)
    if study in instance.get_dynamic_partitions("study"):
        instance.delete_dynamic_partition("study", study)


def _pending_iteration(instance: dg.DagsterInstance, study: str) -> int | None:
    """An iteration whose run failed or never finished: the one after the last decision, unless
    the study stopped. None when there is nothing to resume."""
    if study in set(instance.get_materialized_partitions(REPORT)):
        return None
    if study not in set(instance.get_dynamic_partitions("study")):
        return None
    latest = latest_decisions(instance).get(study)
    if latest is None:
        return 0
    return None if _stopped(instance, study, latest) else latest + 1


def _stopped(instance: dg.DagsterInstance, study: str, iteration: int) -> bool:
    key = study_iteration_key(study, iteration)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("iteration_decision"), asset_partitions=[str(key)]),
        limit=1,
    ).records
    meta = records[0].asset_materialization.metadata if records and records[0].asset_materialization else {}
    return bool(meta.get("stop") and meta["stop"].value)


__all__ = ["drive", "execute", "DriveResult", "RunOutcome", "REPORT_JOB", "ITERATION_JOB"]
