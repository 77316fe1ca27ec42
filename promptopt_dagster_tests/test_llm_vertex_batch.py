"""Vertex batch prediction jobs against the test Vertex server and the GCS emulator: a job's
round trip (input on GCS, polling, a failed row, cost at the batch price), and a job that fails."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.vertex_batch import BatchProgress
from promptopt_dagster.storage import list_files, read_text
from promptopt_dagster_tests.support.gcs_emulator import (
    GcsEmulator,
    gcs_emulator,  # noqa: F401
)
from promptopt_dagster_tests.support.vertex_client import (
    MODEL,
    ask,
    make_llm,
)
from promptopt_dagster_tests.support.vertex_requests import user_text
from promptopt_dagster_tests.support.vertex_server import VertexServer


@pytest.mark.e2e
def test_batch_job_round_trip_with_a_failed_row(
    vertex_server: VertexServer, gcs_emulator: GcsEmulator  # noqa: F811
) -> None:
    def responder(body: dict[str, Any]) -> str:
        text = user_text(body)
        if text == "q2":
            raise ValueError("content blocked for row q2")
        return f"batch: {text}"

    vertex_server.responder = responder
    prefix = gcs_emulator.uri("vertex-batch", uuid.uuid4().hex[:8])
    progress: list[BatchProgress] = []
    llm = make_llm(vertex_server, batch_threshold=4, batch_gcs_prefix=prefix, batch_poll_s=0.05,
                   progress=progress.append, prices={MODEL: (1.0, 1.0)})
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    requests = [ask(f"q{i}") for i in range(5)] + [ask("json", json_schema=schema)]
    replies = llm.generate(requests)

    assert [r.text for r in replies[:5]] == ["batch: q0", "batch: q1", "", "batch: q3", "batch: q4"]
    assert "content blocked for row q2" in (replies[2].error or "")
    assert replies[5].text == "batch: json"
    assert all(r.prompt_tokens > 0 for r in replies if r.ok)
    assert not vertex_server.generate_requests()  # nothing went online
    # the job: input written to GCS, created with src/dest, polled to a terminal state
    [job_request] = [r for r in vertex_server.requests if r.method == "POST" and r.kind == "batch"]
    src = job_request.body["inputConfig"]["gcsSource"]["uris"][0]  # type: ignore[index]
    assert src.startswith(prefix) and src.endswith("/requests.jsonl")
    lines = [json.loads(line) for line in read_text(src).splitlines()]
    assert [line["key"] for line in lines] == [f"row-{i:07d}" for i in range(6)]
    assert lines[5]["request"]["generationConfig"]["responseMimeType"] == "application/json"
    assert list_files(job_request.body["outputConfig"]["gcsDestination"]["outputUriPrefix"], "**/*.jsonl")  # type: ignore[index]
    states = [p.state for p in progress]
    assert states[0] == "JOB_STATE_PENDING" and "JOB_STATE_RUNNING" in states
    assert states[-1] == "JOB_STATE_SUCCEEDED"
    assert progress[-1].completed == 5 and progress[-1].failed == 1
    usage = llm.usage(replies, batch=True)
    assert usage.cost_usd == pytest.approx(usage.tokens / 1e6 * 0.5)

    # below the threshold the same client goes online
    assert llm.generate([ask("small")])[0].text == "batch: small"
    assert len(vertex_server.generate_requests()) == 1


@pytest.mark.e2e
def test_batch_job_that_fails_as_a_whole_raises(
    vertex_server: VertexServer, gcs_emulator: GcsEmulator  # noqa: F811
) -> None:
    vertex_server.fail_batch_jobs_with = "quota for batch prediction exceeded"
    prefix = gcs_emulator.uri("vertex-batch", uuid.uuid4().hex[:8])
    llm = make_llm(vertex_server, batch_mode="batch", batch_gcs_prefix=prefix, batch_poll_s=0.05)
    with pytest.raises(ModelError, match="JOB_STATE_FAILED: .*quota for batch prediction exceeded"):
        llm.generate([ask("a")])
    with pytest.raises(ModelError, match="batch_gcs_prefix"):
        make_llm(vertex_server, batch_mode="batch")
