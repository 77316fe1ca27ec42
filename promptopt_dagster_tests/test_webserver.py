"""The UI flows against a real `dagster dev` (webserver + daemon), through its GraphQL API:
launch a study from the start_study job and watch the sensors carry it to its stop; drop a
dataset and watch the sensor register it; backfill it and find the comparison filled in."""

from __future__ import annotations

from typing import Any

import pytest
from dagster_graphql import DagsterGraphQLClientError

from promptopt_dagster.partitions import evaluation_key, study_iteration_key
from promptopt_dagster_tests.support.dagster_dev import (
    BAD_DATASET,
    NO_COLUMNS_DATASET,
    STUDY,
    Backfilled,
    DagsterDev,
    StudyRun,
    tick_text,
    wait_for,
)

pytestmark = pytest.mark.e2e

pytest_plugins = ["promptopt_dagster_tests.support.ui_fixtures"]

ENDED = ("SUCCESS", "FAILURE", "CANCELED")


def test_launched_study_is_carried_to_its_stop_by_the_sensors(
    dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    server = dagster_dev
    assert server.client.get_run_status(finished_study.start_run_id).value == "SUCCESS"
    decisions = {m["partition"]: m["metadata"] for m in server.materializations("iteration_decision")}
    first, last = decisions[study_iteration_key("uistudy", 0)], decisions[max(decisions)]
    assert first["accepted"] is True and first["val_score"] > first["incumbent_val_score"]
    assert last["stop"] is True and last["stop_reason"] in ("patience", "max_iterations")
    # The UI lists exactly the iterations that ran: no missing partition for a finished study.
    assert sorted(server.partition_keys("study_iteration")) == sorted(decisions)
    stats = server.query(
        """query($key: AssetKeyInput!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
             partitionStats { numMaterialized numPartitions numFailed numMaterializing } } } }""",
        {"key": {"path": ["iteration_decision"]}},
    )["assetNodeOrError"]["partitionStats"]
    assert stats["numPartitions"] == stats["numMaterialized"] == len(decisions)

    # The last iteration's run may still be running its asset checks (they follow
    # iteration_decision) when the report lands: wait for every run to end.
    def ended() -> list[dict[str, Any]] | None:
        found = server.runs("iteration_job")
        return found if all(r["status"] in ENDED for r in found) else None

    runs = wait_for(ended, 60, "every iteration run to end")
    # Every iteration after the first was requested by continue_study_sensor, and its tick
    # says why the study stopped.
    sensors = {t["value"] for r in runs for t in r["tags"] if t["key"] == "dagster/sensor_name"}
    assert sensors == {"new_study_sensor", "continue_study_sensor"} and len(runs) == len(decisions)
    assert all(r["status"] == "SUCCESS" for r in runs)
    # The report says how the study ended, in one line.
    [report] = [m["metadata"] for m in server.materializations("study_report") if m["partition"] == "uistudy"]
    assert report["summary"].startswith(f"study uistudy stopped: {last['stop_reason']} (")
    assert report["stop_reason"] == last["stop_reason"]
    wait_for(
        lambda: any(
            "uistudy: stopped after iteration" in tick_text(t)
            for t in server.sensor_ticks("continue_study_sensor", limit=25)
        ),
        60,
        "a continue_study_sensor tick giving the stop reason",
    )


def test_start_study_with_an_invalid_config_is_refused_before_it_runs(dagster_dev: DagsterDev) -> None:
    bad = {"ops": {"register_study": {"config": {"name": "x", "dataset": "x.csv"}}}}
    try:
        dagster_dev.client.submit_job_execution("start_study", run_config=bad)
    except DagsterGraphQLClientError as exc:  # the launchpad's config check names the missing fields
        assert "input_columns" in str(exc.body or exc) or "RunConfigValidationInvalid" in str(exc)
    else:
        raise AssertionError("an incomplete start_study config was accepted")


def test_new_dataset_is_registered_then_backfilled_into_the_comparison(
    dagster_dev: DagsterDev, backfilled: Backfilled
) -> None:
    server = dagster_dev
    assert "uistudy:uistudy-seed" in backfilled.versions
    registered = server.partition_keys("dataset")
    assert backfilled.dataset in registered and BAD_DATASET not in registered
    assert f"skipped {BAD_DATASET}: could not read dataset" in backfilled.bad_dataset_report
    assert backfilled.backfill_status in ("COMPLETED", "COMPLETED_SUCCESS")
    evaluated = {m["partition"] for m in server.materializations("prompt_evaluation")}
    assert evaluated >= {str(evaluation_key(v, backfilled.dataset)) for v in backfilled.versions}
    exact = {
        r["prompt_version"]: r["value"]
        for r in backfilled.comparison
        if r["metric"] == "exact_match" and r["dataset"] == backfilled.dataset
    }
    assert exact["uistudy:uistudy-seed"] == 0.0 and max(exact.values()) == 1.0


def test_a_backfill_over_a_dataset_without_the_seeds_columns_ends_green_as_not_applicable(
    dagster_dev: DagsterDev, backfilled: Backfilled
) -> None:
    """The backfill of the seed over a dataset lacking its template's columns succeeds: the seed is
    recorded as not applicable (no score, the missing columns named), in the evaluation's
    metadata and in the comparison."""
    assert backfilled.bad_backfill_status in ("COMPLETED", "COMPLETED_SUCCESS")
    assert dagster_dev.backfill_failures(backfilled.bad_backfill_id) == []
    seed = f"{STUDY}:{STUDY}-seed"
    status = "not applicable: lacks review, label"
    [evaluation] = [
        m["metadata"]
        for m in dagster_dev.materializations("prompt_evaluation")
        if m["partition"] == str(evaluation_key(seed, NO_COLUMNS_DATASET))
    ]
    assert evaluation["applicable"] is False and evaluation["status"] == status
    [row] = [
        r for r in backfilled.comparison if (r["prompt_version"], r["dataset"]) == (seed, NO_COLUMNS_DATASET)
    ]
    assert row.get("value") is None and row["status"] == status
