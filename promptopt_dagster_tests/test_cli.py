"""`promptopt run` on bad input: one clear message, exit code 2, nothing registered or run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptopt_dagster import cli
from promptopt_dagster.settings import get_settings
from promptopt_dagster_tests.support.scripted import write_study


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMPTOPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _edit(path: Path, **fields: object) -> Path:
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"reference_column": "lable"}, "Did you mean 'label'"),
        ({"target_metric": "bleurt"}, "unknown metric 'bleurt'"),
        ({"primary_model": {"backend": "local", "name": "/nowhere/model.gguf"}}, "LOCAL_MODEL_PATH"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_bad_study_exits_2_with_a_clear_message_and_registers_nothing(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, expected: str | None
) -> None:
    study = _edit(write_study(tmp_path), **change)
    code = cli.main(["run", str(study)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    if "LOCAL_MODEL_PATH" in expected:  # found when iteration 0 runs: nothing decided
        assert not list((home / "store").rglob("iterations/*.json"))
    else:
        assert not (home / "store" / "studies").exists()


def test_empty_dataset_is_refused_before_anything_runs(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path)
    (tmp_path / "scripted.csv").write_text("id,review,label\n")
    assert cli.main(["run", str(study)]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not (home / "store" / "studies").exists()
