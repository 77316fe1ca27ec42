"""What the Dagster UI shows of a scripted study: the stop said once, the report's summary and
iteration table, rounded scores, candidate tables with their ids and column descriptions, and
prompts wrapped to the width of a metadata panel."""

from __future__ import annotations

import re

import dagster as dg
import pandas as pd
import pytest

from promptopt_dagster.assets.metadata import WRAP_CHARS, markdown_table, prompt_markdown, rounded, wrap
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.report import stop_summary
from promptopt_dagster.driver import drive
from promptopt_dagster_tests.support.pipeline import Pipeline


def materializations(p: Pipeline, asset: str) -> list[dg.AssetMaterialization]:
    records = p.instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
    return [r.asset_materialization for r in reversed(records) if r.asset_materialization]


@pytest.mark.e2e  # a whole scripted study
def test_the_stop_is_said_once_and_summarized_in_the_report(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    drive(p.defs, p.instance, "scripted")
    last = p.store.records("scripted")[-1]
    assert last.stop and last.stop_reason

    said = [
        (run.job_name, e.user_message)
        for run in p.instance.get_runs()
        for e in p.instance.all_logs(run.run_id)
        if e.user_message and "study scripted stopped:" in e.user_message
    ]
    assert len(said) == 1, said
    [(job, message)] = said
    assert job == "iteration_job" and message == stop_summary(last)
    assert message.startswith(f"study scripted stopped: {last.stop_reason} ({last.stop_message})")

    decision = materializations(p, "iteration_decision")[-1].metadata
    assert decision["stop"].value is True and decision["stop_reason"].value == last.stop_reason
    [report] = materializations(p, "study_report")
    meta = report.metadata
    assert meta["summary"].value == message and meta["stop_reason"].value == last.stop_reason
    assert f"best val {last.best_val_score:.4g}" in message


def test_stop_summary_says_why_and_the_best_score() -> None:
    record = IterationRecord.model_validate(
        {
            "study": "X",
            "iteration": 4,
            "incumbent_id": "a",
            "incumbent_train_score": 0.5,
            "incumbent_val_score": 0.5,
            "accepted": False,
            "champion": {"system_prompt": "", "output_prompt": "{q}"},
            "champion_val_score": 0.8333333,
            "best_val_score": 0.8333333,
            "iterations_without_improvement": 3,
            "calls": 1,
            "tokens": 1,
            "llm_seconds": 0.1,
            "total_calls": 1,
            "total_tokens": 1,
            "stop": True,
            "stop_reason": "patience",
            "stop_message": "no improvement for 3 iterations, every strategy tried",
        }
    )
    assert stop_summary(record) == (
        "study X stopped: patience (no improvement for 3 iterations, every strategy tried) after "
        "iteration 4; best val 0.8333"
    )


@pytest.mark.e2e  # a whole scripted study
def test_metadata_is_rounded_wrapped_and_explained(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    drive(p.defs, p.instance, "scripted")

    for asset in ("iteration_decision", "baseline_metrics", "candidate_prompts", "study_report"):
        for mat in materializations(p, asset):
            for key, value in mat.metadata.items():
                if isinstance(value, dg.FloatMetadataValue) and value.value is not None:
                    assert value.value == rounded(value.value), (asset, key, value.value)

    # The report's iteration table has every column filled, wall_seconds included.
    [report] = materializations(p, "study_report")
    table = report.metadata["iterations"].value
    assert "nan" not in table and "wall_seconds" in table
    assert all(r.wall_seconds and r.wall_seconds > 0 for r in p.store.records("scripted"))

    # candidate_metrics: a table keyed by the ids candidate_prompts shows, blanks explained.
    [prompts] = materializations(p, "candidate_prompts")[:1]
    [metrics] = materializations(p, "candidate_metrics")[:1]
    scores = metrics.metadata["scores"].value
    ids = [r.data["candidate_id"] for r in scores.records]
    assert prompts.metadata["candidate_ids"].value == ", ".join(ids)
    assert all(any(f"candidate {i} (" in k for k in prompts.metadata) for i in ids)
    columns = {c.name: c for c in scores.schema.columns}
    assert "blank" in str(columns["val_score"].description)
    assert "meta-model" in str(columns["predicted_score"].description)
    assert all(r.data["predicted_score"] is None for r in scores.records)  # no meta-model here
    assert any(r.data["val_score"] is None for r in scores.records)
    assert "stopped early" in str(columns["screened_rows"].description)
    assert all(1 <= r.data["screened_rows"] <= p.study.minibatch_size for r in scores.records)


def test_prompts_are_wrapped_in_code_blocks_and_tables_have_blanks() -> None:
    long_line = "Classify the sentiment of the review " * 10
    shown = prompt_markdown(long_line + "\nUse ``` nowhere.", "{review}").value
    assert max(len(line) for line in shown.splitlines()) <= WRAP_CHARS
    assert "````\n" in shown  # a fence longer than any backtick run in the prompt
    assert wrap("  " + "word " * 30).splitlines()[1].startswith("  word")
    table = markdown_table(pd.DataFrame({"score": [0.123456789, float("nan")], "id": ["a", None]}))
    assert "0.1235" in table and "nan" not in table and "None" not in table
    assert re.search(r"\|\s+\|\s+\|", table)  # the second row is blank
