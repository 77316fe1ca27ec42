"""DAGSTER_EXECUTOR picks every job's executor in one place (jobs.executor_for, given to the
Definitions); the default stays in-process; a scale-out executor without its settings fails
with a message naming the fix, and a broker password never reaches what Dagster shows."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.errors import DagsterSubprocessError
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.in_process import InProcessExecutor
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._core.snap import JobSnap

from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import execute, failure_summary
from promptopt_dagster.errors import ExecutorSettingsError
from promptopt_dagster.jobs import (
    CELERY_FAULT_SETTINGS,
    COMPARISON_JOB,
    EVALUATION_JOB,
    ITERATION_JOB,
    REPORT_JOB,
    celery_config_source,
    executor_for,
)
from promptopt_dagster_tests.support.pipeline import IsolatedSettings
from promptopt_dagster_tests.support.probe import probe_lines

JOBS = [ITERATION_JOB, REPORT_JOB, EVALUATION_JOB, COMPARISON_JOB]
BROKER = "redis://:br0ker-pa55word@127.0.0.1:6379/0"


def executors(tmp_path: Path, **values: object) -> dict[str, str]:
    defs = build_definitions(IsolatedSettings(PROMPTOPT_HOME=tmp_path, **values))
    return {name: defs.resolve_job_def(name).executor_def.name for name in JOBS}


def test_the_default_runs_every_step_in_process(tmp_path: Path) -> None:
    assert executors(tmp_path) == dict.fromkeys(JOBS, "in_process")


def test_celery_selected_by_settings_for_every_job(tmp_path: Path) -> None:
    assert executors(tmp_path, DAGSTER_EXECUTOR="celery", CELERY_BROKER_URL=BROKER) == dict.fromkeys(
        JOBS, "celery"
    )


def test_k8s_selected_by_settings_for_every_job(tmp_path: Path) -> None:
    assert executors(tmp_path, DAGSTER_EXECUTOR="k8s") == dict.fromkeys(JOBS, "k8s")


def test_the_launchpad_job_stays_in_process(tmp_path: Path) -> None:
    defs = build_definitions(IsolatedSettings(PROMPTOPT_HOME=tmp_path, DAGSTER_EXECUTOR="k8s"))
    assert defs.resolve_job_def("start_study").executor_def.name == "in_process"


def test_celery_without_a_broker_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ExecutorSettingsError, match="CELERY_BROKER_URL"):
        executor_for(IsolatedSettings(PROMPTOPT_HOME=tmp_path, DAGSTER_EXECUTOR="celery"))


def test_an_unknown_executor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="DAGSTER_EXECUTOR"):
        IsolatedSettings(PROMPTOPT_HOME=tmp_path, DAGSTER_EXECUTOR="dask")


def test_the_broker_password_is_not_in_what_dagster_shows(tmp_path: Path) -> None:
    """The UI and the run storage get snapshots: each job's (its config schema, executor config
    included, with defaults) and the repository's."""
    defs = build_definitions(
        IsolatedSettings(PROMPTOPT_HOME=tmp_path, DAGSTER_EXECUTOR="celery", CELERY_BROKER_URL=BROKER)
    )
    for name in JOBS:
        snapshot = dg.serialize_value(JobSnap.from_job_def(defs.resolve_job_def(name)))
        assert '"name": "execution"' in snapshot
        # host and port, not "6379" alone: the config-type hashes change with tmp_path and can hold it
        assert "br0ker-pa55word" not in snapshot and "127.0.0.1:6379" not in snapshot, name
    repository = dg.serialize_value(RepositorySnap.from_def(defs.get_repository_def()))
    assert "br0ker-pa55word" not in repository


def test_steps_elsewhere_need_a_persistent_instance(tmp_path: Path) -> None:
    """Checked before any broker is contacted (this one does not exist)."""
    defs = build_definitions(
        IsolatedSettings(PROMPTOPT_HOME=tmp_path, DAGSTER_EXECUTOR="celery", CELERY_BROKER_URL=BROKER)
    )
    with (
        dg.DagsterInstance.ephemeral() as instance,
        pytest.raises(ExecutorSettingsError, match="persistent Dagster instance"),
    ):
        execute(defs, instance, REPORT_JOB, "a-study", {})


