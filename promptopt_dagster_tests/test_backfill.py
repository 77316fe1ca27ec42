"""Evaluations over other datasets: chunked core, sensors, assets, comparison, start_study job."""

from __future__ import annotations

import json
import re
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest

from promptopt_dagster.assets.backfill import BACKFILL_ASSETS, DatasetsResource
from promptopt_dagster.assets.launch import StartStudyConfig, start_study_job
from promptopt_dagster.core import evaluation_catalog, sharded_evaluation, version_comparison
from promptopt_dagster.core.scoring import evaluator_for
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.errors import DatasetError
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.partitions import evaluation_key
from promptopt_dagster.sensors import (
    evaluation_comparison_sensor,
    new_dataset_sensor,
    new_prompt_version_sensor,
    new_study_sensor,
)
from promptopt_dagster_tests.support.pipeline import Pipeline, materialize_iteration
from promptopt_dagster_tests.support.pipeline import tick as tick_study
from promptopt_dagster_tests.support.scripted import primary_responder, write_dataset

FORMAT_RULE = "Answer with one of: positive, negative."


def datasets_dir(p: Pipeline) -> Path:
    folder = p.root.parent / "datasets"
    folder.mkdir(exist_ok=True)
    return folder


def resources(
    p: Pipeline, auto: bool = False, chunk_rows: int = 7, shard_rows: int = 10_000
) -> dict[str, object]:
    datasets = DatasetsResource(
        uri=str(datasets_dir(p)), auto_evaluate=auto, chunk_rows=chunk_rows, shard_rows=shard_rows
    )
    return {**p.resources(), "datasets": datasets}


def tick(p: Pipeline, sensor: dg.SensorDefinition, cursor: str | None = None, **kw: bool) -> dg.SensorResult:
    ctx = dg.build_sensor_context(instance=p.instance, resources=resources(p, **kw), cursor=cursor)
    result = sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        p.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
    return result


def reason(result: dg.SensorResult) -> str:
    return result.skip_reason.skip_message if result.skip_reason else ""


def info_for(path: Path) -> evaluation_catalog.DatasetInfo:
    return evaluation_catalog.inspect_dataset(path.name, str(path))


def dataset_as(fmt: str, tmp_path: Path, rows: int = 23) -> Path:
    """The scripted sentiment dataset of `rows` rows written as tmp_path/more.<fmt> (csv, jsonl or
    parquet), every value a string."""
    frame = pd.read_csv(write_dataset(tmp_path / "src.csv", rows=rows), dtype=str)
    path = tmp_path / f"more.{fmt}"
    {
        "csv": lambda: frame.to_csv(path, index=False),
        "jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        "parquet": lambda: frame.to_parquet(path),
    }[fmt]()
    return path


