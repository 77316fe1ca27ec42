"""Vertex AI batch prediction jobs: many rows as one job through GCS, at half the online price.

The requests are written as JSONL under the options' `batch_gcs_prefix`, one job runs them
(`client.batches.create`), it is polled with a progress callback until it ends, and its
predictions JSONL is read back and joined to the rows by a key carried in each line (or, when the
output drops the key, by the echoed request).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse
from promptopt_dagster.llm.vertex_errors import MAX_MESSAGE, describe, hint
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.llm.vertex_wire import RequestBodies, parse_generate_response
from promptopt_dagster.redaction import Redactor

if TYPE_CHECKING:
    from google import genai

logger = logging.getLogger(__name__)

TERMINAL_JOB_STATES = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_FAILED",
                                 "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"})
_ANSWERED_STATES = ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED")


@dataclass(frozen=True)
class BatchProgress:
    """What the progress callback sees at each poll of a batch job."""

    job_name: str
    state: str
    elapsed_s: float
    completed: int | None = None
    failed: int | None = None
    total: int = 0


ProgressCallback = Callable[[BatchProgress], None]
# USD for (model, prompt tokens, completion tokens, discount).
CostFunction = Callable[[str, int, int, float], float]


class VertexBatchJob:
    """Runs requests as Vertex batch prediction jobs; rows a job could not answer come back with
    `error`, and a job that fails as a whole raises ModelError."""

    def __init__(
        self,
        client: Callable[[], genai.Client],
        options: VertexOptions,
        bodies: RequestBodies,
        redact: Redactor,
        cost: CostFunction,
        progress: ProgressCallback | None = None,
    ) -> None:
        self._client = client  # the sync client, created on first use
        self.options = options
        self._bodies = bodies
        self._redact = redact
        self._cost = cost
        self.progress = progress

    def run(self, requests: Sequence[ChatRequest], model: str) -> list[ChatResponse]:
        from google.genai import types

        from promptopt_dagster.storage import write_text

        prefix = self.options.batch_gcs_prefix
        if not prefix:
            raise ModelError("batch mode needs a gs:// staging folder: set batch_gcs_prefix")
        run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        base = f"{prefix.rstrip('/')}/{run_id}"
        keys = [f"row-{i:07d}" for i in range(len(requests))]
        bodies = [self._bodies.build(r) for r in requests]
        lines = [json.dumps({"key": k, "request": b}, ensure_ascii=False)
                 for k, b in zip(keys, bodies, strict=True)]
        write_text(f"{base}/requests.jsonl", "\n".join(lines) + "\n")
        started = time.monotonic()
        try:
            client = self._client()
            job = client.batches.create(
                model=model, src=f"{base}/requests.jsonl",
                config=types.CreateBatchJobConfig(dest=f"{base}/out/", display_name=f"promptopt-{run_id}"))
            name = job.name or ""
            logger.info("vertex: batch job %s started for %d rows (%s)", name, len(requests), base)
            job, state = self._wait(client, job, started, len(requests))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(self._redact(f"Vertex AI batch job for model {model} failed to run: "
                                          f"{describe(exc)[:MAX_MESSAGE]}. Fix: {hint(exc)}")) from None
        if state not in _ANSWERED_STATES:
            detail = job.error.message if job.error is not None else "no detail"
            raise ModelError(self._redact(
                f"Vertex AI batch job {name} ended {state}: {detail}. Fix: check its input at "
                f"{base}/requests.jsonl and the job in the Cloud console, then re-run"))
        out_dir = (job.output_info.gcs_output_directory if job.output_info else None) or f"{base}/out"
        return self._read_predictions(out_dir, keys, bodies, model, time.monotonic() - started)

    def _wait(self, client: genai.Client, job: Any, started: float, total: int) -> tuple[Any, str]:
        """Poll until the job ends (or the options' batch_timeout_s passes): (job, final state)."""
        name = job.name or ""
        deadline = started + self.options.batch_timeout_s
        while True:
            state = job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED"
            self._report(job, state, started, total)
            if state in TERMINAL_JOB_STATES:
                return job, state
            if time.monotonic() > deadline:
                raise ModelError(
                    f"batch job {name} still {state} after {self.options.batch_timeout_s:.0f} s. Fix: raise "
                    f"batch_timeout_s, or cancel it (client.batches.cancel) and re-run online "
                    f"(batch_mode='online')")
            time.sleep(self.options.batch_poll_s)
            job = client.batches.get(name=name)

    def _report(self, job: Any, state: str, started: float, total: int) -> None:
        if self.progress is None:
            return
        stats = job.completion_stats
        completed = getattr(stats, "successful_count", None)
        failed = getattr(stats, "failed_count", None)
        self.progress(BatchProgress(
            job_name=job.name or "", state=state, elapsed_s=time.monotonic() - started, total=total,
            completed=None if completed is None else int(completed),
            failed=None if failed is None else int(failed)))

    def _read_predictions(
        self, out_dir: str, keys: list[str], bodies: list[dict[str, Any]], model: str, seconds: float
    ) -> list[ChatResponse]:
        from promptopt_dagster.storage import list_files, read_text

        files = list_files(out_dir, "**/*.jsonl") or list_files(out_dir, "*.jsonl")
        index = {k: i for i, k in enumerate(keys)}
        # Fallback join when the output drops the key: the echoed request, canonicalised.
        by_body: dict[str, list[int]] = {}
        for i, body in enumerate(bodies):
            by_body.setdefault(json.dumps(body, sort_keys=True), []).append(i)
        results: list[ChatResponse | None] = [None] * len(keys)
        per_row = seconds / max(1, len(keys))
        for uri in files:
            for line in read_text(uri).splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                row = index.get(item.get("key", ""))
                if row is None:
                    candidates = by_body.get(json.dumps(item.get("request"), sort_keys=True), [])
                    row = candidates.pop(0) if candidates else None
                if row is None:
                    continue
                results[row] = self._prediction(item, model, per_row)
        missing = ("missing from the batch job's output. Fix: re-run; with a checkpoint (response cache) "
                   "only the missing rows are sent again")
        return [r if r is not None else ChatResponse(error=missing) for r in results]

    def _prediction(self, item: dict[str, Any], model: str, seconds: float) -> ChatResponse:
        status = item.get("status") or ""
        response = item.get("response")
        if status or not response:
            why = self._redact(f"batch row failed: {status or 'no response'}")[:MAX_MESSAGE]
            return ChatResponse(error=why, seconds=seconds)
        text, reason, prompt_tokens, completion_tokens = parse_generate_response(response)
        if text is None:
            return ChatResponse(error=f"batch row has no text (finish reason: {reason})", seconds=seconds)
        cost = self._cost(model, prompt_tokens, completion_tokens, self.options.batch_discount)
        return ChatResponse(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            seconds=seconds, cost_usd=cost)
