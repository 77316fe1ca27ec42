"""Faults in production settings (support/production.py): a storage outage in the middle of a
run fails it cleanly and the driver resumes; a 429 burst is survived; 30% of Vertex calls failing
ends as a clean run does. Against local protocol servers, as test_production_e2e.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import dagster as dg
import pytest

from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import ITERATION_JOB, REPORT_JOB, RunFailedError, RunOutcome, drive
from promptopt_dagster.partitions import parse_key, study_iteration_key
from promptopt_dagster_tests.support.production import PREFIX, STUDY, TOKEN, Production
from promptopt_dagster_tests.support.vertex_faults import Fault, FaultSchedule
from promptopt_dagster_tests.support.vertex_requests import wants_json

pytest_plugins = ["promptopt_dagster_tests.support.production"]


@pytest.mark.e2e
def test_storage_outage_mid_run_fails_cleanly_and_the_driver_resumes(
    prod: Production, caplog: pytest.LogCaptureFixture
) -> None:
    """The bucket goes away while iteration 1 calls the model: that run fails with a clear
    message, leaves no partial object, and after the bucket is back the driver finishes."""
    caplog.set_level(logging.INFO)
    defs = build_definitions(prod.settings(VERTEX_BATCH_MODE="online"))
    prod.register(defs)
    armed = threading.Event()

    def stop_storage_once() -> None:
        if armed.is_set():
            armed.clear()
            prod.emulator.stop()

    prod.model.on_primary_call = stop_storage_once

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job == ITERATION_JOB and parse_key(outcome.partition_key)[1] == 0:
            armed.set()  # the next primary call is iteration 1's baseline inference

    with dg.instance_for_test() as instance:
        with pytest.raises(RunFailedError) as excinfo:
            drive(defs, instance, STUDY, on_done=on_done)
        message = str(excinfo.value)
        assert "step baseline_predictions" in message and TOKEN not in message
        assert not prod.emulator.running
        [failed] = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
        assert failed.tags["study"] == STUDY
        # the step failed on writing its output, with the storage layer's actionable message
        [failure] = [
            e
            for e in instance.all_logs(failed.run_id)
            if e.dagster_event is not None and e.dagster_event.event_type_value == "STEP_FAILURE"
        ]
        assert failure.dagster_event is not None and failure.dagster_event.step_key == "baseline_predictions"
        chain, error = [], failure.dagster_event.event_specific_data.error  # type: ignore[union-attr]
        while error is not None:
            chain.append(error.message)
            error = error.cause
        reported = "\n".join(chain)
        assert "storage unreachable: could not write" in reported and prod.emulator.endpoint in reported

        prod.emulator.start()  # same port, same data directory
        objects = prod.objects()
        names = {prod.relative(uri) for uri in objects}
        prod.assert_complete(objects)
        # current_prompt was stored before the outage; nothing after it was
        assert f"{PREFIX}/assets/current_prompt/study={STUDY}/iteration=0001.json" in names
        assert not [n for n in names if "iteration=0001" in n and "current_prompt" not in n]
        assert f"{PREFIX}/studies/{STUDY}/iterations/0001.json" not in names
        assert f"{PREFIX}/studies/{STUDY}/iterations/0000.json" in names

        calls_before = prod.model.primary_calls
        result = drive(defs, instance, STUDY)
        assert [r.job for r in result.runs] == [ITERATION_JOB, REPORT_JOB]
        assert result.runs[0].partition_key == str(study_iteration_key(STUDY, 1))
        records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
        assert [r.iteration for r in records] == [0, 1] and records[1].stop_reason == "max_iterations"
        # the failed run's replies were kept in the response cache: its rows are not paid for twice
        assert prod.metadata(instance, "baseline_predictions", 1)["llm_cached_calls"] > 0
        assert prod.model.primary_calls > calls_before  # the candidates and the test report
        prod.assert_complete(prod.objects())
        prod.assert_token_nowhere(instance, caplog.text)


@pytest.mark.e2e
def test_a_429_burst_during_the_study_is_survived(prod: Production, caplog: pytest.LogCaptureFixture) -> None:
    """Eight 429s with Retry-After (whose message echoes the caller's Authorization header, as a
    misbehaving proxy might) in iteration 1: every row still gets its answer, the study finishes,
    and the token shows up nowhere."""
    caplog.set_level(logging.INFO)
    retry_after = 0.3
    defs = build_definitions(prod.settings(VERTEX_BATCH_MODE="online"))
    prod.register(defs)

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job == ITERATION_JOB and parse_key(outcome.partition_key)[1] == 0:
            prod.server.inject(
                Fault(
                    "status",
                    status=429,
                    retry_after=retry_after,
                    times=8,
                    message="quota exceeded for {authorization}",
                )
            )

    with dg.instance_for_test() as instance:
        result = drive(defs, instance, STUDY, on_done=on_done)
        assert [r.job for r in result.runs] == [ITERATION_JOB, ITERATION_JOB, REPORT_JOB]
        requests = prod.server.generate_requests()
        limited = [r for r in requests if r.status == 429]
        assert len(limited) == 8
        # each refused request came back, and not before the server's Retry-After
        for refused in limited:
            later = [r for r in requests if r.body == refused.body and r.started > refused.started]
            assert later and later[-1].status == 200  # a retry may be refused again, the last one is not
            assert later[0].started - refused.finished >= retry_after * 0.9
        meta = prod.metadata(instance, "baseline_predictions", 1)
        assert meta["llm_failed_calls"] == 0 and meta["llm_calls"] > 0
        records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
        assert records[-1].stop_reason == "max_iterations"
        assert "429" in caplog.text  # the retries were logged ...
        prod.assert_token_nowhere(instance, caplog.text)  # ... without the echoed token


# Decision fields that depend on the model's answers only (not on time, retries or cost).
_DECISION = {
    "iteration",
    "incumbent_id",
    "incumbent_train_score",
    "incumbent_val_score",
    "candidates",
    "accepted",
    "accepted_id",
    "champion_val_score",
    "best_val_score",
    "stop",
    "stop_reason",
    "calls",
    "tokens",
}


def _study_outcome(defs: dg.Definitions, instance: dg.DagsterInstance) -> dict[str, Any]:
    """What a study decided and predicted: its decisions, champion, test scores and every
    prediction row (id, split, prediction, error) of every iteration."""
    records = defs.resources["prompt_store"].store.records(STUDY)  # type: ignore[attr-defined]
    report = defs.load_asset_value("study_report", partition_key=STUDY, instance=instance)
    predictions = {}
    for record in records:
        key = str(study_iteration_key(STUDY, record.iteration))
        for asset in ("baseline_predictions", "candidate_predictions"):
            frame = defs.load_asset_value(asset, partition_key=key, instance=instance)
            columns = [c for c in ("candidate_id", "row_id", "split", "prediction", "error") if c in frame]
            predictions[(asset, record.iteration)] = frame[columns].to_dict(orient="records")
    return {
        "decisions": [r.model_dump(include=_DECISION) for r in records],
        "champion": records[-1].champion.model_dump(exclude={"created_at"}),
        "seed_test": report["seed_test"],
        "final_test": report["final_test"],
        "predictions": predictions,
    }


@pytest.mark.e2e
def test_a_study_with_30_percent_of_calls_failing_ends_as_a_clean_run_does(
    prod: Production, capsys: pytest.CaptureFixture[str]
) -> None:
    """429s with Retry-After, 500s, timeouts and malformed replies on a deterministic 30% of all
    generateContent attempts, for a whole study: the same decisions, champion, test scores and
    prediction rows as the same study without faults, and no row lost to an error."""
    outcomes, figures = [], []
    for name, schedule in (("clean", None), ("faulty", FaultSchedule(rate=0.3, retry_after=0.2))):
        prod.server.clear()
        prod.server.schedule = schedule
        settings = prod.settings(
            PROMPTOPT_HOME=prod.tmp / name,
            GCS_PREFIX=name,
            VERTEX_BATCH_MODE="online",
            VERTEX_TIMEOUT_S=1.0,
            VERTEX_BACKOFF_INITIAL_S=0.05,
            VERTEX_BACKOFF_MAX_S=0.5,
        )
        defs = build_definitions(settings)
        prod.register(defs)
        started = time.monotonic()
        with dg.instance_for_test() as instance:
            result = drive(defs, instance, STUDY)
            wall = time.monotonic() - started
            assert [r.job for r in result.runs] == [ITERATION_JOB, ITERATION_JOB, REPORT_JOB]
            outcomes.append(_study_outcome(defs, instance))
            errors = [
                row["error"]
                for frame in outcomes[-1]["predictions"].values()
                for row in frame
                if row["error"] is not None
            ]
            assert not errors, f"{name}: rows lost to errors: {errors}"
            for iteration in (0, 1):
                for asset in ("baseline_predictions", "candidate_predictions"):
                    assert prod.metadata(instance, asset, iteration)["llm_failed_calls"] == 0
        requests = prod.server.generate_requests()
        bodies = {json.dumps(r.body, sort_keys=True) for r in requests}
        figures.append(
            f"{name}: {len(requests)} generateContent requests for {len(bodies)} distinct "
            f"calls ({sum(wants_json(json.loads(b)) for b in bodies)} in JSON mode) "
            f"({len(requests) - len(bodies)} retries, "
            f"{sum(r.status != 200 for r in requests)} answered with an error status), "
            f"injected {dict(schedule.injected) if schedule else {}}, wall {wall:.1f} s"
        )
    clean, faulty = outcomes
    with capsys.disabled():
        print("\n" + "\n".join(figures))
    assert schedule is not None and sum(schedule.injected.values()) > 0
    assert {"429", "500", "timeout", "malformed_json"} <= set(schedule.injected)
    rows = [row for frame in faulty["predictions"].values() for row in frame]
    assert rows and all(row["error"] is None for row in rows)
    assert faulty == clean
