"""Headless driver: evaluates the same sensors the daemon runs and executes the runs they
request from this process (their steps in it too, unless DAGSTER_EXECUTOR sends them to
workers), on a persistent Dagster instance, so `promptopt run` and the UI share history and run
keys."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.events.log import EventLogEntry
from dagster._core.execution.api import execute_run
from dagster._core.execution.execute_in_process import merge_run_tags
from dagster._core.execution.job_execution_result import JobExecutionResult
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster._core.utils import make_new_run_id
from dagster._utils.error import SerializableErrorInfo
from dagster_postgres.utils import DagsterPostgresException
from sqlalchemy.exc import OperationalError

from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.errors import ExecutorSettingsError, InstanceUnavailableError, PromptoptError
from promptopt_dagster.jobs import ITERATION_JOB, REPORT_JOB
from promptopt_dagster.partitions import STUDY_ITERATION, study_iteration_key, study_iteration_keys
from promptopt_dagster.redaction import redact
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster.study_runs import Decision, is_reported, latest_decision


class RunFailedError(PromptoptError):
    """A run failed; the study resumes at the same iteration when run again."""


@contextlib.contextmanager
def instance_failures_reported() -> Iterator[None]:
    """Dagster's storages raise their database driver's errors when the instance's database is
    down or refuses a write (dagster-postgres after about a second of retries). Nothing of the
    study is lost then: finished steps are stored, and the run left unfinished is marked failed
    by the next `promptopt run`, which resumes. Say so, once, instead of a driver traceback."""
    try:
        yield
    except (DagsterPostgresException, OperationalError) as exc:
        raise InstanceUnavailableError(
            f"the Dagster instance's database failed ({type(exc).__name__}: {_first_line(str(exc))}). "
            "Nothing of the study is lost. Fix: check that the database is up (DAGSTER_PG_URL, or the "
            "SQLite files in DAGSTER_HOME), then run `promptopt run` again: it marks the unfinished "
            "run failed and resumes the study"
        ) from exc


# Dagster's console log stays out of the CLI's output (its own lines say what happens); a failure
# is reported once, by RunFailedError. `--verbose` shows Dagster's log.
QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
# Executors whose steps this process can run itself with `execute_in_process` (which runs every
# step in-process whatever the job's executor): Dagster's own, including the default a
# Definitions without `executor=` gets. Any other (celery, k8s) sends the steps to workers.
_HERE_EXECUTORS = {
    dg.in_process_executor.name,
    dg.multi_or_in_process_executor.name,
    dg.multiprocess_executor.name,
}
DRIVER_PID_TAG = "promptopt/driver_pid"
DRIVER_HOST_TAG = "promptopt/driver_host"
# Where steps that run outside this process (DAGSTER_EXECUTOR=celery, k8s) load the jobs from.
CODE_LOCATION = "promptopt_dagster.definitions:defs"


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
    partition_key: str,
    tags: dict[str, str],
    quiet: bool = True,
    on_step: Callable[[str], None] | None = None,
    location: str = CODE_LOCATION,
) -> RunOutcome:
    """Run one job from this process; `on_step` hears each step's key as it starts. With the
    in-process executor every step runs here; with another (DAGSTER_EXECUTOR=celery, k8s) this
    process orchestrates and the steps run where the executor sends them, which load the job
    from `location` ("module:attribute", the code location holding `defs`)."""
    job = defs.resolve_job_def(job_name)
    run_id = make_new_run_id()
    in_process = job.executor_def.name in _HERE_EXECUTORS
    if on_step is not None:
        # Listeners hear only the events this process logs. Steps run elsewhere log STEP_START
        # there; here the executor logs that it hands a step over (celery: an engine event per
        # task, k8s: STEP_WORKER_STARTING), so the first such event of each step stands for it.
        started = {"STEP_START"} if in_process else {"STEP_START", "STEP_WORKER_STARTING", "ENGINE_EVENT"}
        heard: set[str] = set()

        def listen(entry: EventLogEntry) -> None:
            event = entry.dagster_event
            key = event.step_key if event is not None else None
            if event is None or not key or event.event_type_value not in started:
                return
            if not in_process:
                if key in heard:
                    return
                heard.add(key)
            on_step(key)

        instance.add_event_listener(run_id, listen)
    start = time.perf_counter()
    run_tags = {**tags, DRIVER_PID_TAG: str(os.getpid()), DRIVER_HOST_TAG: socket.gethostname()}
    run_config = QUIET_LOGS if quiet else None
    result: dg.ExecuteInProcessResult | JobExecutionResult
    if in_process:
        result = job.execute_in_process(
            instance=instance,
            partition_key=partition_key,
            tags=run_tags,
            run_config=run_config,
            raise_on_error=False,
            run_id=run_id,
        )
    else:
        result = _execute_elsewhere(job, instance, location, partition_key, run_tags, run_config, run_id)
    if not result.success:
        raise RunFailedError(f"{job_name} for {partition_key} failed: {failure_summary(result)}")
    return RunOutcome(
        job_name, str(partition_key), tags.get(RUN_KEY_TAG), time.perf_counter() - start, result.success
    )


def _execute_elsewhere(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    location: str,
    partition_key: str,
    tags: dict[str, str],
    run_config: dict[str, object] | None,
    run_id: str,
) -> JobExecutionResult:
    """Run `job` with its own executor, orchestrated from this process: the steps load the job
    from `location`, so the run records that code origin, with the partition tags
    `execute_in_process` would add. Needs a persistent instance (its ref goes to the steps)."""
    if instance.is_ephemeral:
        raise ExecutorSettingsError(
            f"the {job.executor_def.name} executor (DAGSTER_EXECUTOR) runs steps in other processes, "
            "which need a persistent Dagster instance: set DAGSTER_HOME to a folder whose dagster.yaml "
            "uses postgres storage, or set DAGSTER_EXECUTOR=in_process"
        )
    module, _, attribute = location.partition(":")
    recon = ReconstructableRepository.for_module(module, attribute or "defs", os.getcwd())
    recon_job = recon.get_reconstructable_job(job.name)
    run = instance.create_run_for_job(
        job_def=recon_job.get_definition(),
        run_id=run_id,
        run_config=run_config,
        tags=merge_run_tags(job, partition_key, tags, None, instance, run_config),
        job_code_origin=recon_job.get_python_origin(),
    )
    return execute_run(recon_job, run, instance)


def fail_orphaned_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark failed the runs this driver started on this machine whose process is gone (killed,
    for instance with kill -9): the daemon's run monitoring does this for its own runs, and
    nothing else would for ours. Returns the run ids marked."""
    host = socket.gethostname()
    marked = []
    runs = instance.get_runs(
        filters=dg.RunsFilter(
            statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
            tags={DRIVER_HOST_TAG: host},
        )
    )
    for run in runs:
        pid = run.tags.get(DRIVER_PID_TAG, "")
        if pid.isdigit() and not _alive(int(pid)):
            instance.report_run_failed(
                run, message=f"the process that ran it (pid {pid} on {host}) ended without finishing it"
            )
            marked.append(run.run_id)
    return marked


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _our_error_names() -> set[str]:
    """Our error classes carry the actionable message; a library's cause below them does not."""
    names, todo = set(), [PromptoptError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def failure_summary(result: dg.ExecuteInProcessResult | JobExecutionResult) -> str:
    """The failing step and the innermost of our errors (else the innermost error), without
    Dagster's wrapping."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            chain = [event.event_specific_data.error]  # type: ignore[union-attr]
            while chain[-1].cause is not None or chain[-1].context is not None:
                chain.append(chain[-1].cause or chain[-1].context)
            ours = [e for e in chain if e.cls_name in _our_error_names()]
            error = ours[-1] if ours else chain[-1]
            return f"step {event.step_key}: {error.cls_name}: {_message_of(error)}"
    for event in result.all_events:  # no step failed: the run itself did (its executor, say)
        error = getattr(event.event_specific_data, "error", None)
        if event.event_type_value == "PIPELINE_FAILURE" and error is not None:
            stepped = any(e.step_key for e in result.all_events)
            where = "outside its steps" if stepped else "before any step ran"
            return f"the run failed {where}: {error.cls_name}: {_first_line(_message_of(error))}"
    return "the run failed before any step ran (see the run in the Dagster UI)"


def _first_line(message: str) -> str:
    """An error message's first line, without credentials: driver messages may quote a URL.
    A first line that ends in a colon only announces what follows (Celery's "errors occurred
    in workers:"), so the next line comes with it."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    head = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return redact(head)


def _message_of(error: SerializableErrorInfo) -> str:
    """The error's own text: Dagster's serialized message starts with "module.Class: "."""
    message = error.message.strip()
    return re.sub(rf"^[\w.]*\b{re.escape(error.cls_name)}: ", "", message)


def drive(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    study: str,
    on_run: Callable[[str, str], None] | None = None,
    on_done: Callable[[RunOutcome], None] | None = None,
    max_runs: int = 1000,
    quiet: bool = True,
    on_step: Callable[[str], None] | None = None,
    location: str = CODE_LOCATION,
) -> DriveResult:
    """Tick both sensors and execute what they request for `study` until nothing is left.
    A study whose last iteration failed is resumed at that iteration. `location` is where steps
    run by another executor than in_process load the jobs from (see `execute`)."""
    prompt_store = defs.resources["prompt_store"]
    result = DriveResult()
    for _ in range(max_runs):
        requested = []
        for sensor in (new_study_sensor, continue_study_sensor):
            resources = {"prompt_store": prompt_store}
            context = dg.build_sensor_context(instance=instance, resources=resources, definitions=defs)
            with contextlib.redirect_stderr(io.StringIO()):  # the tick's log lines are for the UI
                tick: dg.SensorResult = sensor(context)  # type: ignore[assignment]
            apply_partition_requests(instance, tick)
            if tick.skip_reason:
                result.skip_reasons.append(str(tick.skip_reason.skip_message))
            for run in tick.run_requests or []:
                if run.tags.get("study") == study and not _already_ran(
                    instance, sensor.name, run.run_key or ""
                ):
                    requested.append((sensor.name, run))
        if not requested:
            pending = _pending_iteration(instance, prompt_store.store, study)  # type: ignore[attr-defined]
            if pending is None:
                return result
            key = study_iteration_key(study, pending)
            if not instance.has_dynamic_partition(STUDY_ITERATION, key):
                instance.add_dynamic_partitions(STUDY_ITERATION, [key])
            requested.append(
                (
                    continue_study_sensor.name,
                    dg.RunRequest(job_name=ITERATION_JOB, partition_key=key, tags={"study": study}),
                )
            )
        sensor_name, run = requested[0]
        job_name = run.job_name or ITERATION_JOB
        if on_run:
            on_run(job_name, str(run.partition_key))
        tags = {**run.tags, SENSOR_NAME_TAG: sensor_name}
        if run.run_key:
            tags[RUN_KEY_TAG] = run.run_key
        outcome = execute(
            defs, instance, job_name, run.partition_key or "", tags, quiet=quiet, on_step=on_step,
            location=location,
        )
        result.runs.append(outcome)
        if on_done:
            on_done(outcome)
    return result


def apply_partition_requests(instance: dg.DagsterInstance, tick: dg.SensorResult) -> None:
    """Add and delete the dynamic partitions a sensor tick asks for, as the daemon does."""
    for req in tick.dynamic_partitions_requests or []:
        keys = list(req.partition_keys or [])
        if isinstance(req, dg.DeleteDynamicPartitionsRequest):
            for key in keys:
                instance.delete_dynamic_partition(req.partitions_def_name, key)
        else:
            instance.add_dynamic_partitions(req.partitions_def_name, keys)


def forget_study(defs: dg.Definitions, instance: dg.DagsterInstance, study: str) -> None:
    """Forget a registered study so it can be registered and run again from scratch, as one
    operation: first the study is marked forgotten in the prompt store (from then on it reads as
    not registered, and its old materializations no longer count: they belong to the old
    registration), then its partitions (the study's and its iterations') are removed from
    Dagster, then its files; a removal cut short is finished by the next forget or registration
    (iteration partitions left over are removed by new_study_sensor when the study runs again).
    Run history and materializations stay in Dagster (its SQL storages cannot wipe partitions).
    An unknown study is an error and changes nothing."""
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    store.begin_forget(study)
    for key in study_iteration_keys(instance, study):
        instance.delete_dynamic_partition(STUDY_ITERATION, key)
    if study in instance.get_dynamic_partitions("study"):
        instance.delete_dynamic_partition("study", study)
    store.finish_forget(study)


def study_state(instance: dg.DagsterInstance, store: PromptStore, study: str) -> tuple[Decision | None, bool]:
    """The latest decision of the study's current registration, and whether it is reported."""
    registration = store.registration_id(study)
    return latest_decision(instance, study, registration), is_reported(instance, study, registration)


def _pending_iteration(instance: dg.DagsterInstance, store: PromptStore, study: str) -> int | None:
    """An iteration whose run failed or never finished: the one after the last decision, unless
    the study stopped. None when there is nothing to resume."""
    if not store.is_registered(study):
        return None
    latest, reported = study_state(instance, store, study)
    if reported:
        return None
    if latest is None:
        return 0
    return None if latest.stop else latest.iteration + 1


__all__ = ["drive", "execute", "DriveResult", "RunOutcome", "REPORT_JOB", "ITERATION_JOB"]
