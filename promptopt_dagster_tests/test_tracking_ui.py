"""What the MLflow UI shows of a tracked study: run durations that are the iterations' wall time,
a saved runs-table view, readable prompt versions (commit messages, rounded scores) and each
LLM call as a span of the iteration's trace. One scripted study, driven once for the module."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from mlflow import MlflowClient

from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.definitions import ASSETS, TRACKING_ASSETS
from promptopt_dagster.driver import drive
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.tracking import experiment_name, prompt_name
from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline, with_tracking

STUDY = "ui_study"


@dataclasses.dataclass
class Tracked:
    pipeline: Pipeline
    client: MlflowClient
    experiment_id: str
    records: list[IterationRecord]
    iteration_runs: list[Any]  # mlflow Run, by iteration


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracked]:
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with dg.DagsterInstance.ephemeral(tempdir=str(root / "dagster")) as instance:
        (root / "p").mkdir()
        p = with_tracking(make_pipeline(root / "p", instance, name=STUDY), uri, root / "outbox.jsonl")
        p.store.register_study(p.study)
        drive(p.defs, p.instance, STUDY)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(experiment_name(STUDY))
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], "tags.`promptopt.kind` = 'iteration'")
        by_name = {r.info.run_name: r for r in runs}
        records = p.store.records(STUDY)
        iteration_runs = [by_name[f"iteration-{r.iteration:04d}"] for r in records]
        yield Tracked(p, client, exp.experiment_id, records, iteration_runs)


@pytest.mark.e2e  # a whole scripted study
def test_an_iteration_run_lasts_the_iterations_wall_time(tracked: Tracked) -> None:
    for record, run in zip(tracked.records, tracked.iteration_runs, strict=True):
        assert record.wall_seconds is not None and record.wall_seconds > 0
        [dagster_run_id] = [run.data.tags["dagster.run_id"]]
        started = tracked.pipeline.instance.get_run_stats(dagster_run_id).start_time
        assert started is not None
        assert run.info.start_time == pytest.approx(started * 1000, abs=2)
        duration_s = (run.info.end_time - run.info.start_time) / 1000
        assert duration_s == pytest.approx(record.wall_seconds, abs=0.01)
        candidates = tracked.client.search_runs(
            [tracked.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
        )
        assert len(candidates) == len(record.candidates) > 0
        for cand in candidates:  # a candidate's run spans its iteration, not its logging
            assert (cand.info.start_time, cand.info.end_time) == (run.info.start_time, run.info.end_time)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _prompt_versions(tracked: Tracked) -> list[Any]:
    versions = tracked.client.search_prompt_versions(prompt_name(STUDY))
    return sorted(getattr(versions, "prompt_versions", versions), key=lambda v: int(v.version))


@pytest.mark.e2e  # a whole scripted study
def test_prompt_versions_say_what_changed_with_rounded_scores(tracked: Tracked) -> None:
    versions = _prompt_versions(tracked)
    accepted = [r for r in tracked.records if r.accepted]
    assert accepted, "the scripted study accepts a candidate"
    assert len(versions) == 1 + len(accepted)
    assert (
        versions[0].commit_message == f"seed prompt, val {round(tracked.records[0].incumbent_val_score, 4)}"
    )
    for version, record in zip(versions[1:], accepted, strict=True):
        head = version.commit_message.split("\n\n")[0]
        winner = next(c for c in record.candidates if c.candidate_id == record.accepted_id)
        before, after = round(record.incumbent_val_score, 4), round(record.champion_val_score, 4)
        assert head.startswith(f"iteration {record.iteration}: {winner.strategy}")
        assert head.endswith(f", val {before} → {after}")
    for version in versions:
        for key in ("val_score", "train_score"):
            decimals = version.tags[key].partition(".")[2]
            assert len(decimals) <= 4, (key, version.tags[key])


def test_describe_change_names_the_parts_that_changed() -> None:
    from promptopt_dagster.core.prompt_state import PromptState
    from promptopt_dagster.tracking.prompt_versions import commit_message, describe_change

    def composed(demos: int, rule: str | None) -> PromptState:
        parts = {"instruction": "Classify.", "output_prompt": "{review}", "format_rule": rule}
        parts |= {"demo_ids": [str(i) for i in range(demos)], "answer_parser": "raw"}
        return PromptState(
            id=f"p{demos}", system_prompt="Classify.", output_prompt="{review}", metadata={"parts": parts}
        )

    assert describe_change(composed(0, None), composed(4, None)) == "+4 demos"
    assert describe_change(composed(2, None), composed(1, "One word.")) == "-1 demo, format rule added"
    assert describe_change(composed(1, None), composed(1, None)) == ""
    message = commit_message(2, "add_examples", "+4 demos", 0.612345, 0.83, "Demos fix the labels.")
    assert message == "iteration 2: add_examples (+4 demos), val 0.6123 → 0.83\n\nDemos fix the labels."


@pytest.mark.e2e  # a whole scripted study
def test_the_experiment_has_a_saved_runs_view_whose_columns_every_run_has(tracked: Tracked) -> None:
    from promptopt_dagster.tracking.layout import (
        EXPERIMENT_NOTE_TAG,
        RUNS_VIEW_ID,
        RUNS_VIEW_METRICS,
        RUNS_VIEW_NAME,
        RUNS_VIEW_TAGS,
    )

    tags = tracked.client.get_experiment(tracked.experiment_id).tags
    # the envelope MLflow's runs page reads (name, numeric createdAt, state as a JSON string)
    envelope = json.loads(tags[f"mlflow.sharedViewState.{RUNS_VIEW_ID}"])
    assert envelope["name"] == RUNS_VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    columns = state["selectedColumns"]
    assert "attributes.`Duration`" in columns and "metrics.`val_score`" in columns
    assert len(columns) <= 8, "a view to read at a glance"
    assert RUNS_VIEW_NAME in tags[EXPERIMENT_NOTE_TAG]

    for run in tracked.iteration_runs:
        assert set(RUNS_VIEW_METRICS) <= set(run.data.metrics), run.info.run_name
        assert set(RUNS_VIEW_TAGS) <= set(run.data.tags), run.info.run_name
    record, run = tracked.records[0], tracked.iteration_runs[0]
    winner = next((c for c in record.candidates if c.candidate_id == record.accepted_id), None)
    expected_train = winner.train_score if winner else record.incumbent_train_score
    assert run.data.metrics["train_score"] == pytest.approx(expected_train)
    candidates = tracked.client.search_runs([tracked.experiment_id], "tags.`promptopt.kind` = 'candidate'")
    assert candidates
    for cand in candidates:
        assert {"train_score", "accepted", "llm_calls"} <= set(cand.data.metrics)
        assert set(RUNS_VIEW_TAGS) <= set(cand.data.tags)


@pytest.mark.e2e  # a whole scripted study
def test_each_iteration_logs_its_llm_calls_as_one_trace(tracked: Tracked) -> None:
    from promptopt_dagster.tracking.traces import MAX_TRACE_SPANS

    for record, run in zip(tracked.records, tracked.iteration_runs, strict=True):
        traces = tracked.client.search_traces(locations=[tracked.experiment_id], run_id=run.info.run_id)
        assert len(traces) == 1, run.info.run_name
        [trace] = traces
        assert trace.info.trace_metadata["mlflow.sourceRun"] == run.info.run_id
        spans = trace.data.spans
        calls = [s for s in spans if s.span_type == "CHAT_MODEL"]
        groups = [s for s in spans if s.span_type == "CHAIN"]
        assert len(groups) == 1 + len(record.candidates)  # the incumbent and each candidate
        skipped = int(trace.info.tags["promptopt.calls_skipped"])
        assert len(calls) + skipped == trace.data.spans[0].inputs["calls"] and len(calls) <= MAX_TRACE_SPANS
        assert len(calls) > 0
        for span in calls:
            assert span.inputs["messages"] and "reply" in span.outputs
            assert span.attributes["row_id"] and span.end_time_ns >= span.start_time_ns
    # re-materializing the tracking step adds no second trace
    dg.materialize(
        [*ASSETS, *TRACKING_ASSETS],
        selection=["iteration_tracking"],
        partition_key=str(study_iteration_key(STUDY, 0)),
        instance=tracked.pipeline.instance,
        resources=dict(tracked.pipeline.defs.resources),
    )
    run0 = tracked.iteration_runs[0].info.run_id
    assert len(tracked.client.search_traces(locations=[tracked.experiment_id], run_id=run0)) == 1
