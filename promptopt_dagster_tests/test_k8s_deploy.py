"""Kubernetes, on paper: deploy/k8s/values.yaml (for the `dagster/dagster` Helm chart) and the
Secret it names parse, point the chart at our code location, launcher and executor, and set only
settings the code reads; the definitions load with the Kubernetes executor those values select.
No cluster runs here: what a cluster would add (pods, the chart's templates) is not tested."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml

from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.jobs import ITERATION_JOB, REPORT_JOB
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.pipeline import IsolatedSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "values.yaml").read_text())


@pytest.fixture(scope="module")
def secret() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "secret.example.yaml").read_text())


def deployment_env(values: dict[str, Any]) -> dict[str, str]:
    [deployment] = values["dagster-user-deployments"]["deployments"]
    return {item["name"]: item["value"] for item in deployment["env"]}


def read_by_settings(name: str) -> bool:
    """A variable Settings reads: a field, or VERTEX_<option> (settings.py splits it once)."""
    if name in Settings.model_fields:
        return True
    prefix, _, option = name.partition("_")
    return prefix == "VERTEX" and option.lower() in VertexOptions.model_fields


def test_the_values_run_our_code_location_with_the_k8s_launcher(values: dict[str, Any]) -> None:
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "promptopt_dagster.definitions"]
    module = importlib.import_module(deployment["dagsterApiGrpcArgs"][1])
    assert isinstance(module.defs, dg.Definitions)
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert deployment_env(values)["DAGSTER_EXECUTOR"] == "k8s"


def test_every_pod_gets_the_settings_secret(values: dict[str, Any], secret: dict[str, Any]) -> None:
    name = secret["metadata"]["name"]
    [deployment] = values["dagster-user-deployments"]["deployments"]
    for where, env_secrets in {
        "user code": deployment["envSecrets"],
        "run launcher": values["runLauncher"]["config"]["k8sRunLauncher"]["envSecrets"],
        "daemon": values["dagsterDaemon"]["envSecrets"],
        "webserver": values["dagsterWebserver"]["envSecrets"],
    }.items():
        assert {"name": name} in env_secrets, where


def test_the_instance_is_an_existing_postgres(values: dict[str, Any]) -> None:
    postgres = values["postgresql"]
    assert postgres["enabled"] is False and postgres["postgresqlHost"]
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which dagster-postgres does not install
    assert postgres["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]


def test_the_values_and_secret_name_only_settings_the_code_reads(
    values: dict[str, Any], secret: dict[str, Any]
) -> None:
    names = set(deployment_env(values)) | set(secret["stringData"])
    assert {"DAGSTER_EXECUTOR", "GCS_BUCKET_NAME", "VERTEX_PROJECT_ID", "MLFLOW_TRACKING_URI"} <= names
    assert sorted(n for n in names if not read_by_settings(n)) == []


def test_the_definitions_load_with_the_k8s_executor_those_values_select(
    values: dict[str, Any], secret: dict[str, Any], tmp_path: Path
) -> None:
    env = {**secret["stringData"], **deployment_env(values)}
    settings = IsolatedSettings(PROMPTOPT_HOME=tmp_path, **env)
    assert settings.LLM_BACKEND == "vertex"
    assert settings.storage_root == f"gs://{env['GCS_BUCKET_NAME']}/{env['GCS_PREFIX']}"
    defs = build_definitions(settings)
    for job in (ITERATION_JOB, REPORT_JOB):
        assert defs.resolve_job_def(job).executor_def.name == "k8s"
    # the repository loads as the code server would serve it (every job's plan and config schema)
    assert {job.name for job in defs.get_repository_def().get_all_jobs()} >= {ITERATION_JOB, REPORT_JOB}
