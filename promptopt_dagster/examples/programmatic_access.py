"""Programmatic access, with the two servers `promptopt ui` runs and no server of our own: start a
study through Dagster's GraphQL API, poll it to its stop, then load its champion prompt through
MLflow's REST API and turn it into ready chat messages for one row.

    python -m promptopt_dagster.examples.programmatic_access STUDY.yaml \
        --dagster http://127.0.0.1:3000 --mlflow http://127.0.0.1:5000 --row '{"review": "Great!"}'

The study file's fields are the Launchpad's fields (the `start_study` job's config is built from
them), so the same YAML starts the same study from a file, the CLI, the Launchpad or this script.
A relative `dataset` is resolved against the datasets location of the Dagster deployment.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import urlparse

import mlflow
import requests
import yaml
from dagster_graphql import DagsterGraphQLClient

from promptopt_dagster.core.prompt_state import messages_for_row

REPORT_QUERY = """
query($key: AssetKeyInput!, $partition: String!) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId
        metadataEntries { label ... on TextMetadataEntry { text } ... on FloatMetadataEntry { floatValue } }
      }
    }
  }
}
"""


def check_health(dagster_url: str, mlflow_url: str) -> dict[str, Any]:
    """Both servers' health endpoints: Dagster's `/server_info` (its versions, as JSON) and
    MLflow's `/health` (the text `OK`). Raises naming the URL that did not answer."""

    def get(url: str) -> requests.Response:
        try:
            reply = requests.get(url, timeout=10)
            reply.raise_for_status()
        except requests.RequestException as exc:
            raise RuntimeError(f"{url} does not answer: {type(exc).__name__}") from exc
        return reply

    info = get(f"{dagster_url}/server_info")
    health = get(f"{mlflow_url}/health")
    if health.text.strip() != "OK":
        raise RuntimeError(f"{mlflow_url}/health answered {health.text!r}")
    return {"dagster": info.json(), "mlflow": health.text.strip()}


def start_study(client: DagsterGraphQLClient, study: dict[str, Any], timeout_s: float = 120) -> str:
    """Launch the `start_study` job with the study's fields as its config and wait for it:
    SUCCESS means the study was checked and registered; the sensors then run its iterations."""
    run_id = client.submit_job_execution(
        "start_study", run_config={"ops": {"register_study": {"config": study}}}
    )
    deadline = time.monotonic() + timeout_s
    while (status := client.get_run_status(run_id).value) not in ("SUCCESS", "FAILURE", "CANCELED"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"start_study run {run_id} still {status} after {timeout_s:.0f} s")
        time.sleep(1)
    if status != "SUCCESS":
        raise RuntimeError(f"start_study run {run_id} ended {status}: see it in the Dagster UI")
    return run_id


def wait_for_report(dagster_url: str, study: str, timeout_s: float = 1800) -> dict[str, Any]:
    """Poll until the study's `study_report` is materialized (the sensors write it when a stop
    rule fires); its metadata (stop reason, scores) as a dict."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = requests.post(
            f"{dagster_url}/graphql",
            json={
                "query": REPORT_QUERY,
                "variables": {"key": {"path": ["study_report"]}, "partition": study},
            },
            timeout=30,
        )
        reply.raise_for_status()
        found = (reply.json()["data"]["assetOrError"] or {}).get("assetMaterializations") or []
        if found:
            return {e["label"]: e.get("text", e.get("floatValue")) for e in found[0]["metadataEntries"]}
        if time.monotonic() > deadline:
            raise TimeoutError(f"study {study} has no report after {timeout_s:.0f} s")
        time.sleep(2)


def champion_messages(mlflow_url: str, study: str, row: dict[str, Any]) -> list[dict[str, str]]:
    """The study's champion from the MLflow Prompt Registry, filled for `row`."""
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    prompt = mlflow.genai.load_prompt(f"prompts:/promptopt-{study}@champion")
    return messages_for_row(prompt, row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", help="a study YAML file")
    parser.add_argument("--dagster", default="http://127.0.0.1:3000", help="Dagster webserver URL")
    parser.add_argument("--mlflow", default="http://127.0.0.1:5000", help="MLflow server URL")
    parser.add_argument("--row", default="{}", help="a JSON object: the input columns of one row")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the stop")
    args = parser.parse_args(argv)

    with open(args.study, encoding="utf-8") as handle:
        study = yaml.safe_load(handle)
    print(json.dumps(check_health(args.dagster, args.mlflow)))
    url = urlparse(args.dagster)
    client = DagsterGraphQLClient(
        url.hostname or "127.0.0.1", port_number=url.port, use_https=url.scheme == "https"
    )
    run_id = start_study(client, study)
    print(f"registered {study['name']} (run {run_id})")
    report = wait_for_report(args.dagster, study["name"], args.timeout)
    print(json.dumps({"report": report}))
    print(json.dumps({"messages": champion_messages(args.mlflow, study["name"], json.loads(args.row))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
