"""A VertexLLM client of the test Vertex server (support/vertex_server.py), for the Vertex tests:
`make_llm` and `ask`."""

from __future__ import annotations

from typing import Any

from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.vertex import VertexLLM
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster_tests.support.vertex_server import VertexServer

TOKEN = "test-token-5ecret-b1d3"
MODEL = "gemini-2.0-flash"


def make_llm(server: VertexServer, **options: Any) -> VertexLLM:
    """A client of the test server: VertexOptions from `options`, the rest (checkpoint_path,
    progress) passed to VertexLLM itself."""
    client_args = {k: options.pop(k) for k in ("checkpoint_path", "progress") if k in options}
    values: dict[str, Any] = {"project_id": "proj", "api_endpoint": server.base_url, "access_token": TOKEN,
                              "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0}
    values.update(options)
    return VertexLLM(VertexOptions(**values), MODEL, **client_args)


def ask(text: str, **params: Any) -> ChatRequest:
    return ChatRequest.of([{"role": "user", "content": text}], **params)
