"""What the MLflow UI shows of a tracked study: run durations that are the iterations' wall time,
a saved runs-table view, readable prompt versions (commit messages, rounded scores) and each
LLM call as a span of the iteration's trace. One scripted study, driven once for the module."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from mlflow import MlflowClient

from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.definitions import ASSETS, TRACKING_ASSETS
from promptopt_dagster.driver import drive
from promptopt_dagster.jobs import iteration_job, report_job
from promptopt_dagster.resources import MetaModelResource, MlflowTrackerResource
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster.tracking import experiment_name, prompt_name
from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline

STUDY = "ui_study"


@dataclasses.dataclass
class Tracked:
    pipeline: Pipeline
    client: MlflowClient
    experiment_id: str
    records: list[IterationRecord]
    iteration_runs: list[Any]  # mlflow Run, by iteration


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tracked]:
    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with dg.DagsterInstance.ephemeral(tempdir=str(root / "dagster")) as instance:
        (root / "p").mkdir()
        p = make_pipeline(root / "p", instance, name=STUDY)
        resources = {
            **p.defs.resources,
            "mlflow": MlflowTrackerResource(
                tracking_uri=uri, ui_url="http://127.0.0.1:5999", outbox_path=str(root / "outbox.jsonl")
            ),
            "meta_model_policy": MetaModelResource(),
        }
        defs = dg.Definitions(
            assets=[*ASSETS, *TRACKING_ASSETS],
            jobs=[iteration_job, report_job],
            sensors=[new_study_sensor, continue_study_sensor],
            resources=resources,
        )
        p = dataclasses.replace(p, defs=defs)
        p.store.register_study(p.study)
        drive(p.defs, p.instance, STUDY)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        exp = client.get_experiment_by_name(experiment_name(STUDY))
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], "tags.`promptopt.kind` = 'iteration'")
        by_name = {r.info.run_name: r for r in runs}
        records = p.store.records(STUDY)
        iteration_runs = [by_name[f"iteration-{r.iteration:04d}"] for r in records]
        yield Tracked(p, client, exp.experiment_id, records, iteration_runs)


def test_an_iteration_run_lasts_the_iterations_wall_time(tracked: Tracked) -> None:
    for record, run in zip(tracked.records, tracked.iteration_runs, strict=True):
        assert record.wall_seconds is not None and record.wall_seconds > 0
        [dagster_run_id] = [run.data.tags["dagster.run_id"]]
        started = tracked.pipeline.instance.get_run_stats(dagster_run_id).start_time
        assert started is not None
        assert run.info.start_time == pytest.approx(started * 1000, abs=2)
        duration_s = (run.info.end_time - run.info.start_time) / 1000
        assert duration_s == pytest.approx(record.wall_seconds, abs=0.01)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _prompt_versions(tracked: Tracked) -> list[Any]:
    versions = tracked.client.search_prompt_versions(prompt_name(STUDY))
    return sorted(getattr(versions, "prompt_versions", versions), key=lambda v: int(v.version))
