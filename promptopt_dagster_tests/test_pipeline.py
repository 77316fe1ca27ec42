"""The iteration asset graph and its sensors, on an ephemeral instance with scripted LLMs."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from promptopt_dagster.driver import drive
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES
from promptopt_dagster.partitions import STUDY_ITERATION, study_iteration_key, study_iteration_keys
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline, materialize_iteration, tick


def decision_metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    [mat] = result.asset_materializations_for_node("iteration_decision")
    return {k: v.value for k, v in mat.metadata.items()}


def calls_in(result: dg.ExecuteInProcessResult, node: str) -> int:
    [mat] = result.asset_materializations_for_node(node)
    return int(mat.metadata["llm_calls"].value)


@pytest.mark.e2e
def test_sensors_start_continue_and_stop_for_the_right_reason(tmp_path: Path) -> None:
    with dg.instance_for_test() as instance:
        _sensors_start_continue_and_stop(make_pipeline(tmp_path, instance, max_iterations=6))


def _sensors_start_continue_and_stop(p: Pipeline) -> None:
    assert tick(p, new_study_sensor).skip_reason is not None  # nothing registered yet
    p.store.register_study(p.study)

    first = tick(p, new_study_sensor)
    [req] = first.run_requests
    assert req.partition_key == study_iteration_key("scripted", 0)
    assert p.instance.get_dynamic_partitions("study") == ["scripted"]
    assert p.instance.get_dynamic_partitions(STUDY_ITERATION) == ["scripted:0000"]
    # Until its run exists, the request repeats with the same run key (Dagster launches a run
    # key once); the partition is added once.
    [again] = tick(p, new_study_sensor).run_requests
    assert again.run_key == req.run_key
    assert p.instance.get_dynamic_partitions("study") == ["scripted"]

    r0 = materialize_iteration(p, 0)
    meta0 = decision_metadata(r0)
    assert meta0["accepted"] is True and meta0["stop"] is False
    assert meta0["val_score"] > meta0["incumbent_val_score"]
    champion = p.store.load_record("scripted", 0).champion
    assert "one of:" in champion.system_prompt

    [req1] = tick(p, continue_study_sensor).run_requests
    assert req1.partition_key == study_iteration_key("scripted", 1)
    assert p.instance.get_dynamic_partitions(STUDY_ITERATION) == ["scripted:0000", "scripted:0001"]

    r1 = materialize_iteration(p, 1)
    meta1 = decision_metadata(r1)
    # iteration 1 starts from iteration 0's champion, through the prompt store
    [prompt_mat] = r1.asset_materializations_for_node("current_prompt")
    assert prompt_mat.metadata["prompt_id"].value == champion.id
    # no improvement, but strategies are left untried on this champion: patience waits
    assert meta1["stop"] is False and not meta1["accepted"]
    record1 = p.store.load_record("scripted", 1)
    assert record1 is not None and 0 < len(record1.tried_on_champion) < len(STRATEGY_NAMES)

    iteration, meta = 1, meta1
    while not meta["stop"]:
        iteration += 1
        [req] = tick(p, continue_study_sensor).run_requests
        assert req.partition_key == study_iteration_key("scripted", iteration)
        meta = decision_metadata(materialize_iteration(p, iteration))
    last = p.store.load_record("scripted", iteration)
    assert last is not None and set(last.tried_on_champion) == set(STRATEGY_NAMES)
    assert meta["stop_reason"] == "patience" and iteration <= 3

    after = tick(p, continue_study_sensor)
    [report_req] = after.run_requests
    assert report_req.job_name == "report_job" and report_req.partition_key == "scripted"


def test_rematerializing_an_iteration_makes_no_new_llm_calls(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    first = materialize_iteration(p, 0)
    primary = p.llm.inner("primary")
    calls_before = primary.calls
    assert calls_in(first, "iteration_decision") > 0
    again = materialize_iteration(p, 0)
    assert primary.calls == calls_before
    assert calls_in(again, "iteration_decision") == 0
    assert calls_in(again, "baseline_predictions") == 0
    assert decision_metadata(again)["champion_id"] == decision_metadata(first)["champion_id"]


def test_driver_runs_the_study_to_its_report_and_resumes_as_a_no_op(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    result = drive(p.defs, p.instance, "scripted")
    jobs = [r.job for r in result.runs]
    assert jobs == ["iteration_job", "iteration_job", "report_job"]
    report = p.defs.load_asset_value("study_report", partition_key="scripted", instance=p.instance)
    assert report["final_test"]["exact_match"] > report["seed_test"]["exact_match"]
    assert [r["iteration"] for r in report["rows"]] == [0, 1]
    # a second drive of a finished study runs nothing
    assert drive(p.defs, p.instance, "scripted").runs == []


def test_a_stopped_study_has_a_partition_for_each_iteration_that_ran_and_no_other(
    tmp_path: Path,
) -> None:
    """Two studies side by side in one store: each has the iteration partitions of the
    iterations it ran, so the UI shows no missing iteration and "materialize missing" has nothing
    to run."""
    with dg.instance_for_test() as instance:
        short = make_pipeline(tmp_path, instance, max_iterations=1)
        longer = make_pipeline(tmp_path, instance, name="longer", max_iterations=2)
        ran: dict[str, list[int]] = {}
        for p in (short, longer):
            p.store.register_study(p.study)
            drive(p.defs, p.instance, p.study.name)
            ran[p.study.name] = sorted(r.iteration for r in p.store.records(p.study.name))
        assert ran == {"scripted": [0], "longer": [0, 1]}
        decided = instance.get_materialized_partitions(dg.AssetKey("iteration_decision"))
        for name, iterations in ran.items():
            keys = [study_iteration_key(name, i) for i in iterations]
            assert study_iteration_keys(instance, name) == keys
            assert set(keys) <= decided
        assert len(instance.get_dynamic_partitions(STUDY_ITERATION)) == sum(map(len, ran.values()))


def test_a_study_started_under_the_old_study_x_iteration_partitions_resumes(tmp_path: Path) -> None:
    """Up to 0.1.x iteration decisions were materialized under multi-partition keys
    ("0000|scripted"); the sensors still find them and carry the study on under the new keys."""
    with dg.instance_for_test() as instance:
        p = make_pipeline(tmp_path, instance)
        p.store.register_study(p.study)
        tick(p, new_study_sensor)
        decided = decision_metadata(materialize_iteration(p, 0))
    with dg.instance_for_test() as old:  # the instance as 0.1.x left it: the old keys only
        p = make_pipeline(tmp_path, old)
        old.add_dynamic_partitions("study", ["scripted"])
        old.add_dynamic_partitions("iteration", ["0000"])
        old.report_runless_asset_event(
            dg.AssetMaterialization(
                "iteration_decision",
                partition="0000|scripted",
                metadata={k: decided[k] for k in ("registration", "stop", "stop_message", "accepted")},
            )
        )
        assert not tick(p, new_study_sensor).run_requests  # iteration 0 is done
        [req] = tick(p, continue_study_sensor).run_requests
        assert req.partition_key == study_iteration_key("scripted", 1)
        assert old.get_dynamic_partitions(STUDY_ITERATION) == ["scripted:0001"]
        result = drive(p.defs, old, "scripted")
        assert [r.partition_key for r in result.runs] == ["scripted:0001", "scripted"]
        assert [r.iteration for r in p.store.records("scripted")] == [0, 1]


def test_stored_assets_are_readable_files(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    materialize_iteration(p, 0)
    files = sorted(f.relative_to(p.root / "assets").as_posix() for f in (p.root / "assets").rglob("*.*"))
    assert any(f.startswith("baseline_predictions/") and f.endswith(".parquet") for f in files), files
    assert any(f.startswith("iteration_decision/") and f.endswith(".json") for f in files), files
    assert not any(f.endswith((".pkl", ".pickle")) for f in files)


def test_missing_column_fails_the_run_and_leaves_no_half_written_iteration(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    df = pd.read_csv(p.study.dataset).drop(columns=["review"])
    df.to_csv(p.study.dataset, index=False)
    result = materialize_iteration(p, 0, raise_on_error=False)
    assert not result.success
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    cause = failure.event_specific_data.error.cause
    assert cause.cls_name == "DatasetError" and "review" in cause.message
    assert p.store.load_record("scripted", 0) is None
    assert not p.instance.get_materialized_partitions(dg.AssetKey("iteration_decision"))


def test_optimizer_garbage_is_reported_and_the_other_strategies_carry_the_iteration(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    p.llm.inner("optimizer").responder = lambda request: "I cannot do JSON, sorry"
    result = materialize_iteration(p, 0)
    record = p.store.load_record("scripted", 0)
    assert record is not None and record.accepted
    assert any("no usable JSON" in w for w in record.warnings)
    assert "reflect" not in [c.strategy for c in record.candidates]
    assert result.success
