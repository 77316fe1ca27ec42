"""Steps on workers: DAGSTER_EXECUTOR=celery sends every step of a run to `dagster-celery`
workers through a real Redis broker, with the Dagster instance on a real PostgreSQL server and
every asset value and prompt version in a bucket (the GCS emulator), since each step may run on
another machine. The workers load the test code location (support/fake_location.py: the
product's definitions with the scripted LLM), configured from the same environment. A step that
fails on a worker fails the run with the step and the error named; a step whose process is
killed on a worker runs again; Redis or PostgreSQL restarted under a running step is ridden
through."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
import yaml

from promptopt_dagster import storage
from promptopt_dagster.core.study import load_study
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import (
    ITERATION_JOB,
    REPORT_JOB,
    DriveResult,
    RunFailedError,
    drive,
    execute,
)
from promptopt_dagster.partitions import evaluation_key
from promptopt_dagster.settings import Settings
from promptopt_dagster.step_starts import MAX_STEP_STARTS, SUBMITTED
from promptopt_dagster_tests.support.celery_workers import WORKER_CONFIG, CeleryWorkers
from promptopt_dagster_tests.support.fake_location import build_fake_definitions
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, emulator_environment
from promptopt_dagster_tests.support.postgres import PostgresServer, postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)
from promptopt_dagster_tests.support.redis_server import RedisServer
from promptopt_dagster_tests.support.scripted import gemini_responder, write_dataset, write_study
from promptopt_dagster_tests.support.scripted_cli import (
    ANSWERED_ENV,
    BLOCK_AT_ENV,
    BLOCKED_ENV,
    RELEASE_ENV,
    answered_keys,
    blocked_pids,
    wait_for_marker,
)
from promptopt_dagster_tests.support.vertex_server import FaultSchedule, VertexServer

pytestmark = pytest.mark.e2e

STUDY = "scripted"
BUCKET = "promptopt-celery"
# A function, so each process that loads it (the workers, the run's own process) builds the
# definitions from its environment at that moment.
LOCATION = "promptopt_dagster_tests.support.fake_location:defs_from_environment"
PRODUCT_LOCATION = "promptopt_dagster_tests.support.fake_location:product_defs_from_environment"
BROKER_PASSWORD = "r3dis-br0ker-5ecret"  # in the broker URL; must stay out of Dagster's storage and logs
EVALUATION_JOB = "evaluation_job"
BLOCK_AT = 3  # the primary call inside which a worker's step process is killed
VISIBILITY_S = 8  # the whole-worker test's visibility timeout
REDIS_DOWN_S = 4  # longer than the executor's poll interval (1 s) and the worker's step
# Timings and the champion's creation time differ from run to run; nothing else may.
TIMINGS: dict[str, Any] = {"wall_seconds": True, "llm_seconds": True, "champion": {"created_at"}}


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    with RedisServer(password=BROKER_PASSWORD) as server:
        yield server


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GcsEmulator]:
    monkeypatch.chdir(tmp_path)  # no stray .env
    with GcsEmulator(bucket=BUCKET) as emulator, emulator_environment(emulator):
        yield emulator


@dataclass
class Services:
    """What every test here runs on: its temporary folder (the working directory), its
    environment (which the workers inherit, the GCS emulator's bucket in it), Redis as broker and
    result backend, and a PostgreSQL database for the Dagster instance."""

    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    redis: RedisServer
    db_url: str

    @property
    def home(self) -> Path:
        """DAGSTER_HOME of the instance the runs on Celery use."""
        return self.tmp_path / "dagster"

    def instance(self) -> dg.DagsterInstance:
        """The instance the study's runs and the workers share (dispose it: `with`)."""
        return postgres_instance(self.db_url, self.home)


@pytest.fixture
def services(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bucket: GcsEmulator,
    redis: RedisServer,
    postgres_db_url: str,  # noqa: F811
) -> Services:
    return Services(tmp_path, monkeypatch, redis, postgres_db_url)


def use_settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> Settings:
    """Settings as every process reads them: from the environment, which the workers inherit."""
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return Settings()


def register(defs: dg.Definitions, tmp_path: Path, name: str = STUDY) -> str:
    """The study's dataset in the bucket, the study registered in the (bucket's) prompt store.
    Returns the dataset's URI."""
    folder = tmp_path / "study"
    folder.mkdir(exist_ok=True)
    dataset = f"gs://{BUCKET}/data/{name}.csv"
    path = write_study(folder, name, dataset=dataset, max_iterations=1)
    storage.write_bytes(dataset, (folder / f"{name}.csv").read_bytes())
    defs.resources["prompt_store"].store.register_study(load_study(path))  # type: ignore[attr-defined]
    return dataset


COMMON = {"GCS_BUCKET_NAME": BUCKET, "PYTHONUNBUFFERED": "1"}


def run_in_process(
    services: Services, build: Callable[[Settings], dg.Definitions] = build_fake_definitions, **extra: str
) -> dg.Definitions:
    """The reference: the study with every step in this process (assets under GCS_PREFIX ref), on
    the definitions `build` makes of the settings with `extra`."""
    reference = use_settings(
        services.monkeypatch,
        **COMMON,
        **extra,
        PROMPTOPT_HOME=str(services.tmp_path / "ref"),
        GCS_PREFIX="ref",
        DAGSTER_EXECUTOR="in_process",
    )
    ref_defs = build(reference)
    register(ref_defs, services.tmp_path)
    with dg.instance_for_test() as ref_instance:
        ref_runs = drive(ref_defs, ref_instance, STUDY)
    assert [r.job for r in ref_runs.runs] == [ITERATION_JOB, REPORT_JOB]
    return ref_defs


def celery_settings(services: Services, **extra: str) -> Settings:
    """Steps on Celery through the services' Redis, the instance in their `home`, assets under
    GCS_PREFIX celery."""
    return use_settings(
        services.monkeypatch,
        **COMMON,
        PROMPTOPT_HOME=str(services.tmp_path / "celery"),
        GCS_PREFIX="celery",
        DAGSTER_EXECUTOR="celery",
        DAGSTER_HOME=str(services.home),
        CELERY_BROKER_URL=services.redis.url(0),
        CELERY_BACKEND_URL=services.redis.url(1),
        **extra,
    )


def decisions(defs: dg.Definitions) -> list[dict[str, Any]]:
    records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
    return [record.model_dump(exclude=TIMINGS) for record in records]


def asset_files(prefix: str) -> set[str]:
    root = f"gs://{BUCKET}/{prefix}/assets"
    return {uri.removeprefix(root) for uri in storage.list_files(root, "**/*")}


def assert_as_in_one_process(defs: dg.Definitions, ref_defs: dg.Definitions) -> None:
    """The study on Celery took the reference's decisions and wrote the same asset files."""
    assert decisions(defs) == decisions(ref_defs)
    assert asset_files("celery") == asset_files("ref")


def assert_finished(instance: dg.DagsterInstance, result: DriveResult) -> None:
    """Every run of the study (its iteration and its report) succeeded."""
    assert [r.job for r in result.runs] == [ITERATION_JOB, REPORT_JOB]
    assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in instance.get_runs())


