"""The scripted pipeline: the iteration and report assets, their jobs and sensors with the product's
resources (`build_resources`) for a temporary PROMPTOPT_HOME, the LLM resource swapped for the
scripted one, on a Dagster instance the caller brings; one sensor tick as the daemon runs it; one
iteration materialized.

The definitions are `build_definitions` without the tracking assets (they need MLflow, and a new
MLflow store costs seconds per test: `with_tracking` adds them for the tests that want them) and
without the evaluations over other datasets (test_backfill.py runs them with their own resources)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import dagster as dg
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.definitions import ASSETS, build_definitions
from promptopt_dagster.driver import apply_partition_requests
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.resources import MetaModelResource, MlflowTrackerResource, PromptStoreResource
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.scripted import (
    ScriptedLLMResource,
    scripted_llm_resource,
    scripted_study,
)

ITERATION_ASSETS = [a for a in ASSETS if a.key.path[-1] != "study_report"]


class IsolatedSettings(Settings):
    """Settings from keyword arguments and defaults only: no environment variable or .env file of
    the machine running the tests reaches them."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


@dataclass
class Pipeline:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    store: PromptStore
    llm: ScriptedLLMResource
    study: StudyConfig
    settings: Settings

    @property
    def root(self) -> Path:
        """The study's storage root (assets, prompt store) under its PROMPTOPT_HOME."""
        return Path(self.settings.storage_root)

    def resources(self) -> dict[str, object]:
        return dict(self.defs.resources)


def make_pipeline(
    tmp_path: Path,
    instance: dg.DagsterInstance,
    cache_enabled: bool = True,
    cache_url: str | None = None,
    **study_overrides: object,
) -> Pipeline:
    """PROMPTOPT_HOME is `tmp_path`: the store is tmp_path/store, the LLM response cache is in
    tmp_path/cache (or in the database `cache_url`, LLM_CACHE_URL), the study
    (support/scripted.py) and its dataset are written to `tmp_path`."""
    settings = IsolatedSettings(
        PROMPTOPT_HOME=tmp_path, LLM_CACHE_ENABLED=cache_enabled, LLM_CACHE_URL=cache_url
    )
    llm = scripted_llm_resource(settings)
    defs = build_definitions(settings, resources={"llm": llm}, tracking=False, evaluations=False)
    store_resource = defs.resources["prompt_store"]
    assert isinstance(store_resource, PromptStoreResource)
    study = scripted_study(tmp_path, **study_overrides)
    return Pipeline(defs, instance, store_resource.store, llm, study, settings)


def with_tracking(p: Pipeline, tracking_uri: str, outbox: Path, **policy: object) -> Pipeline:
    """`p` plus the tracking assets and their resources: MLflow at `tracking_uri` (writes queued in
    `outbox` while it is down) and the meta-model `policy` (MetaModelResource's fields)."""
    resources = {
        **p.defs.resources,
        "mlflow": MlflowTrackerResource(
            tracking_uri=tracking_uri, ui_url="http://127.0.0.1:5999", outbox_path=str(outbox)
        ),
        "meta_model_policy": MetaModelResource(**policy),  # type: ignore[arg-type]
    }
    return replace(p, defs=build_definitions(p.settings, resources=resources, evaluations=False))


def tick(p: Pipeline, sensor: dg.SensorDefinition) -> dg.SensorResult:
    """Evaluate `sensor` once and apply its partition requests, as the daemon would."""
    ctx = dg.build_sensor_context(
        instance=p.instance, resources={"prompt_store": p.defs.resources["prompt_store"]}
    )
    result = sensor(ctx)
    apply_partition_requests(p.instance, result)
    return result


def materialize_iteration(
    p: Pipeline, iteration: int, raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """Materialize the iteration assets (not the report) for one iteration of the study."""
    return dg.materialize(
        ITERATION_ASSETS,
        partition_key=study_iteration_key(p.study.name, iteration),
        instance=p.instance,
        resources=p.resources(),
        raise_on_error=raise_on_error,
    )
