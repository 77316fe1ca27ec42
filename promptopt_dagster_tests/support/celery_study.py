"""What the Celery executor tests share: a study driven on `dagster-celery` workers through a
real Redis broker, the Dagster instance on a real PostgreSQL server, every asset value and
prompt version in a bucket (the GCS emulator); the same study run in one process as the
reference; and a study held inside a step's LLM call, for the fault tests. The workers load the
test code location (support/fake_location.py: the product's definitions with the scripted LLM),
configured from the same environment. A pytest plugin:
``pytest_plugins = ["promptopt_dagster_tests.support.celery_study"]`` gives a test module the
`services` fixture (and `redis`, `bucket` and the PostgreSQL ones it uses)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from promptopt_dagster import storage
from promptopt_dagster.core.study import load_study
from promptopt_dagster.driver import (
    ITERATION_JOB,
    REPORT_JOB,
    DriveResult,
    drive,
)
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.celery_workers import WORKER_CONFIG, CeleryWorkers
from promptopt_dagster_tests.support.fake_location import build_fake_definitions
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, emulator_environment
from promptopt_dagster_tests.support.postgres import postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)
from promptopt_dagster_tests.support.redis_server import RedisServer
from promptopt_dagster_tests.support.scripted import write_study
from promptopt_dagster_tests.support.scripted_cli import (
    BLOCKED_ENV,
    RELEASE_ENV,
    blocked_pids,
    wait_for_marker,
)

STUDY = "scripted"
BUCKET = "promptopt-celery"
# A function, so each process that loads it (the workers, the run's own process) builds the
# definitions from its environment at that moment.
LOCATION = "promptopt_dagster_tests.support.fake_location:defs_from_environment"
PRODUCT_LOCATION = "promptopt_dagster_tests.support.fake_location:product_defs_from_environment"
BROKER_PASSWORD = "r3dis-br0ker-5ecret"  # in the broker URL; must stay out of Dagster's storage and logs
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
    """What every Celery test runs on: its temporary folder (the working directory), its
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


def next_blocked_process(study: BlockedStudy, seen: list[int], timeout: float = 120) -> int:
    """The pid of a process that reached the blocked LLM call (its marker) and is not in `seen`."""
    deadline = time.monotonic() + timeout
    while True:
        if fresh := blocked_pids(study.marker) - set(seen):
            return fresh.pop()
        assert not study.running.done(), f"the run ended: {study.running.exception()}"
        assert time.monotonic() < deadline, f"no new process reached the blocked call in {timeout:.0f} s"
        time.sleep(0.05)
