"""The LLM calls of an iteration as one MLflow trace, built after the fact from the predictions
the evaluations already returned (`core.inference.run_prompt`: one row per call with its reply,
tokens, cost and seconds): a root span for the iteration, a span per prompt evaluated (the
incumbent, then each candidate) and under it a ``CHAT_MODEL`` span per call, with the rendered
messages as inputs and the reply as outputs (both redacted).

The predictions keep each call's duration but not its start, so the call spans are laid out back
to back from the iteration's start with their measured durations. At most `MAX_TRACE_SPANS`
calls are kept per iteration (the first rows of each prompt, shared out evenly); the number
skipped is recorded on the trace."""

from __future__ import annotations

import math
import time
from typing import Any

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.redaction import redact
from promptopt_dagster.tracking.connection import mlflow_global_uris
from promptopt_dagster.tracking.run_log import IterationValues
from promptopt_dagster.tracking.store import LiveStore

MAX_TRACE_SPANS = 200
TAG_TRACE_KEY = "promptopt.trace_key"


def _number(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _call_span(prompt: PromptState, row: dict[str, Any], input_columns: list[str]) -> dict[str, Any]:
    inputs = {c: row.get(c) for c in input_columns}
    try:
        messages: Any = [{"role": m["role"], "content": redact(m["content"])} for m in prompt.render(inputs)]
    except Exception:  # a row the prompt cannot render: its inputs instead
        messages = {k: redact(str(v)) for k, v in inputs.items()}
    error = row.get("error")
    error = None if error is None or (isinstance(error, float) and math.isnan(error)) else redact(str(error))
    return {
        "name": f"call {row.get('split')}/{row.get('row_id')}",
        "inputs": {"messages": messages},
        "outputs": {
            "reply": redact(str(row.get("reply") or "")),
            "prediction": redact(str(row.get("prediction") or "")),
        },
        "attributes": {
            "row_id": str(row.get("row_id")),
            "split": str(row.get("split")),
            "cached": bool(row.get("cached", False)),
            "prompt_tokens": _number(row.get("prompt_tokens")),
            "completion_tokens": _number(row.get("completion_tokens")),
            "cost_usd": _number(row.get("cost_usd")),
            "error": error,
        },
        "seconds": max(_number(row.get("seconds")) or 0.0, 0.0),
        "error": error is not None,
    }


def iteration_trace(v: IterationValues, start_ms: int | None) -> dict[str, Any]:
    """The trace of `v`'s LLM calls (JSON-friendly, for `MlflowTracker.log_trace`): ``groups``
    (one per prompt evaluated, each with its ``calls``), ``skipped`` and the start in ns."""
    cand_preds = v.candidate_predictions
    evaluated: list[tuple[str, PromptState, pd.DataFrame]] = [
        ("incumbent", v.incumbent, v.baseline_predictions)
    ]
    for cand in v.candidates:
        preds = cand_preds[cand_preds["candidate_id"].astype(str) == cand.prompt.id]
        evaluated.append((f"candidate {cand.prompt.id} ({cand.strategy})", cand.prompt, preds))
    total = sum(len(p) for _, _, p in evaluated)
    share = max(MAX_TRACE_SPANS // max(len(evaluated), 1), 1)
    columns = list(v.study.input_columns)
    groups = [
        {
            "name": name,
            "prompt_id": prompt.id,
            "calls": [_call_span(prompt, r, columns) for r in preds.head(share).to_dict(orient="records")],
        }
        for name, prompt, preds in evaluated
    ]
    kept = sum(len(g["calls"]) for g in groups)
    start_ns = int((start_ms if start_ms is not None else time.time() * 1000) * 1_000_000)
    return {
        "name": f"iteration-{v.record.iteration:04d}",
        "start_ns": start_ns,
        "groups": groups,
        "calls": total,
        "skipped": total - kept,
    }


def write_trace(store: LiveStore, exp_id: str, run_id: str, key: str, trace: dict[str, Any]) -> str | None:
    """`trace` as one MLflow trace in experiment `exp_id`, linked to `run_id` and tagged `key`;
    a trace already tagged `key` is kept (returns None). MLflow's tracing API writes through the
    global tracking URI, so it is set for this block.

    Written once also when processes write it at the same moment: under the store's creation
    lock on a local store, and on a server each writer then keeps the trace of `key` with the
    smallest id and deletes the others. A trace is not written to once ended, so deleting one
    loses nothing, and the writer whose trace becomes visible last sees all of them."""
    client = store.client
    with store.creating():
        if _traces_of(store, exp_id, key):
            return None
        trace_id = _write(store, exp_id, run_id, key, trace)
    kept, *others = sorted(_traces_of(store, exp_id, key)) or [trace_id]
    if others:
        client.delete_traces(exp_id, trace_ids=others)
    return trace_id if kept == trace_id else None


def _traces_of(store: LiveStore, exp_id: str, key: str) -> list[str]:
    """The ids of the traces tagged `key` in experiment `exp_id`."""
    found = store.client.search_traces(
        locations=[exp_id], filter_string=f"tags.`{TAG_TRACE_KEY}` = '{key}'", include_spans=False
    )
    return [t.info.trace_id for t in found]


def _write(store: LiveStore, exp_id: str, run_id: str, key: str, trace: dict[str, Any]) -> str:
    import mlflow

    client = store.client
    t = int(trace["start_ns"])
    with mlflow_global_uris(store.tracking_uri, store.registry_uri):
        root = client.start_trace(
            trace["name"],
            inputs={"calls": trace["calls"], "calls_skipped": trace["skipped"]},
            tags={TAG_TRACE_KEY: key, "promptopt.calls_skipped": str(trace["skipped"])},
            experiment_id=exp_id,
            start_time_ns=t,
            run_id=run_id,
        )
        trace_id = root.trace_id
        for group in trace["groups"]:
            attributes = {"prompt_id": group["prompt_id"]}
            span = client.start_span(
                group["name"], trace_id, root.span_id, "CHAIN", attributes=attributes, start_time_ns=t
            )
            for call in group["calls"]:
                end = t + int(call["seconds"] * 1e9)
                child = client.start_span(
                    call["name"],
                    trace_id,
                    span.span_id,
                    "CHAT_MODEL",
                    inputs=call["inputs"],
                    attributes=call["attributes"],
                    start_time_ns=t,
                )
                status = "ERROR" if call["error"] else "OK"
                client.end_span(trace_id, child.span_id, call["outputs"], status=status, end_time_ns=end)
                t = end
            client.end_span(trace_id, span.span_id, end_time_ns=t)
        client.end_trace(trace_id, end_time_ns=t)
        mlflow.flush_trace_async_logging()
    return str(trace_id)
