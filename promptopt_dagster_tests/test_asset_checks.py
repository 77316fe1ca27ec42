"""Asset checks: the verdicts (core/checks.py) on good and bad values, and the checks as Dagster
runs them on a scripted study's partitions (assets/checks.py)."""

from __future__ import annotations

import re

import dagster as dg
import pandas as pd
import pytest

from promptopt_dagster.assets.checks import ITERATION_CHECK_SPECS
from promptopt_dagster.core import checks
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import CandidateScore
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.definitions import defs
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster_tests.support.pipeline import ITERATION_ASSETS, Pipeline, tick
from promptopt_dagster_tests.support.scripted import primary_responder

TRAIN = [
    ["The pasta was cold and the waiter ignored us all night", "negative"],
    ["Lovely staff, great coffee", "positive"],
]


def predictions(rows: list[tuple[str, str]], errors: int = 0, **extra: object) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["split", "row_id"])
    frame["error"] = [("timeout" if i < errors else None) for i in range(len(frame))]
    for key, value in extra.items():
        frame[key] = value
    return frame


# --- core/checks.py -----------------------------------------------------------------------------


def test_a_clean_prompt_passes_and_its_demonstrations_are_not_fragments() -> None:
    seed = PromptState(system_prompt="Classify the sentiment of the review.", output_prompt="{review}")
    assert checks.prompt_hygiene(seed, TRAIN).passed
    demos = "Examples:\nInput: The pasta was cold and the waiter ignored us all night\nOutput: negative"
    composed = seed.child(
        f"Classify the sentiment of the review.\n\n{demos}",
        "{review}",
        parts={"instruction": "Classify the sentiment of the review.", "output_prompt": "{review}"},
    )
    outcome = checks.prompt_hygiene(composed, TRAIN)
    assert outcome.passed, outcome.description


def test_a_placeholder_or_a_pasted_training_row_fails_the_prompt_check() -> None:
    bad = PromptState(
        system_prompt="Classify the sentiment of {review}.\nThe pasta was cold and the waiter ignored us.\n"
        "negative\nAnswer in one word.",
        output_prompt="{review}",
    )
    outcome = checks.prompt_hygiene(bad, TRAIN)
    assert not outcome.passed
    assert outcome.metadata["placeholders"] == ["{review}"]
    assert outcome.metadata["training_fragments"] == [
        "The pasta was cold and the waiter ignored us.",
        "negative",
    ]
    assert "unfilled placeholder(s) ['{review}']" in outcome.description
    assert "2 line(s) copied from training rows" in outcome.description


def test_a_line_without_a_word_is_not_reported_as_copied_from_training_rows() -> None:
    """The clean-up drops "OK" and "3kg" (no word of three letters), but they copy no row: a seed
    with such a line is not a training-row fragment. A short row fragment still is."""
    rows = [("11 kg", "g", "11000")]
    seed = PromptState(system_prompt="OK\n3kg\nConvert the quantity.", output_prompt="{quantity}")
    outcome = checks.prompt_hygiene(seed, rows)
    assert outcome.passed and outcome.metadata["training_fragments"] == [], outcome.description
    pasted = PromptState(system_prompt="11 kg; g\nConvert the quantity.", output_prompt="{quantity}")
    assert checks.prompt_hygiene(pasted, rows).metadata["training_fragments"] == ["11 kg; g"]


def test_predictions_must_cover_every_row_once_with_few_errors() -> None:
    expected = {"train": ["1", "2"], "val": ["3", "4", "5"]}
    rows = [("train", "1"), ("train", "2"), ("val", "3"), ("val", "4"), ("val", "5")]
    assert checks.prediction_coverage(predictions(rows), expected).passed
    missing = checks.prediction_coverage(predictions(rows[:-1] + [rows[0]]), expected)
    assert (
        not missing.passed
        and missing.metadata["missing_rows"] == 1
        and missing.metadata["repeated_rows"] == 1
    )
    assert "val/5" in missing.description
    failing = checks.prediction_coverage(predictions(rows, errors=1), expected)
    assert not failing.passed and failing.metadata["error_rate"] == 0.2
    assert "1 of 5 rows failed (20.0% > 10%)" in failing.description
    assert checks.prediction_coverage(predictions(rows, errors=1), expected, max_error_rate=0.25).passed


def test_candidates_cover_the_minibatch_and_validation_all_or_nothing() -> None:
    expected = {"train": ["1", "2"], "val": ["3"]}
    ok = predictions(
        [("train", "1"), ("train", "2"), ("val", "3"), ("train", "1"), ("train", "2")],
        candidate_id=["a", "a", "a", "b", "b"],
    )
    kw = {"group_by": "candidate_id", "all_or_none": ["val"]}
    assert checks.prediction_coverage(ok, expected, groups=["a", "b"], **kw).passed
    absent = checks.prediction_coverage(ok, expected, groups=["a", "b", "c"], **kw)
    assert not absent.passed and "c/train/1" in absent.description
    empty = predictions([], candidate_id=[])
    assert checks.prediction_coverage(empty, expected, groups=[], **kw).passed