# --- core -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_evaluate_dataset_streams_chunks_and_scores_every_row(
    pipeline: Pipeline, tmp_path: Path, fmt: str
) -> None:
    study = pipeline.study
    path = dataset_as(fmt, tmp_path)
    llm = ScriptedLLM(primary_responder)
    good = study.seed_prompt_state().child(FORMAT_RULE, "{review}")
    evaluation = sharded_evaluation.Evaluation(
        "scripted:x", study, good, info_for(path), str(tmp_path / "out")
    )
    summary = sharded_evaluation.evaluate_dataset(llm, evaluator_for(study), evaluation, chunk_rows=5)
    assert summary.rows == 23 and summary.chunks == 5 and llm.calls == 23
    assert summary.scores["exact_match"] == 1.0 and 0.99 < summary.scores["f1"] <= 1.0
    table = pq.read_table(summary.predictions_uri)
    [part] = sorted((tmp_path / "out" / "predictions").iterdir())
    assert table.num_rows == 23 and pq.ParquetFile(part).metadata.num_row_groups == 5
    assert table.column("row_id").to_pylist()[:2] == ["1", "2"]
    seed = sharded_evaluation.evaluate_dataset(
        llm,
        evaluator_for(study),
        sharded_evaluation.Evaluation(
            "s", study, study.seed_prompt_state(), info_for(path), str(tmp_path / "o2")
        ),
    )
    assert seed.scores["exact_match"] == 0.0  # the chatty seed never answers with the bare label
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == 23


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_shards_cover_every_row_once_and_add_up_to_the_unsharded_evaluation(
    pipeline: Pipeline, tmp_path: Path, fmt: str
) -> None:
    study = pipeline.study
    info = info_for(dataset_as(fmt, tmp_path))
    prompt = study.seed_prompt_state().child(FORMAT_RULE, "{review}")

    def every_third_wrong(request: ChatRequest) -> str:
        row = int(re.search(r"#(\d+)", request.messages[-1].content).group(1))  # type: ignore[union-attr]
        return "neutral" if row % 3 == 0 else primary_responder(request)

    llm = ScriptedLLM(every_third_wrong)
    evaluator = evaluator_for(study)
    whole = sharded_evaluation.evaluate_dataset(
        llm, evaluator, sharded_evaluation.Evaluation("v", study, prompt, info, str(tmp_path / "one"))
    )
    assert evaluation_catalog.count_rows(info) == 23
    shards = sharded_evaluation.plan_shards(23, 10)
    assert [(s.start, s.stop) for s in shards] == [(0, 10), (10, 20), (20, 23)]
    three = sharded_evaluation.Evaluation("v", study, prompt, info, str(tmp_path / "three"))
    # a two-shard evaluation of before leaves parts the three-shard one must replace
    for old in sharded_evaluation.plan_shards(23, 12):
        sharded_evaluation.evaluate_shard(llm, evaluator, three, old, chunk_rows=4)
    results = [
        sharded_evaluation.evaluate_shard(llm, evaluator, three, s, chunk_rows=4)
        for s in reversed(shards)  # the order shards finish in does not matter
    ]
    assert [r.rows for r in results] == [3, 10, 10] and [r.chunks for r in results] == [1, 3, 3]
    merged = sharded_evaluation.merge_shards(three, results)
    assert merged.rows == 23 and merged.chunks == 7
    assert merged.scores == pytest.approx(whole.scores) and 0 < merged.scores["exact_match"] < 1
    assert sorted(p.name for p in (tmp_path / "three" / "predictions").iterdir()) == [
        f"part-0000{i}-of-00003.parquet" for i in range(3)
    ]
    table = (
        pq.read_table(merged.predictions_uri).to_pandas().sort_values("row_id", key=lambda c: c.astype(int))
    )
    expected = pq.read_table(whole.predictions_uri).to_pandas()
    assert table["row_id"].tolist() == [str(i) for i in range(1, 24)] == expected["row_id"].tolist()
    assert table["prediction"].tolist() == expected["prediction"].tolist()
    with pytest.raises(DatasetError, match="do not cover the dataset"):
        sharded_evaluation.merge_shards(three, results[:2])
    assert len(sharded_evaluation.shards_for(prompt, study, info, 10)) == 3
    header_only = tmp_path / "header.csv"
    header_only.write_text("id,review,label\n")
    with pytest.raises(DatasetError, match="no data rows"):
        sharded_evaluation.shards_for(prompt, study, info_for(header_only), 10)


def test_sidecar_renames_columns_and_names_the_reference(pipeline: Pipeline, tmp_path: Path) -> None:
    study = pipeline.study
    frame = pd.read_csv(write_dataset(tmp_path / "src.csv", rows=10), dtype=str)
    path = tmp_path / "renamed.csv"
    frame.rename(columns={"review": "text", "label": "gold", "id": "key"}).to_csv(path, index=False)
    missing = evaluation_catalog.missing_columns(study.seed_prompt_state(), study, info_for(path))
    assert missing == ["review", "label"]
    (tmp_path / "renamed.yaml").write_text(
        "columns: {text: review}\nreference_column: gold\nid_column: key\n"
    )
    info = info_for(path)
    assert evaluation_catalog.missing_columns(study.seed_prompt_state(), study, info) == []
    good = study.seed_prompt_state().child(FORMAT_RULE, "{review}")
    summary = sharded_evaluation.evaluate_dataset(
        ScriptedLLM(primary_responder),
        evaluator_for(study),
        sharded_evaluation.Evaluation("v", study, good, info, str(tmp_path / "o")),
    )
    assert summary.scores["exact_match"] == 1.0
    assert pq.read_table(summary.predictions_uri).column("row_id").to_pylist()[0] == "r000"


