"""`start_study`: launch a study from the Dagster UI launchpad.

The op config is derived from core/study.py StudyConfig and its sub-models (SeedPrompt,
ModelConfig, Splits): the same fields, defaults and descriptions, so the Launchpad offers, and
documents, what a study file does. The op validates the config through StudyConfig (the same
checks and messages as a study file), checks that the dataset and metrics load, and registers
the study in the prompt store; new_study_sensor then starts iteration 0 and
continue_study_sensor carries it on. A relative `dataset` is resolved against the datasets
location (settings DATASETS_URI).
"""

import types
from typing import Any, Literal, Union, get_args, get_origin

import dagster as dg
import yaml
from pydantic import BaseModel, Field, create_model

from promptopt_dagster.assets.backfill import DatasetsResource
from promptopt_dagster.core.scoring import evaluator_for
from promptopt_dagster.core.study import ModelConfig, SeedPrompt, Splits, StudyConfig, parse_study
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster.storage import join

START_STUDY_JOB = "start_study"

_LAUNCHPAD_CONFIGS: dict[type[BaseModel], type[dg.Config]] = {}


def _launchpad_type(annotation: Any) -> Any:
    """`annotation` as a type Dagster's config schema accepts: a sub-model becomes its Launchpad
    config class, a Literal the type of its values, and a union of several types Any (Dagster
    takes neither an optional Literal nor a union). StudyConfig then checks the value itself."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return launchpad_config(annotation)
    if origin is Literal:
        kinds = {type(arg) for arg in args}
        return kinds.pop() if len(kinds) == 1 else Any
    if origin in (Union, types.UnionType):
        members = [arg for arg in args if arg is not type(None)]
        if len(members) > 1:
            return Any
        inner = _launchpad_type(members[0])
        return inner | None if len(members) < len(args) else inner
    if origin is list:
        return list[_launchpad_type(args[0])]  # type: ignore[misc]
    if origin is dict:
        return dict[args[0], _launchpad_type(args[1])]  # type: ignore[misc]
    return annotation


def launchpad_config(model: type[BaseModel], name: str | None = None) -> type[dg.Config]:
    """The dg.Config for `model`: its fields, with its defaults and descriptions, built once per
    model (call it for the sub-models first to name them).

    Dagster builds a config schema's defaults from `default=` only: it ignores default_factory
    (a sub-model's default then becomes its class defaults), so every default is made concrete
    here. Constraints and validators stay on `model`, which validates the config, with the
    messages a study file gets; a field that has a default also takes None (null), so that
    StudyConfig, not Dagster, is the one to refuse it."""
    if model not in _LAUNCHPAD_CONFIGS:
        fields: dict[str, Any] = {}
        for field_name, info in model.model_fields.items():
            annotation = _launchpad_type(info.annotation)
            if info.is_required():
                fields[field_name] = (annotation, Field(description=info.description))
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, BaseModel):
                # A Config instance is the one default Dagster reads for a nested config.
                default = launchpad_config(type(default))(**default.model_dump())
            elif get_origin(annotation) not in (Union, types.UnionType):
                annotation = annotation | None
            fields[field_name] = (annotation, Field(default=default, description=info.description))
        _LAUNCHPAD_CONFIGS[model] = create_model(  # type: ignore[call-overload]
            name or f"{model.__name__}Launchpad",
            __base__=dg.Config,
            __doc__=model.__doc__,
            __module__=__name__,
            **fields,
        )
    return _LAUNCHPAD_CONFIGS[model]


SeedPromptConfig = launchpad_config(SeedPrompt, "SeedPromptConfig")
ModelSettingsConfig = launchpad_config(ModelConfig, "ModelSettingsConfig")
SplitsConfig = launchpad_config(Splits, "SplitsConfig")
StartStudyConfig = launchpad_config(StudyConfig, "StartStudyConfig")


def study_from_config(config: dg.Config, datasets_uri: str) -> StudyConfig:
    """Validate through StudyConfig, with its messages; a relative dataset path is resolved
    against the datasets location."""
    raw = config.model_dump()
    dataset = str(raw["dataset"])
    if "://" not in dataset and not dataset.startswith("/"):
        raw["dataset"] = join(datasets_uri, dataset)
    return parse_study(yaml.safe_dump(raw, sort_keys=False), source="start_study config")


@dg.op(tags={"kind": "study"})
def register_study(
    context: dg.OpExecutionContext,
    config: StartStudyConfig,
    prompt_store: PromptStoreResource,
    datasets: DatasetsResource,
) -> dg.Output[str]:
    """Validates the study (config, dataset, metrics) and registers it; the sensors do the rest."""
    try:
        study = study_from_config(config, datasets.uri)
        data = load_study_data(study)
        evaluator_for(study)
        created = prompt_store.store.register_study(study)
    except PromptoptError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    rows = {k: len(v) for k, v in data.splits.items()}
    context.log.info(
        f"study {study.name} {'registered' if created else 'was already registered'}; "
        "new_study_sensor starts iteration 0"
    )
    return dg.Output(
        study.name,
        metadata={"study": study.name, "newly_registered": created, "dataset": study.dataset, **rows},
    )


@dg.job(
    name=START_STUDY_JOB,
    description="Register a study from the launchpad; the sensors then run its iterations.",
    executor_def=dg.in_process_executor,
)
def start_study_job() -> None:
    register_study()