def test_a_candidate_screened_in_part_passes_only_when_it_was_not_validated() -> None:
    """Screening stops early for a candidate that cannot match the incumbent: part of the
    minibatch and no validation rows is fine; part of the minibatch with validation rows is not."""
    expected = {"train": ["1", "2"], "val": ["3"]}
    kw = {"group_by": "candidate_id", "all_or_none": ["val"], "partial_unless": {"train": "val"}}
    stopped = predictions([("train", "1"), ("train", "1"), ("train", "2")], candidate_id=["a", "b", "b"])
    assert checks.prediction_coverage(stopped, expected, groups=["a", "b"], **kw).passed
    validated = predictions([("train", "1"), ("val", "3")], candidate_id=["a", "a"])
    outcome = checks.prediction_coverage(validated, expected, groups=["a"], **kw)
    assert not outcome.passed and "a/train/2" in outcome.description
    none = predictions([("train", "1")], candidate_id=["a"])
    assert not checks.prediction_coverage(none, expected, groups=["a", "b"], **kw).passed  # b: no rows


def test_champion_below_the_seed_fails() -> None:
    assert checks.champion_not_below_seed(0.5, 0.5, "p").passed
    below = checks.champion_not_below_seed(0.5, 0.4, "p")
    assert not below.passed and "0.4 is below the seed's 0.5" in below.description


def test_summaries_must_count_the_scored_and_predicted_rows() -> None:
    preds = predictions([("train", "1"), ("train", "2"), ("val", "3")])
    rows = [
        {"row_id": r, "split": s, "score": 1.0} for s, r in [("train", "1"), ("train", "2"), ("val", "3")]
    ]
    good = EvaluationMetrics(aggregates={"train": {"f1": 1.0, "n": 2}, "val": {"f1": 1.0, "n": 1}}, rows=rows)
    assert checks.incumbent_counts_match(good, preds).passed
    short = EvaluationMetrics(
        aggregates={"train": {"f1": 1.0, "n": 2}, "val": {"f1": 1.0, "n": 1}}, rows=rows[:2]
    )
    outcome = checks.incumbent_counts_match(short, preds)
    assert not outcome.passed and "val: summary 1, scored rows 0, predictions 1" in outcome.description

    cand_preds = predictions([("train", "1"), ("train", "2")], candidate_id="a")
    score = CandidateScore(candidate_id="a", strategy="s", prompt_chars=3, train_score=1.0, val_score=0.9)
    metrics = CandidateMetrics(
        aggregates={"a": {"train": {"f1": 1.0, "n": 2}}},
        scores=[score],
        rows=[{"candidate_id": "a", "row_id": r, "split": "train", "score": 1.0} for r in "12"],
    )
    mismatch = checks.candidate_counts_match(metrics, cand_preds)
    assert not mismatch.passed and mismatch.metadata["val_score_mismatch"] == ["a"]
    metrics.scores = [score.model_copy(update={"val_score": None})]
    assert checks.candidate_counts_match(metrics, cand_preds).passed


# --- Dagster --------------------------------------------------------------------------------------


def materialize_with_checks(p: Pipeline, iteration: int) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        ITERATION_ASSETS,
        partition_key=str(study_iteration_key(p.study.name, iteration)),
        instance=p.instance,
        resources=p.resources(),
    )


def verdicts(result: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


@pytest.mark.e2e  # a whole scripted study
def test_every_check_passes_on_a_scripted_study(pipeline: Pipeline) -> None:
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    for iteration in (0, 1):
        if iteration:
            tick(p, continue_study_sensor)  # adds the next iteration's partition
        found = verdicts(materialize_with_checks(p, iteration))
        assert set(found) == {spec.name for spec in ITERATION_CHECK_SPECS}
        failed = {name: e.description for name, e in found.items() if not e.passed}
        assert not failed, failed
        key = str(study_iteration_key(p.study.name, iteration))
        assert {e.partition for e in found.values()} == {key}  # each check on its asset's partition
    gain = found["champion_not_below_seed"].metadata["gain"].value
    assert isinstance(gain, float) and gain > 0  # iteration 0 accepted a better prompt


@pytest.mark.e2e  # a whole scripted study
def test_a_check_fails_loudly_when_predictions_fail(pipeline: Pipeline) -> None:
    """A third of the incumbent's rows fail at the LLM: the run still materializes the iteration,
    and the coverage check is red, saying how many rows failed."""
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)

    def flaky(request: ChatRequest) -> str:
        row = re.search(r"#(\d+)", request.messages[-1].content)  # reviews end with "(#<row>)."
        if row and int(row.group(1)) % 3 == 0:
            raise TimeoutError("the model did not answer")
        return primary_responder(request)

    p.llm.inner("primary").responder = flaky
    result = materialize_with_checks(p, 0)
    assert result.success
    found = verdicts(result)
    coverage = found["baseline_predictions_cover_every_row"]
    assert not coverage.passed and coverage.severity == dg.AssetCheckSeverity.ERROR
    assert "rows failed" in str(coverage.description) and coverage.metadata["error_rate"].value > 0.1
    assert found["baseline_metrics_match_rows"].passed


def test_the_product_definitions_register_the_checks_in_the_iteration_job() -> None:
    job = defs.resolve_job_def("iteration_job")
    names = {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    assert names == {spec.name for spec in ITERATION_CHECK_SPECS}
    for spec in ITERATION_CHECK_SPECS:
        assert spec.description and spec.partitions_def is not None
