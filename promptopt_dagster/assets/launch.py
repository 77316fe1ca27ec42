"""`start_study`: launch a study from the Dagster UI launchpad.

The op config mirrors core/study.py StudyConfig field by field, with a description on each, so
the launchpad documents every field. The op validates it through StudyConfig (the same checks
and messages as a study file), checks that the dataset and metrics load, and registers the study
in the prompt store; new_study_sensor then starts iteration 0 and continue_study_sensor carries
it on. A relative `dataset` is resolved against the datasets location (settings DATASETS_URI).
"""

from typing import Any

import dagster as dg
import yaml
from pydantic import Field

from promptopt_dagster.assets.backfill import DatasetsResource
from promptopt_dagster.core.iteration import evaluator_for, load_study_data
from promptopt_dagster.core.study import StudyConfig, parse_study
from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster.storage import join

START_STUDY_JOB = "start_study"


def _doc(name: str, fallback: str) -> str:
    """StudyConfig's own description of a field, so the two cannot drift apart."""
    return StudyConfig.model_fields[name].description or fallback


class SeedPromptConfig(dg.Config):
    system_prompt: str = Field("", description="System message of the seed prompt; may be empty.")
    output_prompt: str = Field(
        description="User message template; each {column} is replaced by the row's value, "
        "e.g. 'Review: {review}'. Every placeholder must be one of input_columns."
    )


class ModelSettingsConfig(dg.Config):
    backend: str | None = Field(
        None, description="local (embedded GGUF), vertex (Gemini) or fake; empty: setting LLM_BACKEND."
    )
    name: str | None = Field(
        None, description="Model name, e.g. gemini-2.5-flash; for local, a GGUF path; empty: the default."
    )
    temperature: float = Field(0.0, description="Sampling temperature, 0.0 to 2.0.")
    max_tokens: int = Field(64, description="Longest reply, in tokens (1 to 8192).")


class SplitsConfig(dg.Config):
    train: float = Field(
        0.4, description="Share of rows for the train split (candidates are screened there)."
    )
    val: float = Field(0.3, description="Share of rows for validation (decides acceptance).")
    test: float = Field(0.3, description="Share of held-out rows, scored only by the study report.")


class StartStudyConfig(dg.Config):
    """A study, as in a study YAML file (see README 'Writing a study')."""

    name: str = Field(description=_doc("name", "study id"))
    description: str = Field("", description="Free text shown with the study.")
    dataset: str = Field(
        description="CSV, JSONL or Parquet file: a gs:// URI, an absolute path, or a path relative to "
        "the datasets location (setting DATASETS_URI, default <PROMPTOPT_HOME>/datasets)."
    )
    input_columns: list[str] = Field(description=_doc("input_columns", "columns the template uses"))
    reference_column: str = Field(description=_doc("reference_column", "expected output"))
    id_column: str | None = Field(None, description=_doc("id_column", "stable row id"))
    seed_prompt: SeedPromptConfig = Field(description="The prompt the study starts from.")
    primary_model: ModelSettingsConfig = Field(
        default_factory=ModelSettingsConfig, description="The model that answers the prompts."
    )
    optimizer_model: ModelSettingsConfig = Field(
        default_factory=lambda: ModelSettingsConfig(temperature=0.7, max_tokens=512),
        description="The model that writes refined prompts.",
    )
    target_metric: str = Field("exact_match", description=_doc("target_metric", "deciding metric"))
    metrics: list[str] = Field(default_factory=list, description=_doc("metrics", "extra metrics"))
    metric_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description=_doc("metric_options", "per-metric options")
    )
    target_threshold: float = Field(1.0, description=_doc("target_threshold", "target score"))
    patience: int = Field(2, description=_doc("patience", "iterations without improvement"))
    max_iterations: int = Field(5, description=_doc("max_iterations", "iteration limit"))
    candidates_per_iteration: int = Field(
        4, description="Candidate prompts proposed per iteration (1 to 32)."
    )
    minibatch_size: int = Field(12, description=_doc("minibatch_size", "minibatch size"))
    splits: SplitsConfig = Field(
        default_factory=SplitsConfig, description="train / val / test shares; they must sum to 1."
    )
    budget_calls: int | None = Field(None, description=_doc("budget_calls", "LLM call budget"))
    seed: int = Field(0, description="Seed of the splits, minibatches and sampling: same seed, same study.")


def study_from_config(config: StartStudyConfig, datasets_uri: str) -> StudyConfig:
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
