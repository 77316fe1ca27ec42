"""A limit on how often a Celery worker starts the same step. The workers hand the task of a
step whose process was killed back to the queue (`task_reject_on_worker_lost`), so a step that
kills its process every time (out of memory on its input, a crash in native code) would
otherwise run forever. Before a worker starts a step it counts the step's starts since the
executor last submitted it, from the run's event log; at MAX_STEP_STARTS the step fails with a
message instead, and the run fails. A step retried by Dagster (a RetryPolicy) is submitted
again, so its count starts over."""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import unpack_value

from promptopt_dagster.errors import PromptoptError

MAX_STEP_STARTS = 3
# The messages of the engine events dagster-celery writes for a step: the executor's on each
# submission, the worker's as it starts the step (after a "[CeleryExecutor] " prefix).
SUBMITTED = 'Submitting celery task for step "{step}"'
STARTED = "Executing steps {step} in celery worker"


class StepLostTooOftenError(PromptoptError):
    """A step was started MAX_STEP_STARTS times since its submission and never finished."""


def starts_since_submission(instance: dg.DagsterInstance, run_id: str, step_key: str) -> int:
    """How many times a worker started `step_key` of the run since its last submission."""
    submitted, started = SUBMITTED.format(step=step_key), STARTED.format(step=step_key)
    starts = 0
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        if entry.step_key != step_key or entry.dagster_event is None:
            continue
        message = entry.dagster_event.message or ""
        if message.startswith(submitted):
            starts = 0
        elif message.endswith(started):
            starts += 1
    return starts


def refuse_a_step_lost_too_often(
    task: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """`before_start` of dagster-celery's execute_plan task: raises StepLostTooOftenError
    instead of starting a step for the (MAX_STEP_STARTS + 1)-th time. The executor sends the
    step's arguments by keyword."""
    packed = kwargs["execute_step_args_packed"] if "execute_step_args_packed" in kwargs else args[0]
    step_args = unpack_value(packed, as_type=ExecuteStepArgs)
    if step_args.instance_ref is None:
        return
    instance = dg.DagsterInstance.from_ref(step_args.instance_ref)
    try:
        for step_key in step_args.step_keys_to_execute or []:
            starts = starts_since_submission(instance, step_args.run_id, step_key)
            if starts >= MAX_STEP_STARTS:
                raise StepLostTooOftenError(
                    f"step {step_key} was started {starts} times and never finished: its process "
                    "was killed each time (e.g. out of memory) or its worker was lost; not starting "
                    "it again. Replies it received are in the response cache: fix the cause (a "
                    "larger worker, smaller chunks) and re-execute the run from its failure"
                )
    finally:
        instance.dispose()


class StepStartLimit:
    """A Celery task annotation (`task_annotations`, named by its import path in the workers'
    config): gives dagster-celery's execute_plan task the check above as its `before_start`."""

    def annotate(self, task: Any) -> dict[str, Any] | None:
        from dagster_celery.config import TASK_EXECUTE_PLAN_NAME

        if task.name == TASK_EXECUTE_PLAN_NAME:
            return {"before_start": refuse_a_step_lost_too_often}
        return None
