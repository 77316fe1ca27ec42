"""The shipped example studies: each loads, its data loads and splits, its metrics exist, and the
committed data is what make_data.py writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from promptopt_dagster.core.dataset import load_dataset, split_dataset
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.study import load_study
from promptopt_dagster.examples import EXAMPLES_DIR, make_data, study_paths

MAIN = ["arithmetic", "sentiment", "topic_codes"]
STUDIES = sorted(study_paths())


def test_expected_studies_are_shipped() -> None:
    assert set(MAIN) | {"tiny_sentiment"} <= set(STUDIES)


@pytest.mark.parametrize("name", STUDIES)
def test_study_loads_and_its_dataset_splits(name: str) -> None:
    study = load_study(study_paths()[name])
    assert study.name == name
    assert Path(study.dataset).is_file()
    df = load_dataset(study.dataset, study.input_columns, study.reference_column, study.id_column)
    splits = split_dataset(df, study.splits.train, study.splits.val, study.seed)
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == len(df)
    if name == "tiny_sentiment":
        assert len(df) == 30
        assert study.max_iterations == 2
        assert sizes["train"] >= 8 and sizes["val"] >= 8, sizes
    else:
        assert 60 <= len(df) <= 120
        assert sizes["val"] >= 15 and sizes["test"] >= 15, sizes
        assert 4 <= study.max_iterations <= 6
    assert study.minibatch_size <= sizes["train"]
    assert study.target_metric == "exact_match"
    evaluator = EvaluatorService(study.all_metrics(), study.metric_options)
    refs = df[study.reference_column].tolist()
    # References score perfectly against themselves under the study's own options...
    assert evaluator.evaluate(refs, refs).aggregates["exact_match"] == 1.0
    # ...and a chatty answer does not.
    chatty = [f"Sure! The answer is: {r}. Let me know if you need more help." for r in refs]
    assert evaluator.evaluate(chatty, refs).aggregates["exact_match"] == 0.0


@pytest.mark.parametrize("name", STUDIES)
def test_seed_prompt_is_vague(name: str) -> None:
    study = load_study(study_paths()[name])
    labels = set(load_dataset(study.dataset, study.input_columns, study.reference_column,
                              study.id_column)[study.reference_column])
    seed = study.seed_prompt.system_prompt + study.seed_prompt.output_prompt
    assert study.seed_prompt.system_prompt == ""
    assert not any(label in seed for label in labels if len(labels) <= 4), "the seed must not name the labels"
    assert "only" not in seed.lower()


def test_label_sets() -> None:
    def labels(name: str) -> set[str]:
        study = load_study(study_paths()[name])
        return set(load_dataset(study.dataset, study.input_columns, study.reference_column,
                                study.id_column)[study.reference_column])

    assert labels("sentiment") == {"positive", "negative"}
    assert labels("tiny_sentiment") == {"positive", "negative"}
    assert labels("topic_codes") == {"SPORT", "TECH", "POLITICS", "HEALTH"}
    assert all(label.lstrip("-").isdigit() for label in labels("arithmetic"))


def test_committed_data_matches_the_generator(tmp_path: Path) -> None:
    written = make_data.write_all(tmp_path)
    for name, path in written.items():
        committed = EXAMPLES_DIR / path.name
        assert committed.is_file(), f"{committed} missing: run python -m promptopt_dagster.examples.make_data"
        if path.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(path), pd.read_parquet(committed))
        else:
            assert path.read_bytes() == committed.read_bytes(), f"{name} differs from make_data.py output"