def test_missing_columns_is_a_clear_error(pipeline: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    pd.DataFrame({"question": ["1+1"], "answer": ["2"]}).to_csv(path, index=False)
    with pytest.raises(DatasetError, match=r"\['review', 'label'\]"):
        sharded_evaluation.evaluate_dataset(
            ScriptedLLM(primary_responder),
            evaluator_for(pipeline.study),
            sharded_evaluation.Evaluation(
                "scripted:scripted-seed",
                pipeline.study,
                pipeline.study.seed_prompt_state(),
                info_for(path),
                str(tmp_path / "o"),
            ),
        )
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="could not read dataset"):
        info_for(bad)


# --- Dagster ----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_sensors_register_datasets_and_prompt_versions_then_backfill_compares(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    folder = datasets_dir(p)
    write_dataset(folder / "fresh.csv", rows=15)
    pd.DataFrame({"question": ["1+1"], "answer": ["2"]}).to_csv(folder / "arith.csv", index=False)
    (folder / "broken.jsonl").write_text('{"review": "x", "label": \n')
    (folder / "empty.csv").write_text("")

    versions = tick(p, new_prompt_version_sensor)
    assert p.instance.get_dynamic_partitions("prompt_version") == ["scripted:scripted-seed"]
    assert not versions.run_requests  # backfilled from the UI unless auto_evaluate is on

    first = tick(p, new_dataset_sensor)
    assert p.instance.get_dynamic_partitions("dataset") == ["fresh.csv"]  # the others are skipped
    again = tick(p, new_dataset_sensor, cursor=first.cursor)
    assert "no new dataset" in reason(again)  # cursor: reported once

    # The problems show on a tick: a cursorless tick reports each bad file and why.
    fresh_tick = tick(p, new_dataset_sensor)
    for needle in ("broken.jsonl", "empty.csv", "arith.csv", "needs ['review', 'label']"):
        assert needle in reason(fresh_tick)

    # Iteration 0 accepts a prompt: a new prompt version, evaluated over existing datasets.
    tick_study(p, new_study_sensor)
    materialize_iteration(p, 0)
    auto = tick(p, new_prompt_version_sensor, auto=True)
    accepted = p.store.load_record("scripted", 0).accepted_id
    [req] = auto.run_requests
    assert req.partition_key == evaluation_key(f"scripted:{accepted}", "fresh.csv")
    assert req.run_key and req.run_key.startswith(f"evaluate/scripted:{accepted}/fresh.csv/")

    keys = [evaluation_key(v, "fresh.csv") for v in p.instance.get_dynamic_partitions("prompt_version")]
    for key in keys:
        dg.materialize(
            BACKFILL_ASSETS[:1], partition_key=str(key), instance=p.instance, resources=resources(p)
        )
    comparison = tick(p, evaluation_comparison_sensor)
    [cmp_req] = comparison.run_requests
    assert reason(tick(p, evaluation_comparison_sensor, cursor=comparison.cursor)) == "no new evaluation"
    result = dg.materialize(BACKFILL_ASSETS[1:], instance=p.instance, resources=resources(p))
    [mat] = result.asset_materializations_for_node("evaluation_comparison")
    table = mat.metadata["comparison"].value
    scores = {(r.data["prompt_version"], r.data["metric"]): r.data["value"] for r in table.records}
    assert scores[("scripted:scripted-seed", "exact_match")] == 0.0
    assert scores[(f"scripted:{accepted}", "exact_match")] == 1.0
    assert "fresh.csv / exact_match" in mat.metadata["by_prompt_version"].value
    assert cmp_req.run_key == f"comparison/{comparison.cursor}"


