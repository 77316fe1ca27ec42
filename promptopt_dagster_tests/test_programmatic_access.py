"""The README's "Programmatic access": the example script starts a study through Dagster's GraphQL
API against a real `dagster dev`, polls it to its stop, and loads the champion through a real
`mlflow server` over the same store, then fills it for one row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from promptopt_dagster.examples import programmatic_access
from promptopt_dagster_tests.support.dagster_dev import DagsterDev
from promptopt_dagster_tests.support.mlflow_server import MlflowServer
from promptopt_dagster_tests.support.scripted import write_dataset

pytest_plugins = ["promptopt_dagster_tests.support.ui_fixtures"]
pytestmark = pytest.mark.e2e

STUDY = "apistudy"


def test_a_study_started_over_graphql_ends_with_a_champion_ready_to_send(
    dagster_dev: DagsterDev, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_dataset(dagster_dev.datasets / f"{STUDY}.csv", rows=24)
    study_file = tmp_path / "study.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": STUDY,
                "dataset": f"{STUDY}.csv",  # relative: the deployment's datasets location
                "input_columns": ["review"],
                "reference_column": "label",
                "id_column": "id",
                "seed_prompt": {"output_prompt": "{review}"},
                "max_iterations": 1,
                "candidates_per_iteration": 2,
                "minibatch_size": 4,
            }
        )
    )
    store = f"sqlite:///{dagster_dev.home / 'mlflow.db'}"
    with MlflowServer(store, tmp_path / "artifacts") as mlflow_server:
        code = programmatic_access.main(
            [
                str(study_file),
                "--dagster",
                dagster_dev.url,
                "--mlflow",
                mlflow_server.url,
                "--row",
                json.dumps({"review": "The kettle is {great}."}),
                "--timeout",
                "420",
            ]
        )
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    health, report, ready = lines
    assert health["mlflow"] == "OK" and "dagster_webserver_version" in health["dagster"]
    assert report["report"]["stop_message"]  # the study reached a stop rule
    messages = ready["messages"]
    assert messages[-1]["role"] == "user" and "The kettle is {great}." in messages[-1]["content"]
    assert all(set(m) == {"role", "content"} for m in messages)


def test_health_check_names_the_server_that_is_down(dagster_dev: DagsterDev) -> None:
    with pytest.raises(RuntimeError, match=r"http://127\.0\.0\.1:9/health does not answer"):
        programmatic_access.check_health(dagster_dev.url, "http://127.0.0.1:9")
