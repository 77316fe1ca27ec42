"""Local `evaluate` metric modules and EvaluatorService, on hand-checked examples."""

from __future__ import annotations

import json
import time

import pytest

from promptopt_dagster.core.metrics import EvaluatorService, available_metrics, load_metric
from promptopt_dagster.errors import MetricError
from promptopt_dagster_tests.support.probe import probe_lines


def test_available_metrics_lists_the_shipped_modules() -> None:
    assert available_metrics() == ["accuracy", "bleu", "exact_match", "f1", "rouge"]


@pytest.mark.parametrize("name", ["accuracy", "bleu", "exact_match", "f1", "rouge"])
def test_each_module_returns_aggregate_and_python_float_scores(name: str) -> None:
    out = load_metric(name).compute(predictions=["the cat sat", "dog"], references=["the cat sat", "bird"])
    assert set(out) == {name, "scores"}
    assert type(out[name]) is float
    assert [type(s) for s in out["scores"]] == [float, float]
    json.dumps(out)  # no numpy floats left


def test_exact_match_plain_is_strict_except_surrounding_whitespace() -> None:
    result = EvaluatorService(["exact_match"]).evaluate(
        ["42", " 42 \n", "42.", "The answer is 42", "Positive"], ["42", "42", "42", "42", "positive"]
    )
    assert result.per_row["exact_match"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.aggregates == {"exact_match": pytest.approx(0.4)}
    assert result.n == 5


def test_exact_match_options() -> None:
    preds = ["Positive", "posi-tive!", "not  so\tgood", '"negative".', "`SPORT`"]
    refs = ["positive", "positive", "not so good", "negative", "SPORT"]

    def rows(**opts: bool) -> list[float]:
        svc = EvaluatorService(["exact_match"], {"exact_match": opts})
        return svc.evaluate(preds, refs).per_row["exact_match"].tolist()

    assert rows() == [0.0, 0.0, 0.0, 0.0, 0.0]
    assert rows(ignore_case=True) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert rows(ignore_punctuation=True) == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert rows(ignore_whitespace=True) == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert rows(strip_quotes=True) == [0.0, 0.0, 0.0, 1.0, 1.0]
    everything = rows(ignore_case=True, ignore_punctuation=True, ignore_whitespace=True)
    assert everything == [1.0, 1.0, 1.0, 1.0, 1.0]


def test_f1_token_overlap_squad_style() -> None:
    result = EvaluatorService(["f1"]).evaluate(
        ["The cat sat on the mat", "cat dog", "Paris, France", "", "x"],
        ["a cat sat on a mat", "cat", "paris", "", "y"],
    )
    # row 2: precision 1/2, recall 1/1 -> 2/3; row 3: precision 1/2, recall 1 -> 2/3
    assert result.per_row["f1"].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3, 1.0, 0.0])
    assert result.aggregates["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3 + 1) / 5)


def test_accuracy_compares_stripped_labels() -> None:
    svc = EvaluatorService(["accuracy"])
    result = svc.evaluate(["positive ", "Negative", "neutral"], [" positive", "negative", "negative"])
    assert result.per_row["accuracy"].tolist() == [1.0, 0.0, 0.0]
    folded = EvaluatorService(["accuracy"], {"accuracy": {"ignore_case": True}})
    assert folded.evaluate(["Negative"], ["negative"]).aggregates["accuracy"] == 1.0


def test_rouge_l_sanity() -> None:
    result = EvaluatorService(["rouge"]).evaluate(
        ["the cat sat on the mat", "completely different words", "the cat on the mat"],
        ["the cat sat on the mat", "the cat sat on the mat", "the cat sat on the mat"],
    )
    same, disjoint, partial = result.per_row["rouge"].tolist()
    assert same == pytest.approx(1.0)
    assert disjoint == 0.0
    # LCS 5 of 5 predicted and 6 reference tokens: F = 2 * 1 * 5/6 / (1 + 5/6) = 10/11
    assert partial == pytest.approx(10 / 11)
    assert result.aggregates["rouge"] == pytest.approx((1 + 10 / 11) / 3)


def test_bleu_sanity_scaled_to_unit_interval() -> None:
    ref = "the quick brown fox jumps over the lazy dog"
    result = EvaluatorService(["bleu"]).evaluate(
        [ref, "the quick brown fox jumps over a lazy cat", "xyz"], [ref, ref, ref]
    )
    exact, close, unrelated = result.per_row["bleu"].tolist()
    assert exact == pytest.approx(1.0)
    assert 0.0 < close < 1.0
    assert unrelated < 0.05
    assert 0.0 < result.aggregates["bleu"] < 1.0


def test_several_metrics_give_one_column_each_in_order() -> None:
    svc = EvaluatorService(["exact_match", "f1", "exact_match"], {"exact_match": {"ignore_case": True}})
    result = svc.evaluate(["Yes", "no way"], ["yes", "no"])
    assert list(result.per_row.columns) == ["exact_match", "f1"]
    assert len(result.per_row) == 2
    assert result.per_row["exact_match"].tolist() == [1.0, 0.0]
    assert result.per_row["f1"].tolist() == pytest.approx([1.0, 2 / 3])
    assert set(result.aggregates) == {"exact_match", "f1"}


def test_none_prediction_counts_as_empty_and_references_are_stringified() -> None:
    result = EvaluatorService(["exact_match"]).evaluate([None, "12"], ["x", 12])
    assert result.per_row["exact_match"].tolist() == [0.0, 1.0]


def test_empty_input_gives_n_zero_and_no_aggregates() -> None:
    result = EvaluatorService(["exact_match", "f1"]).evaluate([], [])
    assert result.n == 0
    assert result.aggregates == {}
    assert list(result.per_row.columns) == ["exact_match", "f1"]
    assert result.per_row.empty


def test_unknown_metric_lists_the_available_ones() -> None:
    with pytest.raises(MetricError) as info:
        EvaluatorService(["exact_match", "exactmatch"])
    message = str(info.value)
    assert "'exactmatch'" in message
    for name in available_metrics():
        assert name in message


def test_unknown_option_and_options_for_unused_metric_are_rejected() -> None:
    with pytest.raises(MetricError, match="ignore_case.*ignore_punctuation"):
        EvaluatorService(["exact_match"], {"exact_match": {"ignore_caps": True}})
    with pytest.raises(MetricError, match="not among the study's metrics"):
        EvaluatorService(["exact_match"], {"f1": {"normalize": False}})
    with pytest.raises(MetricError, match="no metrics"):
        EvaluatorService([])


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(MetricError, match="2 predictions but 1 references"):
        EvaluatorService(["exact_match"]).evaluate(["a", "b"], ["a"])


def test_scoring_200_rows_is_fast_after_loading() -> None:
    svc = EvaluatorService(["exact_match"], {"exact_match": {"ignore_case": True}})
    svc.evaluate(["warm"], ["up"])
    start = time.perf_counter()
    result = svc.evaluate([f"Answer {i}" for i in range(200)], [f"answer {i % 100}" for i in range(200)])
    elapsed = time.perf_counter() - start
    assert result.aggregates["exact_match"] == pytest.approx(0.5)
    assert elapsed < 0.5, f"scoring 200 rows took {elapsed:.3f}s"


def test_modules_are_cached_per_process() -> None:
    assert load_metric("f1") is load_metric("f1")


def test_a_service_without_options_imports_evaluate_only_when_it_first_scores() -> None:
    """`promptopt run` validates a study's metrics but scores nothing when its steps run on
    Celery workers: the ~2 CPU s `evaluate` import is for the processes that score."""
    printed = probe_lines(
        "import sys",
        "from promptopt_dagster.core.metrics import EvaluatorService",
        "svc = EvaluatorService(['exact_match', 'f1'])",
        "print('evaluate' in sys.modules)",
        "print(svc.evaluate(['a'], ['a']).aggregates)",
        "print('evaluate' in sys.modules)",
    )
    assert printed == ["False", "{'exact_match': 1.0, 'f1': 1.0}", "True"]


@pytest.mark.parametrize("name", available_metrics())
def test_a_row_scores_the_same_whatever_rows_it_is_scored_with(name: str) -> None:
    """Screening scores a candidate's minibatch four rows at a time and keeps those scores."""
    preds = ["Paris", "the cat sat", "B", "42 kg", "", "a b c d", "Lima", "no"]
    refs = ["Paris", "the cat sat down", "A", "42 kg", "x", "a b c", "lima", "no"]
    svc = EvaluatorService([name])
    whole = svc.evaluate(preds, refs).per_row[name].tolist()
    blocks = [
        s
        for i in range(0, len(preds), 3)
        for s in svc.evaluate(preds[i : i + 3], refs[i : i + 3]).per_row[name]
    ]
    assert blocks == whole and len(set(whole)) > 1
