"""load_study_data: studies too small to measure anything are refused, small splits warned about."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import MIN_ROWS, load_study_data
from promptopt_dagster.errors import DatasetError
from promptopt_dagster_tests.support.scripted import scripted_study, write_dataset


def study_with_rows(tmp_path: Path, rows: int, **overrides: object) -> StudyConfig:
    study = scripted_study(tmp_path, **overrides)
    write_dataset(Path(study.dataset), rows=rows)
    return study


def test_too_small_studies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_study_data(study_with_rows(tmp_path, 3))
    message = str(info.value)
    assert "3 rows" in message and f"at least {MIN_ROWS}" in message and "add rows" in message.lower()


def test_a_split_with_fewer_than_two_rows_is_refused(tmp_path: Path) -> None:
    study = study_with_rows(tmp_path, 10, splits={"train": 0.8, "val": 0.1, "test": 0.1})
    with pytest.raises(DatasetError) as info:
        load_study_data(study)
    message = str(info.value)
    assert "train 8, val 1, test 1" in message and "at least 2" in message
    assert "splits" in message and "10 rows" in message


def test_small_validation_and_test_splits_give_warnings(tmp_path: Path) -> None:
    data = load_study_data(study_with_rows(tmp_path, 30))
    assert [len(data.splits[s]) for s in ("train", "val", "test")] == [12, 9, 9]
    assert len(data.warnings) == 2 and all(isinstance(w, str) for w in data.warnings)
    assert "validation has 9 rows" in data.warnings[0] and "test has 9 rows" in data.warnings[1]
    assert "fewer than 10" in data.warnings[0]


def test_a_study_of_fair_size_has_no_warnings(tmp_path: Path) -> None:
    data = load_study_data(study_with_rows(tmp_path, 48))
    assert data.warnings == []
