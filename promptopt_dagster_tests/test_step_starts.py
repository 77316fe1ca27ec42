"""The workers' limit on starts of one step: dagster-celery's execute_plan task, built from the
workers' own config file, refuses a step once it has been started MAX_STEP_STARTS times since
its last submission, counted in a real instance's event log. The run on real workers whose step
dies every time is in test_celery_faults."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._grpc.types import ExecuteStepArgs
from dagster._serdes import pack_value
from dagster_celery.executor import CeleryExecutor

from promptopt_dagster.step_starts import (
    MAX_STEP_STARTS,
    STARTED,
    SUBMITTED,
    StepLostTooOftenError,
    starts_since_submission,
)
from promptopt_dagster_tests.support.celery_workers import WORKER_CONFIG


@dg.op
def first() -> int:
    return 1


@dg.op
def second(value: int) -> int:
    return value + 1


@dg.job
def two_steps() -> None:
    second(first())


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


@pytest.fixture
def before_start(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """The execute_plan task's `before_start`, on a Celery app built from the workers' config."""
    from dagster_celery.cli import get_validated_config
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    monkeypatch.setenv("CELERY_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("CELERY_BACKEND_URL", "redis://127.0.0.1:1/1")
    config = get_validated_config(str(WORKER_CONFIG))
    executor = CeleryExecutor.for_cli(config["broker"], config["backend"], None, config["config_source"])
    app = make_app(executor.app_args())
    task = create_task(app)
    return task.before_start


def test_a_step_started_too_often_since_its_submission_is_refused_and_a_resubmission_starts_over(
    instance: dg.DagsterInstance, before_start: Callable[..., None]
) -> None:
    run = instance.create_run_for_job(two_steps)
    step_args = pack_value(
        ExecuteStepArgs(
            job_origin=dg.reconstructable(two_steps).get_python_origin(),
            run_id=run.run_id,
            step_keys_to_execute=["second"],
            instance_ref=instance.get_ref(),
        )
    )

    def engine_event(template: str, step: str = "second") -> None:
        """As dagster-celery writes them: the executor's submission, the worker's start."""
        if template == SUBMITTED:
            instance.report_engine_event(
                template.format(step=step) + ' to queue "dagster".', run, step_key=step
            )
        else:
            instance.report_engine_event(template.format(step=step), run, None, CeleryExecutor, step_key=step)

    def start() -> None:
        before_start("task-id", (), {"execute_step_args_packed": step_args, "executable_dict": {}})
        engine_event(STARTED)

    engine_event(SUBMITTED)
    for _ in range(MAX_STEP_STARTS):
        start()
    engine_event(STARTED, step="first")  # another step's starts do not count
    assert starts_since_submission(instance, run.run_id, "second") == MAX_STEP_STARTS
    with pytest.raises(StepLostTooOftenError, match=f"step second was started {MAX_STEP_STARTS} times"):
        start()

    engine_event(SUBMITTED)  # Dagster retries the step: a new submission
    start()
    assert starts_since_submission(instance, run.run_id, "second") == 1