def test_the_worker_config_reads_the_settings_the_executor_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/celery/worker.yaml, as `dagster-celery worker start -y` validates it: broker and
    backend from the same variables as the executor's settings."""
    from dagster_celery.cli import get_validated_config

    from promptopt_dagster_tests.support.celery_workers import WORKER_CONFIG

    monkeypatch.setenv("CELERY_BROKER_URL", BROKER)
    monkeypatch.setenv("CELERY_BACKEND_URL", "redis://127.0.0.1:6379/1")
    config = get_validated_config(str(WORKER_CONFIG))
    assert config["broker"] == BROKER and config["backend"] == "redis://127.0.0.1:6379/1"
    assert {"CELERY_BROKER_URL", "CELERY_BACKEND_URL"} <= set(IsolatedSettings.model_fields)
    # workers and executor ride through the same broker outages
    worker_only = {"imports": ["promptopt_dagster.worker_preload"]}
    assert config["config_source"] == {**celery_config_source(IsolatedSettings()), **worker_only}
    assert set(CELERY_FAULT_SETTINGS) < set(config["config_source"])


def test_the_worker_preload_loads_the_steps_libraries_without_starting_a_thread() -> None:
    """The module a worker imports before forking its pool: afterwards the code location, the
    libraries steps load lazily and every metric are in memory, and the process still has one
    thread (a thread alive at a fork would be missing, with its locks held, in every child)."""
    threads, all_metrics, missing = probe_lines(
        "import sys, threading",
        "import promptopt_dagster.worker_preload",
        "from promptopt_dagster.core import metrics",
        "print(threading.active_count())",
        "print(sorted(metrics._modules) == metrics.available_metrics())",
        "print(' '.join(m for m in ('promptopt_dagster.definitions', 'mlflow', 'evaluate',"
        " 'sklearn.ensemble', 'google.genai', 'gcsfs') if m not in sys.modules))",
    )
    assert (threads, all_metrics, missing) == ("1", "True", "")


class _BrokerGoneExecutor(InProcessExecutor):
    """Runs nothing: fails the way a Celery executor does when its broker vanishes mid-run."""

    def execute(self, plan_context, execution_plan):  # type: ignore[no-untyped-def]
        yield from ()
        raise ConnectionError(f"Error 111 connecting to {BROKER}. Connection refused.")


class _WorkerLostExecutor(InProcessExecutor):
    """Runs nothing: fails the way a Celery executor does when a worker's step process dies
    and the task is not put back on the queue."""

    def execute(self, plan_context, execution_plan):  # type: ignore[no-untyped-def]
        yield from ()
        raise DagsterSubprocessError(
            "During celery execution errors occurred in workers:\n[_one]: "
            "billiard.exceptions.WorkerLostError: Worker exited prematurely: signal 9 (SIGKILL) Job: 0.\n",
            subprocess_error_infos=[],
        )


@dg.executor(name="broker_gone")
def _broker_gone(_context: dg.InitExecutorContext) -> InProcessExecutor:
    return _BrokerGoneExecutor(retries=RetryMode.DISABLED)


@dg.executor(name="worker_lost")
def _worker_lost(_context: dg.InitExecutorContext) -> InProcessExecutor:
    return _WorkerLostExecutor(retries=RetryMode.DISABLED)


@dg.op
def _one() -> int:
    return 1


@dg.job(executor_def=_broker_gone)
def broker_gone_job() -> None:
    _one()


@dg.job(executor_def=_worker_lost)
def worker_lost_job() -> None:
    _one()


def test_a_run_failed_by_its_executor_names_the_error_without_the_password() -> None:
    with dg.instance_for_test() as instance:
        result = dg.execute_job(dg.reconstructable(broker_gone_job), instance=instance, raise_on_error=False)
    assert not result.success
    summary = failure_summary(result)
    assert summary.startswith("the run failed before any step ran: ConnectionError: Error 111"), summary
    assert "br0ker-pa55word" not in summary


def test_a_run_failed_by_a_lost_worker_names_the_step_and_the_signal() -> None:
    """Celery's error announces the list of worker errors on its first line: the summary
    carries the first of them."""
    with dg.instance_for_test() as instance:
        result = dg.execute_job(dg.reconstructable(worker_lost_job), instance=instance, raise_on_error=False)
    assert failure_summary(result) == (
        "the run failed before any step ran: DagsterSubprocessError: During celery execution errors "
        "occurred in workers: [_one]: billiard.exceptions.WorkerLostError: Worker exited prematurely: "
        "signal 9 (SIGKILL) Job: 0."
    )
