"""Asset values stored by promptopt 0.1.0, whose assets returned plain dicts (written as the JSON of
``model_dump(mode="json")``), load through PromptoptIOManager into the typed values the assets
take now, and a study stopped after the first steps of an iteration resumes from them.

data/stored_assets_0.1.0 is iteration 0 of the scripted study (support/scripted.py) and its report,
as 0.1.0 stored them: every asset up to iteration_decision, and study_report."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from pydantic import BaseModel

from promptopt_dagster.assets.meta_model import MetaModelFit
from promptopt_dagster.assets.tracking import TrackingOutcome
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.proposal import CandidateSet
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.report import StudyReport
from promptopt_dagster.core.scoring import CandidateMetrics, EvaluationMetrics
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster.partitions import study_iteration_key, study_iteration_partitions
from promptopt_dagster.sensors import new_study_sensor
from promptopt_dagster_tests.support.pipeline import ITERATION_ASSETS, Pipeline, make_pipeline, tick

STORED = Path(__file__).parent / "data" / "stored_assets_0.1.0"
KEY = study_iteration_key("scripted", 0)
ITERATION_VALUES: list[tuple[str, type[BaseModel]]] = [
    ("current_prompt", PromptState),
    ("baseline_metrics", EvaluationMetrics),
    ("candidate_prompts", CandidateSet),
    ("candidate_metrics", CandidateMetrics),
    ("iteration_decision", IterationRecord),
]
# The two tracking assets' values as 0.1.0 returned them (their tests need MLflow, so these are
# written out here rather than stored from a run).
TRACKING_VALUES: list[tuple[str, type[BaseModel], dict[str, Any]]] = [
    ("meta_model", MetaModelFit, {"status": "no history", "n_rows": 0}),
    (
        "meta_model",
        MetaModelFit,
        {"status": "ok", "useful": True, "cv": {"status": "ok", "spearman": 0.61}, "n_rows": 42},
    ),
    ("iteration_tracking", TrackingOutcome, {"status": "failed", "error": "MLflow logging failed (x)"}),
    (
        "iteration_tracking",
        TrackingOutcome,
        {
            "status": "logged",
            "run_id": "abc",
            "run_url": "http://mlflow/#/runs/abc",
            "candidate_runs": {"d188ac0eb355": "def"},
            "prompt_versions": {"scripted-seed": 1, "d188ac0eb355": None},
        },
    ),
]


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def pipeline(tmp_path: Path, instance: dg.DagsterInstance) -> Pipeline:
    p = make_pipeline(tmp_path, instance)
    shutil.copytree(STORED, p.root / "assets")
    return p


# Optional fields added since 0.1.0, unset (None) in values loaded from it; 0.1.0 ignores them.
NEW_FIELDS = {"screened_rows"}


def stored_json(asset: str) -> Any:
    return json.loads((STORED / asset / "study=scripted" / "iteration=0000.json").read_text())


def without_new_fields(value: Any) -> Any:
    """`value` without the unset NEW_FIELDS, at any depth."""
    if isinstance(value, dict):
        return {k: without_new_fields(v) for k, v in value.items() if not (k in NEW_FIELDS and v is None)}
    if isinstance(value, list):
        return [without_new_fields(v) for v in value]
    return value


def load(
    manager: PromptoptIOManager, asset: str, model: type[BaseModel], instance: dg.DagsterInstance
) -> Any:
    """What an asset whose input is annotated with `model` receives (iteration 0 of the study)."""
    instance.add_dynamic_partitions(study_iteration_partitions.name, [KEY])
    context = dg.build_input_context(
        instance=instance,
        asset_key=dg.AssetKey(asset),
        dagster_type=dg.PythonObjectDagsterType(model),
        partition_key=KEY,
        asset_partitions_def=study_iteration_partitions,
    )
    return manager.load_input(context)


@pytest.mark.parametrize(("asset", "model"), ITERATION_VALUES, ids=[a for a, _ in ITERATION_VALUES])
def test_an_iteration_value_stored_by_0_1_0_loads_into_its_model_unchanged(
    pipeline: Pipeline, asset: str, model: type[BaseModel]
) -> None:
    manager = PromptoptIOManager(base_uri=str(pipeline.root / "assets"))
    value = load(manager, asset, model, pipeline.instance)
    assert isinstance(value, model)
    # and the typed value is stored as the same JSON (with the newer optional fields unset):
    # 0.1.0 can still read what this version writes
    assert without_new_fields(value.model_dump(mode="json")) == stored_json(asset)


def test_the_report_stored_by_0_1_0_loads_as_a_study_report(pipeline: Pipeline) -> None:
    pipeline.instance.add_dynamic_partitions("study", ["scripted"])
    report = pipeline.defs.load_asset_value(
        "study_report", python_type=StudyReport, partition_key="scripted", instance=pipeline.instance
    )
    assert isinstance(report, StudyReport) and report.study == "scripted"
    stored = json.loads((STORED / "study_report" / "scripted.json").read_text())
    assert report.model_dump(mode="json") == stored


@pytest.mark.parametrize(("asset", "model", "old"), TRACKING_VALUES)
def test_a_tracking_value_of_0_1_0_loads_into_its_model(
    tmp_path: Path, instance: dg.DagsterInstance, asset: str, model: type[BaseModel], old: dict[str, Any]
) -> None:
    path = tmp_path / asset / "study=scripted" / "iteration=0000.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(old, indent=2))
    value = load(PromptoptIOManager(base_uri=str(tmp_path)), asset, model, instance)
    assert isinstance(value, model)
    assert value.model_dump(mode="json", exclude_defaults=True) == old


def test_an_iteration_started_by_0_1_0_finishes_on_its_stored_values(pipeline: Pipeline) -> None:
    """Iteration 0 stopped after baseline_metrics under 0.1.0; this version proposes, measures and
    decides from the stored prompt, predictions and metrics."""
    p = pipeline
    p.store.register_study(p.study)
    tick(p, new_study_sensor)
    baseline = stored_json("baseline_metrics")
    result = dg.materialize(
        ITERATION_ASSETS,
        selection=["candidate_prompts", "candidate_predictions", "candidate_metrics", "iteration_decision"],
        partition_key=KEY,
        instance=p.instance,
        resources=p.resources(),
    )
    assert result.success
    [record] = p.store.records("scripted")
    assert record.incumbent_id == stored_json("current_prompt")["id"]
    assert record.incumbent_train_score == baseline["aggregates"]["train"]["exact_match"]
    assert record.incumbent_val_score == baseline["aggregates"]["val"]["exact_match"]
    assert record.candidates and record.accepted
