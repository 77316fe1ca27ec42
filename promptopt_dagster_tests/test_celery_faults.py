"""Faults under steps on Celery workers (support/celery_study.py): a step whose process is
killed on a worker runs again without repeating answered LLM calls; a step that dies at every
start fails the run; a whole worker lost hands its step to another; Redis or PostgreSQL
restarted under a running step is ridden through."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import dagster as dg
import pytest
import yaml

from promptopt_dagster.driver import RunFailedError
from promptopt_dagster.step_starts import MAX_STEP_STARTS, SUBMITTED
from promptopt_dagster_tests.support.celery_study import (
    Services,
    assert_as_in_one_process,
    assert_finished,
    asset_files,
    baseline_starts_of_a_finished_study,
    decisions,
    iteration_step_starts,
    next_blocked_process,
    run_in_process,
    study_blocked_in_a_step,
)
from promptopt_dagster_tests.support.celery_workers import WORKER_CONFIG
from promptopt_dagster_tests.support.postgres import PostgresServer
from promptopt_dagster_tests.support.scripted_cli import (
    ANSWERED_ENV,
    BLOCK_AT_ENV,
    answered_keys,
    blocked_pids,
)

pytestmark = pytest.mark.e2e
pytest_plugins = ["promptopt_dagster_tests.support.celery_study"]

BLOCK_AT = 3  # the primary call inside which a worker's step process is killed
VISIBILITY_S = 8  # the whole-worker test's visibility timeout
REDIS_DOWN_S = 4  # longer than the executor's poll interval (1 s) and the worker's step


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
    postgres_server: PostgresServer,
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
