"""Batch prediction jobs of the fake Vertex server (support/vertex_server.py).

A job is created by ``POST .../batchPredictionJobs`` and runs at once on a worker thread: it reads
every JSONL line of its input from GCS, answers each line's ``request`` and writes
``<outputUriPrefix>/prediction-model-<stamp>/predictions.jsonl``, one line per input line (the
input's other fields, the ``request``, and a ``response`` or a ``status`` error). Each
``GET .../batchPredictionJobs/{id}`` is one poll: the job reads RUNNING until it is done and has
been polled `polls_before_done` times, then SUCCEEDED (FAILED if it failed as a whole).

Reading and writing use google-cloud-storage with anonymous credentials, so
``STORAGE_EMULATOR_HOST`` must point at a GCS emulator (support/gcs_emulator.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# (model name, request body) -> the generateContent response body for it; raising fails the row.
Answer = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class BatchJob:
    name: str
    model: str
    display_name: str
    input_uris: list[str]
    output_prefix: str
    state: str = "JOB_STATE_PENDING"
    polls: int = 0
    done: bool = False
    output_dir: str = ""
    error: dict[str, Any] | None = None
    succeeded: int = 0
    failed: int = 0
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def from_request(cls, name: str, body: dict[str, Any]) -> BatchJob:
        """The job a create request asks for; ValueError if it lacks its input or output."""
        try:
            uris = list(body["inputConfig"]["gcsSource"]["uris"])
            prefix = str(body["outputConfig"]["gcsDestination"]["outputUriPrefix"])
        except (KeyError, TypeError):
            raise ValueError(
                "batch job needs inputConfig.gcsSource.uris and outputConfig.gcsDestination.outputUriPrefix"
            ) from None
        return cls(
            name=name,
            model=body.get("model", ""),
            display_name=body.get("displayName", ""),
            input_uris=uris,
            output_prefix=prefix,
        )

    def poll(self, polls_before_done: int) -> None:
        """One GET: advance the state the caller then reads."""
        self.polls += 1
        if self.error:
            self.state = "JOB_STATE_FAILED"
        elif self.done and self.polls >= polls_before_done:
            self.state = "JOB_STATE_SUCCEEDED"
        else:
            self.state = "JOB_STATE_RUNNING"

    def resource(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "displayName": self.display_name,
            "model": self.model,
            "state": self.state,
            "createTime": self.created,
            "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": self.input_uris}},
            "outputConfig": {
                "predictionsFormat": "jsonl",
                "gcsDestination": {"outputUriPrefix": self.output_prefix},
            },
        }
        if self.state == "JOB_STATE_SUCCEEDED":
            out["outputInfo"] = {"gcsOutputDirectory": self.output_dir}
            out["completionStats"] = {"successfulCount": str(self.succeeded), "failedCount": str(self.failed)}
        if self.error:
            out["error"] = self.error
        return out

    def run(self, answer: Answer, fail_with: str | None = None) -> None:
        """Read every input line, answer it, write predictions.jsonl; `fail_with` fails the whole
        job with that message instead."""
        try:
            if fail_with:
                raise RuntimeError(fail_with)
            client = _storage_client()
            lines: list[str] = []
            for uri in self.input_uris:
                bucket, name = _split_gs(uri)
                lines.extend(client.bucket(bucket).blob(name).download_as_text().splitlines())
            out_lines = []
            model = self.model.rsplit("/", 1)[-1]
            for line in filter(str.strip, lines):
                instance = json.loads(line)
                request = instance.get("request", {})
                result: dict[str, Any] = {k: v for k, v in instance.items() if k != "request"}
                result.update(request=request, processed_time=datetime.now(UTC).isoformat())
                try:
                    result.update(status="", response=answer(model, request))
                    self.succeeded += 1
                except Exception as exc:
                    result["status"] = f"Bad Request: {exc}"
                    self.failed += 1
                out_lines.append(json.dumps(result))
            stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S%f")
            self.output_dir = f"{self.output_prefix.rstrip('/')}/prediction-model-{stamp}"
            bucket, name = _split_gs(f"{self.output_dir}/predictions.jsonl")
            client.bucket(bucket).blob(name).upload_from_string("\n".join(out_lines) + "\n")
        except Exception as exc:
            self.error = {"code": 3, "message": f"batch job failed: {exc}"}
        self.done = True


def _split_gs(uri: str) -> tuple[str, str]:
    if not uri.startswith("gs://"):
        raise ValueError(f"not a gs:// URI: {uri}")
    bucket, _, name = uri[5:].partition("/")
    return bucket, name


def _storage_client() -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        raise RuntimeError("batch jobs need a GCS emulator: set STORAGE_EMULATOR_HOST")
    return storage.Client(project="test", credentials=AnonymousCredentials())
