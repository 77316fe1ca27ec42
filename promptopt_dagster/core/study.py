"""StudyConfig: what to optimize (data, seed prompt, metric) and when to stop, from YAML."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.storage import as_path, read_text

Backend = Literal["local", "vertex", "fake"]

STUDY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
STUDY_NAME_RULE = "1-63 lowercase letters, digits, '-' and '_', starting with a letter or digit"


def check_study_name(name: str) -> str:
    """`name` if it is a valid study name, else StudyConfigError. A study name names partitions,
    files and gs:// keys, so every entry point (study file, CLI, Launchpad, store) checks it."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise StudyConfigError(f"{name!r} is not a study name: use {STUDY_NAME_RULE}")
    return name


class ModelConfig(BaseModel):
    """A model for one role. Unset fields fall back to the settings (environment / .env)."""

    model_config = ConfigDict(extra="forbid")

    backend: Backend | None = Field(
        None,
        description="local (embedded GGUF model), vertex (Gemini) or fake; empty: setting LLM_BACKEND.",
    )
    name: str | None = Field(
        None,
        description="Model name, e.g. gemini-2.5-flash; for local, a GGUF path; empty: the default "
        "model of the backend.",
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature, 0.0 to 2.0.")
    max_tokens: int = Field(64, ge=1, le=8192, description="Longest reply, in tokens (1 to 8192).")


class SeedPrompt(BaseModel):
    """The prompt a study starts from (version 0)."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str = Field("", description="System message, sent as written; may be empty.")
    output_prompt: str = Field(
        ...,
        description="User message template; each {column} is replaced by the row's value, e.g. "
        "'Review: {review}'. Every placeholder must be one of input_columns; literal braces are "
        "doubled, {{ and }}.",
    )


class Splits(BaseModel):
    """Shares of the dataset's rows per split; they must sum to 1."""

    model_config = ConfigDict(extra="forbid")

    train: float = Field(
        0.4, gt=0.0, lt=1.0, description="Share of rows for the train split (candidates are screened there)."
    )
    val: float = Field(
        0.3,
        gt=0.0,
        lt=1.0,
        description="Share of rows for validation (decides whether a candidate is accepted).",
    )
    test: float = Field(
        0.3, gt=0.0, lt=1.0, description="Share of held-out rows, scored only by the study report."
    )

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


# The Launchpad's start_study config is built from StudyConfig's fields, defaults and
# descriptions (assets/launch.py): each is declared here once.
class StudyConfig(BaseModel):
    """One optimization study, as a study file or the Launchpad gives it (README 'Writing a study')."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        description=f"Study id ({STUDY_NAME_RULE}); it names partitions and files.",
    )
    description: str = Field("", description="Free text shown with the study.")
    dataset: str = Field(
        ...,
        description="CSV, JSONL or Parquet file: a gs:// URI, an absolute path, or a relative path "
        "(in a study file: relative to the file; in the Launchpad: relative to the datasets "
        "location, setting DATASETS_URI, default <PROMPTOPT_HOME>/datasets).",
    )
    input_columns: list[str] = Field(
        ..., min_length=1, description="Columns the prompt template uses, as {column}."
    )
    reference_column: str = Field(..., description="Column holding the expected output.")
    id_column: str | None = Field(
        None, description="Column with a stable row id; empty: a hash of the row's inputs."
    )
    seed_prompt: SeedPrompt = Field(..., description="The prompt the study starts from.")
    primary_model: ModelConfig = Field(
        default_factory=ModelConfig, description="The model that answers the prompts."
    )
    optimizer_model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(temperature=0.7, max_tokens=512),
        description="The model that writes refined prompts (warmer and longer replies than the "
        "primary model, so its rationales are not cut off).",
    )
    target_metric: str = Field(
        "exact_match",
        description="The metric that decides: candidates are accepted and the study stops on it.",
    )
    metrics: list[str] = Field(default_factory=list, description="Extra metrics, only reported.")
    metric_options: dict[str, dict[str, bool | str | float]] = Field(
        default_factory=dict,
        description="Options per metric, e.g. exact_match: {ignore_case: true}.",
    )
    target_threshold: float = Field(
        1.0, description="Stop when the champion's validation score reaches this."
    )
    patience: int = Field(
        2,
        ge=1,
        description="Stop after this many iterations without improvement, once every proposal "
        "strategy has been tried.",
    )
    max_iterations: int = Field(5, ge=1, description="Stop after this many iterations.")
    candidates_per_iteration: int = Field(
        4, ge=1, le=32, description="Candidate prompts proposed per iteration (1 to 32)."
    )
    minibatch_size: int = Field(
        12, ge=1, description="Train rows each candidate is screened on before validation."
    )
    splits: Splits = Field(
        default_factory=Splits, description="train / val / test shares of the rows; they must sum to 1."
    )
    budget_calls: int | None = Field(
        None, ge=1, description="Stop before the LLM calls spent would exceed this; empty: no budget."
    )
    seed: int = Field(0, description="Seed of the splits, minibatches and sampling: same seed, same study.")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not STUDY_NAME.fullmatch(v):
            raise ValueError(f"use {STUDY_NAME_RULE} (it names partitions and files)")
        return v

    @model_validator(mode="after")
    def _template_uses_inputs(self) -> StudyConfig:
        seed = self.seed_prompt_state()
        problem = seed.template_error()
        if problem is not None:
            raise ValueError(f"seed_prompt.output_prompt: {problem}")
        unknown = seed.missing_columns(self.input_columns)
        if unknown:
            raise ValueError(
                f"seed_prompt.output_prompt uses {unknown} which are not in input_columns "
                f"{self.input_columns}"
            )
        if not seed.placeholders():
            raise ValueError(
                "seed_prompt.output_prompt must contain at least one {column} placeholder, "
                f"e.g. {{{self.input_columns[0]}}}"
            )
        return self

    def seed_prompt_state(self) -> PromptState:
        return PromptState(
            id=f"{self.name}-seed",
            system_prompt=self.seed_prompt.system_prompt,
            output_prompt=self.seed_prompt.output_prompt,
            version=0,
            metadata={"source": "seed"},
        )

    def all_metrics(self) -> list[str]:
        return [self.target_metric, *[m for m in self.metrics if m != self.target_metric]]


def _format_validation_error(path: str, exc: ValidationError) -> str:
    lines = [f"{path} is not a valid study file:"]
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see examples/*.yaml)"
        lines.append(f"  - {where}: {msg}")
    return "\n".join(lines)


def parse_study(text: str, source: str = "<study>", base_dir: str | None = None) -> StudyConfig:
    """Parse YAML text. A relative dataset path is resolved against `base_dir`."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Parsed from a string, yaml shows the offending line with a caret but calls the file
        # "<unicode string>": name the file instead.
        where = str(exc).replace('"<unicode string>"', f'"{source}"')
        raise StudyConfigError(f"{source} is not valid YAML:\n{where}") from exc
    if not isinstance(raw, dict):
        raise StudyConfigError(f"{source} must be a YAML mapping of study fields, got {type(raw).__name__}")
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise StudyConfigError(_format_validation_error(source, exc)) from exc
    if base_dir and "://" not in study.dataset and not os.path.isabs(study.dataset):
        study = study.model_copy(update={"dataset": str(Path(base_dir) / study.dataset)})
    return study


def load_study(uri: str | os.PathLike[str]) -> StudyConfig:
    """Load a study YAML from a local path or gs:// URI, with one clear error per problem."""
    uri = str(uri)
    if not as_path(uri).exists():
        raise StudyConfigError(f"study file {uri} does not exist")
    base = None if "://" in uri else str(Path(uri).resolve().parent)
    return parse_study(read_text(uri), source=uri, base_dir=base)


def dump_study(study: StudyConfig) -> str:
    return yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False)