def iteration_step_starts(instance: dg.DagsterInstance) -> list[Any]:
    """The STEP_START events of the study's iteration run."""
    [iteration] = instance.get_runs(filters=dg.RunsFilter(job_name=ITERATION_JOB))
    return instance.all_logs(iteration.run_id, of_type=dg.DagsterEventType.STEP_START)


def test_a_study_runs_its_steps_on_celery_workers_with_the_in_process_results(
    tmp_path: Path, services: Services
) -> None:
    ref_defs = run_in_process(services)
    settings = celery_settings(services)
    with (
        services.instance() as instance,
        CeleryWorkers(2, dict(os.environ), cwd=tmp_path) as workers,
    ):
        defs = build_fake_definitions(settings)
        assert defs.resolve_job_def(ITERATION_JOB).executor_def.name == "celery"
        register(defs, tmp_path)
        heard: list[str] = []  # what `promptopt run` shows as each step starts
        result = drive(defs, instance, STUDY, location=LOCATION, on_step=heard.append)
        assert [r.job for r in result.runs] == [ITERATION_JOB, REPORT_JOB]

        # Every step ran in a worker's process (a pool process in a worker's process group),
        # none in this one, and the workers say so in the run's log.
        worker_pids = workers.pids
        runs = instance.get_runs()
        assert {run.job_name for run in runs} == {ITERATION_JOB, REPORT_JOB}
        step_keys = [
            e.step_key
            for run in runs
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        ]
        assert sorted(heard) == sorted(step_keys) and "current_prompt" in heard
        for run in runs:
            assert run.status == dg.DagsterRunStatus.SUCCESS
            starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            assert starts, run.job_name
            for entry in starts:
                pid = entry.dagster_event.pid  # type: ignore[union-attr]
                assert pid is not None and pid != os.getpid()
                assert os.getpgid(pid) in worker_pids, (entry.step_key, pid, worker_pids)
            engine = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
            hosts = {
                str(e.dagster_event.engine_event_data.metadata["Celery worker"].value)  # type: ignore[union-attr]
                for e in engine
                if "Celery worker" in e.dagster_event.engine_event_data.metadata  # type: ignore[union-attr]
            }
            assert hosts and all(h.split("@")[0] in workers.names for h in hosts), hosts

        # The same decisions as in one process, and the same asset files in the bucket.
        ours, theirs = decisions(defs), decisions(ref_defs)
        assert len(ours) == len(theirs)
        for mine, ref in zip(ours, theirs, strict=True):
            assert {k: v for k, v in mine.items() if ref.get(k) != v} == {}, "differs from in-process"
        assert decisions(defs)[0]["iteration"] == 0 and decisions(defs)[0]["stop"]
        assert asset_files("celery") == asset_files("ref")
        assert "/iteration_decision/study=scripted/iteration=0000.json" in asset_files("celery")

        # The broker URL carries a password: not in the run records or any event, not in the
        # workers' logs (Celery masks it), though it is in the workers' config module on disk.
        for run in instance.get_runs():
            assert BROKER_PASSWORD not in dg.serialize_value(run)
            for entry in instance.all_logs(run.run_id):
                assert BROKER_PASSWORD not in dg.serialize_value(entry)
        for name, log in workers.logs().items():
            assert "redis://:**@" in log and BROKER_PASSWORD not in log, name

        # A step that fails on a worker fails the run, and the driver names the step and our
        # error (from the events the worker sent back): here the dataset vanished after
        # registration, so the first step that reads it fails.
        dataset = register(defs, tmp_path, name="vanished")
        storage.delete(dataset)
        gone = r"step baseline_predictions: MissingObjectError: gs://\S+/vanished.csv does not exist"
        with pytest.raises(RunFailedError, match=gone):
            drive(defs, instance, "vanished", location=LOCATION)
        [failed] = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        [failure] = instance.all_logs(failed.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        assert os.getpgid(failure.dagster_event.pid) in worker_pids  # type: ignore[union-attr, arg-type]


@dataclass
class BlockedStudy:
    """A study driven on Celery workers in a background thread, its worker held inside a
    scripted primary LLM call (the one BLOCK_AT_ENV names) until `release` exists."""

    instance: dg.DagsterInstance
    defs: dg.Definitions
    workers: CeleryWorkers
    running: Future[DriveResult]
    marker: Path  # holds the pid of the process inside the blocked call
    release: Path


@contextlib.contextmanager
def study_blocked_in_a_step(
    services: Services, workers: int = 1, worker_config: Path = WORKER_CONFIG, **extra: str
) -> Iterator[BlockedStudy]:
    """The study on `workers` Celery workers, returned once a worker is inside the blocked LLM
    call; `extra` settings (e.g. BLOCK_AT_ENV) go to every process."""
    tmp_path = services.tmp_path
    marker, release = tmp_path / "in-llm-call", tmp_path / "release"
    settings = celery_settings(services, **{BLOCKED_ENV: str(marker), RELEASE_ENV: str(release)}, **extra)
    with (
        services.instance() as instance,
        CeleryWorkers(workers, dict(os.environ), cwd=tmp_path, config=worker_config) as started,
        ThreadPoolExecutor(1) as pool,
    ):
        defs = build_fake_definitions(settings)
        register(defs, tmp_path)
        running = pool.submit(drive, defs, instance, STUDY, location=LOCATION)

        def ended() -> str | None:
            return f"the run ended: {running.exception()}" if running.done() else None

        wait_for_marker(marker, ended, timeout=180)
        yield BlockedStudy(instance, defs, started, running, marker, release)


def baseline_starts_of_a_finished_study(instance: dg.DagsterInstance, result: DriveResult) -> list[Any]:
    """The STEP_START events of baseline_predictions in the study's iteration run, once every
    run of the study (its iteration and its report) succeeded."""
    assert_finished(instance, result)
    return [e for e in iteration_step_starts(instance) if e.step_key == "baseline_predictions"]


def test_a_redis_restart_while_a_step_runs_on_a_worker_is_ridden_through(services: Services) -> None:
    """Redis (broker and result backend, nothing persisted) goes down for REDIS_DOWN_S while the
    worker is inside the first primary LLM call, and comes back empty: the worker's result
    write and the executor's polls wait for it (CELERY_FAULT_SETTINGS), the next steps go
    through the new broker, and the study ends as in one process."""
    ref_defs = run_in_process(services)
    redis = services.redis
    # until the worker is inside baseline_predictions' first LLM call
    with study_blocked_in_a_step(services) as study:
        old_pid = redis.pid
        redis.stop()
        study.release.touch()  # the step finishes while Redis is down: its result write must wait
        time.sleep(REDIS_DOWN_S)  # the outage itself; the executor polls for results meanwhile
        redis.start()
        result = study.running.result(timeout=300)
        assert redis.pid != old_pid
        assert_finished(study.instance, result)
        assert_as_in_one_process(study.defs, ref_defs)


def test_a_worker_process_killed_inside_a_step_runs_the_step_again_without_repeating_answered_calls(
    tmp_path: Path, services: Services
) -> None:
    """The pool process running baseline_predictions is SIGKILLed inside its BLOCK_AT-th LLM
    call: Celery puts the task back on the queue (CELERY_FAULT_SETTINGS), a worker runs the step
    again, the replies answered before the kill come from the shared response cache (PostgreSQL,
    LLM_CACHE_URL), and the study ends as in one process."""
    ref_defs = run_in_process(services)
    answered = tmp_path / "answered.txt"
    with study_blocked_in_a_step(
        services,
        workers=2,
        LLM_CACHE_URL=services.db_url,
        **{BLOCK_AT_ENV: str(BLOCK_AT), ANSWERED_ENV: str(answered)},
    ) as study:
        victim = int(study.marker.read_text())
        assert os.getpgid(victim) in study.workers.pids and victim not in study.workers.pids  # a pool process
        deadline = time.monotonic() + 30  # the calls before the blocked one have their replies
        while len(answered_keys(answered)) < BLOCK_AT - 1:
            assert time.monotonic() < deadline, answered_keys(answered)
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
        before_kill = answered_keys(answered)  # what the killed process had answered
        study.release.touch()  # the step's next run goes through its calls
        result = study.running.result(timeout=300)

        instance = study.instance
        starts = baseline_starts_of_a_finished_study(instance, result)
        pids = [e.dagster_event.pid for e in starts]  # type: ignore[union-attr]
        assert len(pids) == 2 and pids[0] == victim and pids[1] != victim, pids
        # The same decisions; the iteration's call count leaves out the calls its killed step
        # process made (their replies came from the cache in the step's second run).
        [mine], [ref] = decisions(study.defs), decisions(ref_defs)
        usage = {"calls", "total_calls", "tokens", "total_tokens"}
        assert {k: v for k, v in mine.items() if k not in usage and ref.get(k) != v} == {}
        assert mine["calls"] == ref["calls"] - len(before_kill) == mine["total_calls"]
        assert asset_files("celery") == asset_files("ref")
        # No request reached the model twice: what was answered before the kill was not asked
        # again, and the killed call was answered once, in the step's second run.
        keys = answered_keys(answered)
        assert len(before_kill) >= BLOCK_AT - 1 and keys[: len(before_kill)] == before_kill
        assert len(keys) == len(set(keys)), "a request reached the model twice"


def next_blocked_process(study: BlockedStudy, seen: list[int], timeout: float = 120) -> int:
    """The pid of a process that reached the blocked LLM call (its marker) and is not in `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        if fresh := blocked_pids(study.marker) - set(seen):
            return fresh.pop()
        assert not study.running.done(), f"the run ended: {study.running.exception()}"
        assert time.monotonic() < deadline, f"no new process reached the blocked call in {timeout:.0f} s"
        time.sleep(0.05)


def test_a_step_whose_process_dies_at_every_start_fails_the_run_instead_of_running_forever(
    services: Services,
) -> None:
    """Every process that runs baseline_predictions is SIGKILLed inside its first LLM call (a
    step that runs out of memory each time): each time Celery puts the task back on the queue,
    until the workers refuse a start beyond MAX_STEP_STARTS (step_starts.StepStartLimit); the
    run fails naming the step, and the step is not started again."""
    with study_blocked_in_a_step(services) as study:
        killed: list[int] = []
        while len(killed) < MAX_STEP_STARTS:
            victim = next_blocked_process(study, killed)
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        refused = rf"step baseline_predictions was started {MAX_STEP_STARTS} times and never finished"
        try:
            with pytest.raises(RunFailedError, match=refused):
                study.running.result(timeout=180)
        finally:
            study.release.touch()  # a start beyond the limit finishes, so teardown does not hang

        [run] = study.instance.get_runs()
        assert run.status == dg.DagsterRunStatus.FAILURE
        starts = [
            e
            for e in study.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
            if e.step_key == "baseline_predictions"
        ]
        assert [e.dagster_event.pid for e in starts] == killed  # type: ignore[union-attr]
        assert blocked_pids(study.marker) == set(killed)  # no fourth start


def short_visibility_worker_config(folder: Path, seconds: int) -> Path:
    """deploy/celery/worker.yaml with a visibility timeout of `seconds`, swept for every second
    (the Redis transport's defaults sweep about every 100 s)."""
    config = yaml.safe_load(WORKER_CONFIG.read_text())
    options = config["execution"]["config"]["config_source"]["broker_transport_options"]
    options.update(visibility_timeout=seconds, unacked_restore_interval=1, unacked_restore_throttle=1)
    path = folder / "worker-short-visibility.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_whole_worker_killed_inside_a_step_hands_the_step_to_another_worker(
    tmp_path: Path, services: Services
) -> None:
    """Every process of the worker running baseline_predictions is SIGKILLed inside its first
    LLM call (a lost machine): nothing of it is left to hand the task back, so the other worker
    takes it once the visibility timeout (CELERY_VISIBILITY_TIMEOUT_S) has passed, and the
    study ends as in one process."""
    ref_defs = run_in_process(services)
    config = short_visibility_worker_config(tmp_path, VISIBILITY_S)
    with study_blocked_in_a_step(
        services,
        workers=2,
        worker_config=config,
        CELERY_VISIBILITY_TIMEOUT_S=str(VISIBILITY_S),
    ) as study:
        victim = int(study.marker.read_text())
        lost = os.getpgid(victim)
        [survivor] = set(study.workers.pids) - {lost}
        os.killpg(lost, signal.SIGKILL)
        killed_at = time.time()
        study.release.touch()
        result = study.running.result(timeout=300)

        instance = study.instance
        starts = baseline_starts_of_a_finished_study(instance, result)
        assert len(starts) == 2 and starts[0].dagster_event.pid == victim  # type: ignore[union-attr]
        assert os.getpgid(starts[1].dagster_event.pid) == survivor  # type: ignore[union-attr, arg-type]
        # handed over by the timeout, not before it: the timeout runs from the task's delivery to
        # the lost worker, which came after the executor submitted it (and before the kill, by as
        # long as the worker took to reach the LLM call)
        submission = SUBMITTED.format(step="baseline_predictions")
        engine = instance.all_logs(starts[0].run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
        [submitted] = [e.timestamp for e in engine if e.message.startswith(submission)]
        handed_over = starts[1].timestamp
        assert handed_over > killed_at
        assert handed_over - submitted >= VISIBILITY_S - 1, (handed_over - submitted, killed_at - submitted)
        assert_as_in_one_process(study.defs, ref_defs)


def test_a_postgres_restart_while_a_step_runs_on_a_worker_is_ridden_through(
    services: Services,
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    """The instance's PostgreSQL server restarts while a worker is inside the first primary LLM
    call: the worker's and the executor's next writes (fresh connections) reach the restarted
    server, and the study ends as in one process, each step run once."""
    ref_defs = run_in_process(services)
    with study_blocked_in_a_step(services) as study:
        old_pid = postgres_server.pid
        postgres_server.restart()
        study.release.touch()
        result = study.running.result(timeout=300)
        assert postgres_server.pid != old_pid
        assert_finished(study.instance, result)
        steps = [entry.step_key for entry in iteration_step_starts(study.instance)]
        assert len(steps) == len(set(steps)), steps
        assert_as_in_one_process(study.defs, ref_defs)


def test_the_shards_of_one_evaluation_run_at_once_on_different_workers(
    tmp_path: Path, services: Services
) -> None:
    """A 20-row dataset in shards of 5 (EVALUATION_SHARD_ROWS) on two workers: each worker's
    step process is held inside its first LLM call until both are, so two shards of the same
    evaluation are inside LLM calls at once in two processes; then the run merges all four."""
    marker, release = tmp_path / "in-llm-call", tmp_path / "release"
    settings = celery_settings(
        services, EVALUATION_SHARD_ROWS="5", **{BLOCKED_ENV: str(marker), RELEASE_ENV: str(release)}
    )
    with (
        services.instance() as instance,
        CeleryWorkers(2, dict(os.environ), cwd=tmp_path) as workers,
        ThreadPoolExecutor(1) as pool,
    ):
        defs = build_fake_definitions(settings)
        register(defs, tmp_path)
        folder = tmp_path / "rows"
        folder.mkdir()
        storage.write_bytes(
            f"{settings.datasets_uri}/fresh.csv", write_dataset(folder / "fresh.csv", rows=20).read_bytes()
        )
        instance.add_dynamic_partitions("prompt_version", [f"{STUDY}:{STUDY}-seed"])
        instance.add_dynamic_partitions("dataset", ["fresh.csv"])
        key = str(evaluation_key(f"{STUDY}:{STUDY}-seed", "fresh.csv"))
        running = pool.submit(execute, defs, instance, EVALUATION_JOB, key, {}, location=LOCATION)

        # both workers' step processes inside an LLM call at once (each blocks on its first)
        deadline = time.monotonic() + 180
        while len(blocked_pids(marker)) < 2:
            assert not running.done(), f"the run ended: {running.exception()}"
            assert time.monotonic() < deadline, f"processes inside an LLM call: {blocked_pids(marker)}"
            time.sleep(0.05)
        in_calls = blocked_pids(marker)
        assert {os.getpgid(pid) for pid in in_calls} == set(workers.pids)  # one in each worker
        release.touch()
        running.result(timeout=300)

        [run] = instance.get_runs()
        starts = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)
        shard_pids = {
            e.step_key: e.dagster_event.pid  # type: ignore[union-attr]
            for e in starts
            if "evaluate_evaluation_shard" in (e.step_key or "")
        }
        assert len(shard_pids) == 4 and in_calls <= set(shard_pids.values())
        [mat] = [
            e.asset_materialization
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        ]
        meta = {k: v.value for k, v in mat.metadata.items()}  # type: ignore[union-attr]
        assert meta["shards"] == 4 and meta["rows"] == 20 and meta["failed_rows"] == 0
        parts = storage.list_files(str(meta["predictions"]), "*.parquet")
        assert [p.rsplit("/", 1)[1] for p in parts] == [f"part-0000{i}-of-00004.parquet" for i in range(4)]


def test_a_study_on_workers_with_30_percent_of_vertex_calls_failing_ends_as_a_clean_run(
    tmp_path: Path, services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real Vertex client on the workers, against the fake Vertex server failing a
    deterministic 30% of all generateContent attempts (429 with Retry-After, 500, timeouts,
    malformed replies): the study ends with the decisions and asset files of the same study run
    in one process against the server without faults, and no prediction row carries an error."""
    with VertexServer(responder=gemini_responder) as server:
        vertex = {
            "VERTEX_PROJECT_ID": "celery-project",
            "VERTEX_API_ENDPOINT": server.base_url,
            "VERTEX_ACCESS_TOKEN": "celery-token",
            "VERTEX_BATCH_MODE": "online",
            "VERTEX_TIMEOUT_S": "1.0",
            "VERTEX_BACKOFF_INITIAL_S": "0.05",
            "VERTEX_BACKOFF_MAX_S": "0.5",
            "NO_GCE_CHECK": "true",
        }
        ref_defs = run_in_process(services, build_definitions, **vertex)
        clean_requests = len(server.generate_requests())

        server.clear()
        server.schedule = schedule = FaultSchedule(rate=0.3, retry_after=0.2)
        settings = celery_settings(services, **vertex)
        with (
            services.instance() as instance,
            CeleryWorkers(2, dict(os.environ), cwd=tmp_path) as workers,
        ):
            defs = build_definitions(settings)
            register(defs, tmp_path)
            result = drive(defs, instance, STUDY, location=PRODUCT_LOCATION)
            assert [r.job for r in result.runs] == [ITERATION_JOB, REPORT_JOB]
            for run in instance.get_runs():
                for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START):
                    assert os.getpgid(entry.dagster_event.pid) in workers.pids  # type: ignore[union-attr, arg-type]
            predictions = [
                pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))
                for uri in storage.list_files(f"gs://{BUCKET}/celery/assets", "**/*.parquet")
            ]
        faulty_requests = len(server.generate_requests())
        with capsys.disabled():
            print(
                f"\nclean, in process: {clean_requests} generateContent requests; faulty, on 2 workers: "
                f"{faulty_requests}, injected {dict(schedule.injected)}"
            )
        assert {"429", "500", "timeout", "malformed_json"} <= set(schedule.injected)
        assert faulty_requests > clean_requests  # the failed attempts were retried
        assert predictions and all(frame["error"].isna().all() for frame in predictions)
        assert_as_in_one_process(defs, ref_defs)
