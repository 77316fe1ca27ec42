"""VertexLLM online against a local server speaking the Vertex REST protocol: request shape,
retries, Retry-After, rejection, ordering, concurrency and rate bounds, partial failure with
checkpoints, JSON mode, usage and cost, secrets. Batch jobs: test_llm_vertex_batch.py."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.errors import DatasetError, ModelError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, LLMClient
from promptopt_dagster.llm.ratelimit import SlidingWindowLimiter
from promptopt_dagster.llm.vertex import VertexLLM
from promptopt_dagster.llm.vertex_errors import retry_after_seconds
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.llm.vertex_prices import estimate_cost
from promptopt_dagster_tests.support.gcs_emulator import (
    gcs_emulator,  # noqa: F401
)
from promptopt_dagster_tests.support.vertex_client import (
    MODEL,
    TOKEN,
    ask,
    make_llm,
)
from promptopt_dagster_tests.support.vertex_faults import Fault
from promptopt_dagster_tests.support.vertex_requests import count_tokens, user_text
from promptopt_dagster_tests.support.vertex_server import VertexServer


@pytest.mark.e2e
def test_request_shape_usage_and_cost(vertex_server: VertexServer) -> None:
    llm = make_llm(vertex_server, prices={MODEL: (1.0, 2.0)})
    assert isinstance(llm, LLMClient) and llm.backend == "vertex" and llm.model == MODEL
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    request = ChatRequest.of(messages, temperature=0.3, max_tokens=17)
    [reply] = llm.generate([request])
    assert reply.ok and reply.text == "echo: hello"
    [seen] = vertex_server.generate_requests()
    prefix = "/v1beta1/projects/proj/locations/us-central1/publishers/google/models"
    assert seen.path == f"{prefix}/{MODEL}:generateContent"
    assert seen.auth_scheme == "Bearer"
    assert seen.body is not None
    assert seen.body["systemInstruction"]["parts"][0]["text"] == "Be brief."
    assert seen.body["contents"] == [{"role": "user", "parts": [{"text": "hello"}]}]
    assert seen.body["generationConfig"] == {"temperature": 0.3, "maxOutputTokens": 17}
    # tokens from usage_metadata, cost from the price table
    assert reply.prompt_tokens == count_tokens("Be brief.hello")
    assert reply.completion_tokens == count_tokens("echo: hello")
    assert reply.seconds > 0
    usage = llm.usage([reply])
    expected = (reply.prompt_tokens * 1.0 + reply.completion_tokens * 2.0) / 1e6
    assert usage.calls == 1 and usage.cost_usd == pytest.approx(expected)
    million = 1_000_000
    versioned = "publishers/google/models/gemini-2.0-flash-001"
    assert estimate_cost(versioned, million, million) == pytest.approx(0.75)
    assert estimate_cost("unknown-model", 10, 10) == 0.0


@pytest.mark.e2e
def test_clients_share_one_tls_context(vertex_server: VertexServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every batch gets a new client; the CA bundle is loaded once per VertexLLM, not three times
    per client, and that one context is what the clients' transports verify with."""
    import ssl

    built: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(create(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    llm = make_llm(vertex_server)
    for text in ("one", "two", "three"):
        [reply] = llm.generate([ask(text)])
        assert reply.ok and reply.text == f"echo: {text}"
    assert len(built) == 1
    api = llm.client._api_client
    assert api._async_client_session_request_args["ssl"] is built[0]
    assert api._websocket_ssl_ctx["ssl"] is built[0]
    assert llm.client._api_client._http_options.client_args == {"verify": built[0]}


@pytest.mark.e2e
def test_rest_transport_sends_what_the_sdk_sends(vertex_server: VertexServer) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["answer"]}
    requests = [
        ChatRequest.of([{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
                       temperature=0.7, max_tokens=33, seed=5),
        ask("j", json_schema=schema),
    ]
    rest = make_llm(vertex_server, transport="rest").generate(requests)
    sdk = make_llm(vertex_server, transport="sdk").generate(requests)
    def essentials(replies: list[ChatResponse]) -> list[tuple[str, int, int, str | None]]:
        return [(r.text, r.prompt_tokens, r.completion_tokens, r.error) for r in replies]

    assert essentials(rest) == essentials(sdk) and all(r.ok for r in rest)
    seen = vertex_server.generate_requests()
    assert [r.path for r in seen[:2]] == [r.path for r in seen[2:]]
    # The SDK writes the schema's "property_ordering" in snake case; the API takes both spellings.
    assert [camel(r.body) for r in seen[:2]] == [camel(r.body) for r in seen[2:]]


def camel(value: Any) -> Any:
    if isinstance(value, dict):
        return {re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): camel(v) for k, v in value.items()}
    return [camel(v) for v in value] if isinstance(value, list) else value


@pytest.mark.e2e
def test_json_mode_sends_schema_and_retries_prose(vertex_server: VertexServer) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    llm = make_llm(vertex_server, max_attempts=3)
    vertex_server.inject(Fault("non_json_reply", times=1))
    [reply] = llm.generate([ask("2+2", json_schema=schema)])
    assert json.loads(reply.text) == {"answer": "2+2"}
    requests = vertex_server.generate_requests()
    assert len(requests) == 2  # the prose reply was retried once
    config = requests[0].body["generationConfig"]  # type: ignore[index]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["properties"]["answer"]["type"] == "STRING"

    vertex_server.clear()
    vertex_server.inject(Fault("non_json_reply", times=None))
    [bad] = llm.generate([ask("3+3", json_schema=schema)])
    assert not bad.ok and "non-JSON" in (bad.error or "") and bad.text == ""
    assert len(vertex_server.generate_requests()) == 3


@pytest.mark.e2e
def test_transient_errors_are_retried_until_success(vertex_server: VertexServer) -> None:
    vertex_server.inject(Fault(status=429), Fault(status=500), Fault(status=503), Fault("malformed_json"))
    [reply] = make_llm(vertex_server, max_attempts=5).generate([ask("x")])
    assert reply.ok and reply.text == "echo: x"
    assert [r.status for r in vertex_server.generate_requests()] == [429, 500, 503, 200, 200]


@pytest.mark.e2e
def test_retries_run_out_into_a_row_error(vertex_server: VertexServer) -> None:
    vertex_server.inject(Fault(status=503, message="backend overloaded", times=None))
    [reply] = make_llm(vertex_server, max_attempts=3).generate([ask("x")])
    assert not reply.ok and "gave up after 3 attempt(s)" in (reply.error or "")
    assert "backend overloaded" in (reply.error or "")
    assert len(vertex_server.generate_requests()) == 3


@pytest.mark.e2e
def test_timeout_is_retried(vertex_server: VertexServer) -> None:
    vertex_server.inject(Fault("hang", hang_s=10))
    started = time.monotonic()
    [reply] = make_llm(vertex_server, timeout_s=0.3).generate([ask("x")])
    assert reply.ok
    assert 0.3 <= time.monotonic() - started < 5
    assert len(vertex_server.generate_requests()) == 2


@pytest.mark.e2e
def test_retry_after_is_honoured(vertex_server: VertexServer) -> None:
    vertex_server.inject(Fault(status=429, retry_after=1.0))
    started = time.monotonic()
    [reply] = make_llm(vertex_server).generate([ask("x")])
    elapsed = time.monotonic() - started
    assert reply.ok
    first, second = vertex_server.generate_requests()
    assert second.started - first.finished >= 0.9  # backoff alone would be ~0.01-0.05 s
    assert elapsed < 4.0


def test_retry_after_parsing() -> None:
    class Response:
        def __init__(self, value: str) -> None:
            self.headers = {"Retry-After": value}

    class Err(Exception):
        def __init__(self, value: str) -> None:
            self.response = Response(value)

    assert retry_after_seconds(Err("2.5")) == 2.5
    assert retry_after_seconds(Err("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0  # a date in the past
    assert retry_after_seconds(Err("soon")) is None
    assert retry_after_seconds(ValueError()) is None


@pytest.mark.e2e
def test_non_retryable_4xx_raises_with_the_server_message(vertex_server: VertexServer) -> None:
    invalid = "Unable to submit request because responseSchema is invalid"
    vertex_server.inject(Fault(status=400, message=invalid))
    with pytest.raises(ModelError) as caught:
        make_llm(vertex_server).generate([ask("x")])
    assert "responseSchema is invalid" in str(caught.value) and "400" in str(caught.value)
    assert "Fix:" in str(caught.value)
    assert len(vertex_server.generate_requests()) == 1

    vertex_server.clear()
    vertex_server.inject(Fault(status=404, message="model not found", when=lambda b: user_text(b) == "b"))
    replies = make_llm(vertex_server, raise_on_client_error=False).generate([ask("a"), ask("b"), ask("c")])
    assert [r.ok for r in replies] == [True, False, True]
    assert "model not found" in (replies[1].error or "")


@pytest.mark.e2e
def test_order_is_kept_under_random_latency(vertex_server: VertexServer) -> None:
    rng = random.Random(7)
    vertex_server.latency = lambda body: rng.uniform(0.0, 0.05)
    texts = [f"q{i}" for i in range(60)]
    replies = make_llm(vertex_server, concurrency=16).generate([ask(t) for t in texts])
    assert [r.text for r in replies] == [f"echo: {t}" for t in texts]
    arrival = [user_text(r.body or {}) for r in vertex_server.generate_requests()]
    by_finish = sorted(vertex_server.generate_requests(), key=lambda r: r.finished)
    finish = [user_text(r.body or {}) for r in by_finish]
    assert sorted(arrival) == sorted(texts) and finish != texts  # they did finish out of order


@pytest.mark.e2e
def test_concurrency_bound_is_respected(vertex_server: VertexServer) -> None:
    vertex_server.latency = 0.05
    replies = make_llm(vertex_server, concurrency=4).generate([ask(f"q{i}") for i in range(24)])
    assert all(r.ok for r in replies)
    assert vertex_server.max_in_flight == 4


@pytest.mark.e2e
def test_requests_per_window_are_limited(vertex_server: VertexServer) -> None:
    # A 2 s window: a send delayed by up to a second (the first calls open their connections, a
    # loaded machine) still arrives apart from the next window's sends.
    window, limit, n = 2.0, 5, 12
    started = time.monotonic()
    llm = make_llm(vertex_server, concurrency=12, requests_per_minute=limit, rate_window_s=window)
    replies = llm.generate([ask(f"q{i}") for i in range(n)])
    elapsed = time.monotonic() - started
    assert all(r.ok for r in replies)
    assert elapsed >= (-(-n // limit) - 1) * window * 0.95  # 3 windows' worth: at least 2 full waits
    # The limiter times sends; arrival adds a variable delay (the first calls also open their
    # connections), so the server-side check leaves slack, but an unlimited client sends all 12 at once.
    starts = sorted(r.started for r in vertex_server.generate_requests())
    for i, t in enumerate(starts):
        in_window = [s for s in starts[i:] if s < t + window * 0.5]
        assert len(in_window) <= limit


def test_token_limiter_corrects_its_estimate() -> None:
    async def scenario() -> tuple[float, bool]:
        limiter = SlidingWindowLimiter(limit=100, window_s=30)
        charge = await limiter.acquire(80)
        limiter.correct(charge, 10)  # the reply used far fewer tokens than estimated
        await asyncio.wait_for(limiter.acquire(85), timeout=1)  # fits only after the correction
        used = limiter.used
        try:  # now full: another charge must wait for the window (30 s), so it times out
            await asyncio.wait_for(limiter.acquire(10), timeout=0.2)
            waited = False
        except TimeoutError:
            waited = True
        return used, waited

    assert asyncio.run(scenario()) == (95, True)


@pytest.mark.e2e
def test_partial_failure_keeps_good_rows_and_checkpoint_resends_only_missing(
    vertex_server: VertexServer, tmp_path: Path
) -> None:
    failing = {"q3", "q7"}
    vertex_server.inject(Fault(status=503, times=None, when=lambda b: user_text(b) in failing))
    checkpoint = tmp_path / "checkpoint.sqlite"
    llm = make_llm(vertex_server, max_attempts=2, checkpoint_path=checkpoint)
    requests = [ask(f"q{i}") for i in range(10)]
    first = llm.generate(requests)
    assert [r.ok for r in first] == [f"q{i}" not in failing for i in range(10)]
    assert all("503" in (r.error or "") for r in first if not r.ok)
    assert len(vertex_server.generate_requests()) == 8 + 2 * 2

    vertex_server.clear()  # the outage is over
    second = llm.generate(requests)
    assert [r.text for r in second] == [f"echo: q{i}" for i in range(10)]
    assert sorted(user_text(r.body or {}) for r in vertex_server.generate_requests()) == ["q3", "q7"]
    assert sum(r.cached for r in second) == 8


@pytest.mark.e2e
def test_online_replies_are_reported_as_they_arrive(vertex_server: VertexServer) -> None:
    """What lets the response cache store a reply before its batch is done: the slow first row
    is reported last, every row once, with the reply `generate` returns for it."""
    vertex_server.latency = lambda body: 0.5 if user_text(body) == "q0" else 0.0
    heard: list[tuple[int, str]] = []
    replies = make_llm(vertex_server, concurrency=4).generate(
        [ask(f"q{i}") for i in range(6)], on_reply=lambda i, r: heard.append((i, r.text)))
    assert heard[-1] == (0, "echo: q0")
    assert sorted(heard) == [(i, r.text) for i, r in enumerate(replies)]


@pytest.mark.e2e
def test_original_api_generate_response_and_batch_predict(vertex_server: VertexServer) -> None:
    llm = make_llm(vertex_server)
    text = llm.generate_response(MODEL, "hi", system_content="sys", response_mime_type="application/json")
    assert json.loads(text) == {"answer": "hi"}
    config = vertex_server.generate_requests()[-1].body["generationConfig"]  # type: ignore[index]
    assert config["responseMimeType"] == "application/json" and "responseSchema" not in config

    vertex_server.clear()
    vertex_server.inject(Fault(status=400, message="bad", when=lambda b: "boom" in user_text(b), times=None))
    df = pd.DataFrame({"question": ["one", "boom", "three"], "label": ["a", "b", "c"]})
    state = PromptState(system_prompt="Answer.", output_prompt="Q: {question}")
    lenient = make_llm(vertex_server, raise_on_client_error=False)
    out = lenient.batch_predict(df, state, model_name="gemini-2.5-flash")
    assert list(out["prediction"]) == ["echo: Q: one", "", "echo: Q: three"]
    assert out["error"].isna().tolist() == [True, False, True]
    assert "gemini-2.5-flash:generateContent" in vertex_server.generate_requests()[0].path
    with pytest.raises(DatasetError, match="nope"):
        llm.batch_predict(df, PromptState(system_prompt="", output_prompt="{nope}"))
    with pytest.raises(ModelError, match="bad"):
        llm.generate_response(MODEL, "boom")


@pytest.mark.e2e
def test_generate_works_inside_a_running_event_loop(vertex_server: VertexServer) -> None:
    llm = make_llm(vertex_server)

    async def inside() -> str:
        return llm.generate([ask("loop")])[0].text

    assert asyncio.run(inside()) == "echo: loop"


@pytest.mark.e2e
def test_factory_builds_vertex_from_settings(vertex_server: VertexServer) -> None:
    from promptopt_dagster.llm.factory import build_client

    options = VertexOptions(project_id="proj", api_endpoint=vertex_server.base_url, access_token=TOKEN)
    llm = build_client(backend="vertex", model_name=MODEL, model_cache_dir="unused", response_cache_path=None,
                       vertex=options)
    assert isinstance(llm, VertexLLM) and llm.options is options  # passed through as it is
    assert llm.generate([ask("f")])[0].text == "echo: f"
    with pytest.raises(ModelError, match="VERTEX_PROJECT_ID"):
        VertexLLM(VertexOptions())
    assert VertexLLM(VertexOptions(project_id="p")).model == VertexOptions().primary_model


def test_options_check_the_price_table() -> None:
    assert VertexOptions().price_table()["gemini-2.5-flash"] == (0.30, 2.50)  # the built-in table
    assert VertexOptions(prices={MODEL: (1, 2)}).price_table() == {MODEL: (1.0, 2.0)}
    with pytest.raises(ValueError, match=r"VERTEX_PRICES\['m'\] must be \[input, output\]"):
        VertexOptions(prices={"m": [1.0]})
    with pytest.raises(ValueError, match="VERTEX_PRICES"):
        VertexOptions(prices={"m": [1.0, -2.0]})


@pytest.mark.e2e
def test_token_never_in_errors_logs_or_stored_rows(
    vertex_server: VertexServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A server that reflects the Authorization header into its error messages.
    vertex_server.inject(Fault(status=400, message="denied for {authorization}"))
    with pytest.raises(ModelError) as caught:
        make_llm(vertex_server).generate([ask("x")])
    assert vertex_server.generate_requests()[0].auth_scheme == "Bearer"
    checkpoint = tmp_path / "c.sqlite"
    vertex_server.inject(Fault(status=503, message="overloaded, token {authorization}", times=2),
                  Fault(status=403, message="forbidden {authorization}", times=1))
    llm = make_llm(vertex_server, max_attempts=2, raise_on_client_error=False, checkpoint_path=checkpoint)
    replies = llm.generate([ask("y"), ask("z")])
    shown = "".join(traceback.format_exception(caught.value))  # what a logged traceback would print
    seen = [shown, str(caught.value), repr(llm), repr(llm.options), llm.options.model_dump_json(),
            *(r.error or "" for r in replies),
            *(record.getMessage() for record in caplog.records), checkpoint.read_bytes().decode("latin-1")]
    assert any("***" in s for s in seen)  # the reflected token was there, and was masked
    for text in seen:
        assert TOKEN not in text
    with sqlite3.connect(checkpoint) as conn:
        assert all(TOKEN not in str(row) for row in conn.execute("SELECT * FROM responses"))
