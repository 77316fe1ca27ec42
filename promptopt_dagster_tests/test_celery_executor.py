"""Steps on workers: DAGSTER_EXECUTOR=celery sends every step of a run to `dagster-celery`
workers through a real Redis broker, with the Dagster instance on a real PostgreSQL server and
every asset value and prompt version in a bucket (the GCS emulator), since each step may run on
another machine (support/celery_study.py). Each step runs in a worker's process with the
results of one process; a step that fails on a worker fails the run with the step and the error
named; the shards of one evaluation run at once on several workers; 30% of Vertex calls failing
changes nothing."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dagster as dg
import pandas as pd
import psutil
import pytest

from promptopt_dagster import storage
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import ITERATION_JOB, REPORT_JOB, RunFailedError, drive, execute
from promptopt_dagster.partitions import evaluation_key
from promptopt_dagster_tests.support.celery_study import (
    BROKER_PASSWORD,
    BUCKET,
    LOCATION,
    PRODUCT_LOCATION,
    STUDY,
    Services,
    assert_as_in_one_process,
    asset_files,
    celery_settings,
    decisions,
    register,
    run_in_process,
)
from promptopt_dagster_tests.support.celery_workers import CeleryWorkers
from promptopt_dagster_tests.support.fake_location import build_fake_definitions
from promptopt_dagster_tests.support.scripted import gemini_responder, write_dataset
from promptopt_dagster_tests.support.scripted_cli import BLOCKED_ENV, RELEASE_ENV, blocked_pids
from promptopt_dagster_tests.support.vertex_faults import FaultSchedule
from promptopt_dagster_tests.support.vertex_server import VertexServer

pytestmark = pytest.mark.e2e
pytest_plugins = ["promptopt_dagster_tests.support.celery_study"]

EVALUATION_JOB = "evaluation_job"


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

        # Each worker's main process imported the code location and its libraries before it
        # forked the pool that ran the steps (`imports` in deploy/celery/worker.yaml): the
        # steps' parent, which runs no step itself, has scikit-learn's compiled modules mapped.
        step_pids = {e.dagster_event.pid for run in runs  # type: ignore[union-attr]
                     for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_START)}
        for parent in {psutil.Process(pid).ppid() for pid in step_pids if pid is not None}:
            assert "/sklearn/" in Path(f"/proc/{parent}/maps").read_text(), parent

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