def test_a_dataset_is_evaluated_in_one_step_per_shard_and_merged_into_one_materialization(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    p.store.register_study(p.study)
    write_dataset(datasets_dir(p) / "fresh.csv", rows=15)
    p.instance.add_dynamic_partitions("prompt_version", ["scripted:scripted-seed"])
    p.instance.add_dynamic_partitions("dataset", ["fresh.csv"])
    key = str(evaluation_key("scripted:scripted-seed", "fresh.csv"))
    calls = p.llm.inner("primary").calls
    result = dg.materialize(
        BACKFILL_ASSETS[:1], partition_key=key, instance=p.instance, resources=resources(p, shard_rows=6)
    )
    steps = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"]
    shard_steps = sorted(s for s in steps if "evaluate_evaluation_shard" in s)
    assert shard_steps == [f"prompt_evaluation.evaluate_evaluation_shard[shard_{i}]" for i in range(3)]
    [mat] = result.asset_materializations_for_node("prompt_evaluation")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["shards"] == 3 and meta["rows"] == 15 and meta["failed_rows"] == 0
    assert p.llm.inner("primary").calls - calls == 15  # every row once
    folder = Path(meta["predictions"])
    assert pd.read_parquet(folder)["row_id"].astype(int).sort_values().tolist() == list(range(1, 16))

    # evaluated again in one shard: the three parts give way to one, nothing asked twice
    dg.materialize(BACKFILL_ASSETS[:1], partition_key=key, instance=p.instance, resources=resources(p))
    assert [f.name for f in folder.iterdir()] == ["part-00000-of-00001.parquet"]
    assert p.llm.inner("primary").calls - calls == 15  # the response cache answered


def test_prompt_version_not_applicable_to_a_dataset_is_recorded_not_failed(pipeline: Pipeline) -> None:
    """The seed over a dataset without its template's columns: a successful materialization that
    says not applicable and names the columns, and a comparison row that says the same; an
    unreadable dataset still fails its run."""
    p = pipeline
    p.store.register_study(p.study)
    pd.DataFrame({"question": ["1+1"], "answer": ["2"]}).to_csv(datasets_dir(p) / "arith.csv", index=False)
    (datasets_dir(p) / "broken.parquet").write_bytes(b"not parquet")
    p.instance.add_dynamic_partitions("prompt_version", ["scripted:scripted-seed"])
    p.instance.add_dynamic_partitions("dataset", ["arith.csv", "broken.parquet"])
    calls = p.llm.inner("primary").calls
    result = dg.materialize(
        BACKFILL_ASSETS[:1],
        partition_key=str(evaluation_key("scripted:scripted-seed", "arith.csv")),
        instance=p.instance,
        resources=resources(p),
    )
    assert result.success and p.llm.inner("primary").calls == calls
    [mat] = result.asset_materializations_for_node("prompt_evaluation")
    meta = {k: v.value for k, v in mat.metadata.items()}
    assert meta["applicable"] is False and meta["missing_columns"] == ["review", "label"]
    assert meta["dataset_columns"] == ["question", "answer"]
    assert meta["status"] == "not applicable: lacks review, label"

    [cmp] = dg.materialize(
        BACKFILL_ASSETS[1:], instance=p.instance, resources=resources(p)
    ).asset_materializations_for_node("evaluation_comparison")
    [row] = [r.data for r in cmp.metadata["comparison"].value.records]
    assert row["value"] is None and row["status"] == meta["status"] and row["metric"] == "exact_match"
    assert list(row)[:4] == ["prompt_version", "dataset", "metric", "value"]
    assert cmp.metadata["not_applicable"].value == 1
    assert "| n/a" in cmp.metadata["by_prompt_version"].value

    broken = dg.materialize(
        BACKFILL_ASSETS[:1],
        partition_key=str(evaluation_key("scripted:scripted-seed", "broken.parquet")),
        instance=p.instance,
        resources=resources(p),
        raise_on_error=False,
    )
    assert not broken.success
    [failure] = [e for e in broken.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "could not read dataset" in failure.step_failure_data.user_failure_data.description


def test_comparison_pivot_marks_not_applicable_pairs() -> None:
    def summary(version: str, dataset: str, **kw: object) -> sharded_evaluation.EvaluationSummary:
        fields: dict[str, object] = {
            "prompt_version": version,
            "study": "s",
            "prompt_id": version.split(":")[1],
            "dataset": dataset,
            "rows": 3,
            "failed_rows": 0,
            "target_metric": "exact_match",
            "scores": {"exact_match": 0.5, "f1": 0.75},
            "usage": {},
            "predictions_uri": "",
            "seconds": 0.0,
            "chunks": 1,
        }
        return sharded_evaluation.EvaluationSummary.model_validate(fields | kw)

    summaries = [
        summary("s:a", "x.csv"),
        summary("s:b", "x.csv", applicable=False, rows=0, scores={}, missing_columns=["review"]),
    ]
    frame = version_comparison.comparison_frame(summaries)
    assert list(frame.columns) == version_comparison.COMPARISON_COLUMNS
    assert len(frame) == 3 and frame["value"].isna().sum() == 1
    pivot = version_comparison.comparison_pivot(frame).set_index("prompt_version")
    assert pivot.loc["s:a"].tolist() == ["0.500", "0.750"]
    assert pivot.loc["s:b"].tolist() == ["n/a", "n/a"]


def test_auto_evaluate_requests_only_compatible_pairs_with_stable_run_keys(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_prompt_version_sensor)
    write_dataset(datasets_dir(p) / "a.csv", rows=6)
    first = tick(p, new_dataset_sensor, auto=True)
    [req] = first.run_requests
    second = tick(p, new_dataset_sensor, auto=True)  # no cursor: same file, same run key
    assert [r.run_key for r in second.run_requests] == [req.run_key]
    write_dataset(datasets_dir(p) / "a.csv", rows=9)  # a changed file is evaluated again
    third = tick(p, new_dataset_sensor, cursor=first.cursor, auto=True)
    assert [r.run_key for r in third.run_requests] != [req.run_key] and len(third.run_requests) == 1


# --- start_study ------------------------------------------------------------------------------


def test_start_study_config_mirrors_study_config_and_documents_every_field() -> None:
    def check(config: type[dg.Config], model: type) -> None:
        assert set(config.model_fields) == set(model.model_fields)
        for name, field in config.model_fields.items():
            assert field.description, f"{config.__name__}.{name} has no description"

    from promptopt_dagster.assets import launch
    from promptopt_dagster.core import study

    check(StartStudyConfig, StudyConfig)
    check(launch.SeedPromptConfig, study.SeedPrompt)
    check(launch.ModelSettingsConfig, study.ModelConfig)
    check(launch.SplitsConfig, study.Splits)


def start_config(**overrides: object) -> dict:
    op = {
        "name": "launched",
        "dataset": "launch.csv",
        "input_columns": ["review"],
        "reference_column": "label",
        "seed_prompt": {"output_prompt": "{review}"},
        "metric_options": {"exact_match": {"ignore_case": True}},
        **overrides,
    }
    return {"ops": {"register_study": {"config": op}}}


def test_start_study_registers_through_study_config(pipeline: Pipeline) -> None:
    p = pipeline
    write_dataset(datasets_dir(p) / "launch.csv", rows=12)
    res = resources(p)
    result = start_study_job.execute_in_process(run_config=start_config(), instance=p.instance, resources=res)
    assert result.success and result.output_for_node("register_study") == "launched"
    study = p.store.load_study("launched")
    assert study.dataset == str(datasets_dir(p) / "launch.csv")
    assert study.metric_options == {"exact_match": {"ignore_case": True}}

    bad = start_study_job.execute_in_process(
        run_config=start_config(name="other", seed_prompt={"output_prompt": "{text}"}),
        instance=p.instance,
        resources=res,
        raise_on_error=False,
    )
    [failure] = [e for e in bad.all_events if e.event_type_value == "STEP_FAILURE"]
    description = failure.step_failure_data.user_failure_data.description
    assert "seed_prompt" in description and "['text']" in description
    missing = start_study_job.execute_in_process(
        run_config=start_config(name="nodata", dataset="nowhere.csv"),
        instance=p.instance,
        resources=res,
        raise_on_error=False,
    )
    assert not missing.success and "nodata" not in p.store.studies()
