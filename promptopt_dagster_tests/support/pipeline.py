"""The scripted pipeline: the real asset graph, sensors, IO manager and prompt store with
scripted LLMs, on a Dagster instance the caller brings; and one sensor tick as the daemon runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.definitions import ASSETS, CHECKS
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster.jobs import iteration_job, report_job
from promptopt_dagster.resources import PromptStoreResource
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster_tests.support.scripted import ScriptedLLMResource, scripted_study

ITERATION_ASSETS = [a for a in ASSETS if a.key.path[-1] != "study_report"]


@dataclass
class Pipeline:
    defs: dg.Definitions
    instance: dg.DagsterInstance
    store: PromptStore
    llm: ScriptedLLMResource
    study: StudyConfig
    root: Path

    def resources(self) -> dict[str, object]:
        return dict(self.defs.resources)


def make_pipeline(
    tmp_path: Path, instance: dg.DagsterInstance, cache_enabled: bool = True, **study_overrides: object
) -> Pipeline:
    root = tmp_path / "store"
    llm = ScriptedLLMResource(
        model_cache_dir=str(tmp_path / "models"),
        response_cache_path=str(tmp_path / "cache.sqlite"),
        cache_enabled=cache_enabled,
    )
    store_resource = PromptStoreResource(root=str(root))
    defs = dg.Definitions(
        assets=ASSETS,
        asset_checks=CHECKS,
        jobs=[iteration_job, report_job],
        sensors=[new_study_sensor, continue_study_sensor],
        resources={
            "io_manager": PromptoptIOManager(base_uri=str(root / "assets")),
            "prompt_store": store_resource,
            "llm": llm,
        },
    )
    study = scripted_study(tmp_path, **study_overrides)
    return Pipeline(defs, instance, store_resource.store, llm, study, root)


def tick(p: Pipeline, sensor: dg.SensorDefinition) -> dg.SensorResult:
    """Evaluate `sensor` once and apply its partition requests, as the daemon would."""
    ctx = dg.build_sensor_context(
        instance=p.instance, resources={"prompt_store": p.defs.resources["prompt_store"]}
    )
    result = sensor(ctx)
    for req in result.dynamic_partitions_requests or []:
        p.instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
    return result
