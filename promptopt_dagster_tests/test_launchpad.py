"""The Launchpad (start_study job) gives the same study as a study file: its config schema is
derived from StudyConfig (fields, defaults, descriptions), and a study launched there registers
exactly as the same study loaded from YAML."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from pydantic import BaseModel

from promptopt_dagster.assets.backfill import DatasetsResource
from promptopt_dagster.assets.launch import START_STUDY_JOB, start_study_job
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import ModelConfig, StudyConfig, load_study
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster_tests.support.scripted import write_dataset

REQUIRED: dict[str, Any] = {
    "name": "launched",
    "dataset": "launch.csv",  # relative: the datasets location, and the study file's folder
    "input_columns": ["review"],
    "reference_column": "label",
    "seed_prompt": {"output_prompt": "Review: {review}"},
}
# A value other than the default for every optional field (and sub-field).
EVERY_FIELD: dict[str, Any] = {
    **REQUIRED,
    "description": "all fields set",
    "id_column": "id",
    "seed_prompt": {"system_prompt": "Label the review.", "output_prompt": "Review: {review}"},
    "primary_model": {"backend": "fake", "name": "tiny", "temperature": 0.2, "max_tokens": 24},
    "optimizer_model": {"backend": "fake", "name": "big", "temperature": 0.9, "max_tokens": 1024},
    "target_metric": "f1",
    "metrics": ["exact_match"],
    "metric_options": {"exact_match": {"ignore_case": True, "ignore_punctuation": False}},
    "target_threshold": 0.95,
    "patience": 3,
    "max_iterations": 7,
    "candidates_per_iteration": 2,
    "minibatch_size": 6,
    "splits": {"train": 0.5, "val": 0.25, "test": 0.25},
    "budget_calls": 5000,
    "seed": 11,
}


@dataclass
class Launchpad:
    instance: dg.DagsterInstance
    datasets: Path
    store: PromptStore
    resources: dict[str, object]

    def launch(self, config: dict[str, Any]) -> dg.ExecuteInProcessResult:
        return start_study_job.execute_in_process(
            run_config={"ops": {"register_study": {"config": config}}},
            instance=self.instance,
            resources=self.resources,
            raise_on_error=False,
        )

    def study_file(self, fields: dict[str, Any]) -> Path:
        """`fields` as a study file in the datasets folder, so a relative dataset is found."""
        path = self.datasets / "study.yaml"
        path.write_text(yaml.safe_dump(fields, sort_keys=False))
        return path


@pytest.fixture
def launchpad(tmp_path: Path) -> Iterator[Launchpad]:
    datasets = tmp_path.resolve() / "datasets"
    datasets.mkdir()
    write_dataset(datasets / "launch.csv", rows=12)
    store = PromptStoreResource(root=str(tmp_path / "store"))
    resources: dict[str, object] = {"prompt_store": store, "datasets": DatasetsResource(uri=str(datasets))}
    with dg.instance_for_test() as instance:
        yield Launchpad(instance, datasets, store.store, resources)


def failure_description(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = failure.step_failure_data
    assert data is not None and data.user_failure_data is not None, "not a dg.Failure"
    return str(data.user_failure_data.description)


def op_config_field(launchpad: Launchpad) -> dg.Field:
    """The op config's schema, as the webserver's Launchpad gets it from the code location."""
    defs = dg.Definitions(jobs=[start_study_job], resources=launchpad.resources)
    job = defs.get_job_def(START_STUDY_JOB)
    ops = job.run_config_schema.config_type.fields["ops"].config_type  # type: ignore[attr-defined]
    return ops.fields["register_study"].config_type.fields["config"]


# --- the schema --------------------------------------------------------------------------------


def test_launchpad_optimizer_model_defaults_are_the_study_files(launchpad: Launchpad) -> None:
    optimizer = op_config_field(launchpad).config_type.fields["optimizer_model"]  # type: ignore[attr-defined]
    assert optimizer.default_value["temperature"] == 0.7 and optimizer.default_value["max_tokens"] == 512
    sub = optimizer.config_type.fields
    assert sub["temperature"].default_value == 0.7 and sub["max_tokens"].default_value == 512
    default = StudyConfig.model_fields["optimizer_model"].get_default(call_default_factory=True)
    assert default == ModelConfig(temperature=0.7, max_tokens=512)


def check_schema(model: type[BaseModel], field: Any, defaults: BaseModel | None, where: str) -> None:
    """Every field of `model` is in the schema with its description, and is required there
    exactly when it is in `model`, else with `model`'s default (`defaults`' value when the
    default is a whole sub-model); nothing else is in the schema."""
    fields = field.config_type.fields
    assert set(fields) == set(model.model_fields), where
    for name, info in model.model_fields.items():
        here = f"{where}.{name}"
        schema = fields[name]
        assert info.description, f"{here} has no description"
        assert schema.description == info.description, here
        assert schema.is_required == info.is_required(), here
        sub_model = info.annotation if isinstance(info.annotation, type) else None
        if info.is_required():
            assert not schema.default_provided, here
            if sub_model is not None and issubclass(sub_model, BaseModel):
                check_schema(sub_model, schema, None, here)
            continue
        expected = (
            getattr(defaults, name) if defaults is not None else info.get_default(call_default_factory=True)
        )
        assert schema.default_provided, here
        if isinstance(expected, BaseModel):
            assert schema.default_value == expected.model_dump(), here
            check_schema(type(expected), schema, expected, here)
        else:
            assert schema.default_value == expected, here


def test_every_launchpad_default_and_description_is_study_configs(launchpad: Launchpad) -> None:
    check_schema(StudyConfig, op_config_field(launchpad), None, "config")


# --- launching --------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [REQUIRED, EVERY_FIELD], ids=["required-only", "every-field"])
def test_launchpad_and_study_file_register_the_same_study(
    launchpad: Launchpad, fields: dict[str, Any]
) -> None:
    result = launchpad.launch(fields)
    assert result.success and result.output_for_node("register_study") == fields["name"]
    launched = launchpad.store.load_study(fields["name"])

    from_file = load_study(launchpad.study_file(fields))
    assert launched.model_dump() == from_file.model_dump()
    assert launched.dataset == str(launchpad.datasets / "launch.csv")
    # The store compares the stored study file: the same study registers as already there.
    assert launchpad.store.register_study(from_file) is False
    if fields is REQUIRED:
        assert launched.optimizer_model == ModelConfig(temperature=0.7, max_tokens=512)
        assert launched == StudyConfig.model_validate({**REQUIRED, "dataset": launched.dataset})


@pytest.mark.parametrize(
    "change",
    [
        {"splits": {"train": 0.5, "val": 0.3, "test": 0.3}},
        {"patience": 0},
        {"optimizer_model": {"backend": "gpt", "temperature": 3.0}},
        {"metric_options": {"exact_match": {"ignore_case": [1]}}},
        {"metrics": None},
        {"seed_prompt": {"output_prompt": "{text}"}},
        {"name": "Not A Slug"},
    ],
    ids=["splits", "patience", "model", "metric-options", "null", "template", "name"],
)
def test_an_invalid_study_fails_with_the_study_files_message(
    launchpad: Launchpad, change: dict[str, Any]
) -> None:
    fields = {**REQUIRED, **change}
    result = launchpad.launch(fields)
    assert not result.success
    launched_error = failure_description(result)

    study_file = launchpad.study_file(fields)
    with pytest.raises(StudyConfigError) as from_file:
        load_study(study_file)
    assert launched_error == str(from_file.value).replace(str(study_file), "start_study config", 1)
    assert launchpad.store.studies() == []


def test_a_dataset_that_does_not_load_fails_and_registers_nothing(launchpad: Launchpad) -> None:
    result = launchpad.launch({**REQUIRED, "dataset": "nowhere.csv"})
    assert not result.success and "nowhere.csv" in failure_description(result)
    assert launchpad.store.studies() == []
