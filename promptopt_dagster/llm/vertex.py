"""Gemini on Vertex AI, through the google-genai client (`vertexai.generative_models` is deprecated).

Online mode sends `generateContent` calls concurrently on one asyncio loop (`client.aio`), at most
`concurrency` in flight, held under a client-side requests/tokens-per-minute limit
(`ratelimit.RateLimiter`); replies come back in request order. Failed calls are retried or
rejected as `vertex_errors` says; a row that still fails after its retries comes back as
`ChatResponse(error=...)` and the other rows keep their replies.

Transport: by default (`transport="rest"`) each call builds the REST body itself (`vertex_wire`)
and sends it through the SDK's API client (`client.aio._api_client.async_request`: same auth, base
URL, HTTP session and `APIError` classes), then reads the JSON reply directly. The public
`client.aio.models.generate_content` costs about 1 ms more client CPU per call in pydantic
conversions, which on 2 cores caps 32-way concurrency at about 75% of the latency bound;
`transport="sdk"` uses it anyway, and a test checks both send the same body.

Checkpointing is the project's response cache (`llm/cache.py`, SQLite keyed by request): with
`checkpoint_path` set, successful rows are stored there as their replies arrive (`on_reply`) and a
re-run of the same batch sends only the rows that are missing. (The factory already wraps every
backend in that cache when a response cache path is configured; `checkpoint_path` is for direct
use.)

Batch mode (above `batch_threshold` rows, or `batch_mode="batch"`) runs the rows as one Vertex
batch prediction job (`vertex_batch`).

Credentials: production uses application-default credentials; tests pass a static token. The token
is never logged, stored or put in an error message: every text that leaves the client goes through
`promptopt_dagster.redaction.Redactor`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptopt_dagster.errors import DatasetError, ModelError
from promptopt_dagster.llm import vertex_errors as errors
from promptopt_dagster.llm import vertex_wire as wire
from promptopt_dagster.llm.base import (
    ChatRequest,
    ChatResponse,
    GenerationParams,
    Message,
    ReplyCallback,
    Usage,
)
from promptopt_dagster.llm.ratelimit import RateLimiter
from promptopt_dagster.llm.vertex_batch import ProgressCallback, VertexBatchJob
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster.llm.vertex_prices import estimate_cost, price_key
from promptopt_dagster.redaction import Redactor

if TYPE_CHECKING:
    import pandas as pd
    from google import genai

    from promptopt_dagster.llm.base import PromptTemplate

logger = logging.getLogger(__name__)


class _ModelView:
    """This client bound to one model, as an LLMClient (what CachedLLM wraps for checkpoints)."""

    backend = "vertex"

    def __init__(self, owner: VertexLLM, model: str) -> None:
        self.owner = owner
        self.model = model

    def generate(self, requests: Sequence[ChatRequest], on_reply: ReplyCallback | None = None
                 ) -> list[ChatResponse]:
        return self.owner._generate_uncached(requests, self.model, on_reply)


class VertexLLM:
    """Gemini on Vertex AI as an `LLMClient`, plus the original API's `generate_response` and
    `batch_predict`. `options` say where and how hard to call; `model` defaults to the options'
    primary model. See the module docstring for the throughput, fault and batch behaviour."""

    backend = "vertex"

    def __init__(
        self,
        options: VertexOptions,
        model: str | None = None,
        *,
        credentials: Any = None,
        checkpoint_path: str | Path | None = None,
        progress: ProgressCallback | None = None,
        default_params: GenerationParams | None = None,
    ) -> None:
        if not options.project_id:
            raise ModelError("the vertex backend needs a Google Cloud project: set VERTEX_PROJECT_ID "
                             "(and VERTEX_LOCATION, default us-central1)")
        prefix = options.batch_gcs_prefix
        if options.batch_mode == "batch" and not prefix:
            raise ModelError("batch mode needs a gs:// staging folder: set batch_gcs_prefix "
                             "(e.g. gs://BUCKET/promptopt/batch)")
        if prefix and not prefix.startswith("gs://"):
            raise ModelError(f"batch_gcs_prefix must be a gs:// URI, got {prefix!r}")
        if credentials is None and options.access_token:
            from google.oauth2.credentials import Credentials

            credentials = Credentials(token=options.access_token)
        self.options = options
        self.model = model or options.primary_model
        self.prices = options.price_table()
        self.checkpoint_path = checkpoint_path
        self.default_params = default_params or GenerationParams()
        self.limiter = RateLimiter(options.requests_per_minute, options.tokens_per_minute,
                                   window_s=options.rate_window_s)
        self._redact = Redactor()
        self._redact.add(options.access_token)
        self._redact.add(getattr(credentials, "token", None))
        self._credentials = credentials
        self._client_obj: genai.Client | None = None
        self._tls: ssl.SSLContext | None = None
        self._tls_built = False
        self._warned_prices: set[str] = set()
        self._model_paths: dict[str, str] = {}
        self._bodies = wire.RequestBodies(lambda: self.client._api_client)
        self.batch_jobs = VertexBatchJob(lambda: self.client, options, self._bodies, self._redact, self.cost,
                                         progress)

    def __repr__(self) -> str:  # never shows credentials
        return (f"VertexLLM(model={self.model!r}, project={self.options.project_id!r}, "
                f"location={self.options.location!r})")

    # --- the google-genai client ---------------------------------------------------------------

    @property
    def client(self) -> genai.Client:
        """The sync client (batch jobs, SDK helpers); online calls use one per event loop."""
        if self._client_obj is None:
            self._client_obj = self._new_client()
        return self._client_obj

    def _tls_context(self) -> ssl.SSLContext | None:
        """The TLS context every client of this object uses: the one the SDK would build itself
        (its CA bundle, SSL_CERT_FILE / SSL_CERT_DIR, the default client certificate if one is
        configured), built once. Left to the SDK, each client builds three (~20 ms of CPU each,
        loading the CA bundle), and online calls create a client per batch. None if this SDK
        version lacks the helper: each client then builds its own, as before."""
        if not self._tls_built:
            self._tls_built = True
            try:
                from google.genai import types
                from google.genai._api_client import BaseApiClient

                built = BaseApiClient._ensure_aiohttp_ssl_ctx(types.HttpOptions(), vertexai=True).get("ssl")
            except (ImportError, AttributeError, TypeError):
                built = None
            self._tls = built if isinstance(built, ssl.SSLContext) else None
        return self._tls

    def _new_client(self, session: Any = None) -> genai.Client:
        from google import genai
        from google.genai import types

        tls = self._tls_context()
        # attempts=1: retries are ours (Retry-After aware); this also stops the SDK's own hidden
        # 1-10 s retry of dropped aiohttp connections.
        http_options = types.HttpOptions(
            base_url=self.options.api_endpoint,
            timeout=int(self.options.timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
            aiohttp_client=session,
            # The SDK uses a context given here for httpx, aiohttp and websockets alike.
            client_args=None if tls is None else {"verify": tls},
            async_client_args=None if tls is None else {"ssl": tls},
        )
        try:
            return genai.Client(vertexai=True, project=self.options.project_id,
                                location=self.options.location, credentials=self._credentials,
                                http_options=http_options)
        except Exception as exc:
            why = self._redact(errors.describe(exc))
            fix = errors.HINTS[401]
            raise ModelError(f"cannot create the Vertex AI client ({why}). Fix: {fix}") from None

    # --- the LLMClient protocol ----------------------------------------------------------------

    def generate(self, requests: Sequence[ChatRequest], on_reply: ReplyCallback | None = None
                 ) -> list[ChatResponse]:
        """One response per request, in order (see the module docstring for faults). Online,
        `on_reply(index, reply)` hears each row as its reply arrives; a batch job's rows all
        arrive at its end, in the returned list."""
        return self._generate(requests, self.model, on_reply)

    def _generate(self, requests: Sequence[ChatRequest], model: str,
                  on_reply: ReplyCallback | None = None) -> list[ChatResponse]:
        if not requests:
            return []
        if self.checkpoint_path is not None:
            from promptopt_dagster.llm.cache import CachedLLM

            return CachedLLM(_ModelView(self, model), self.checkpoint_path).generate(requests)
        return self._generate_uncached(requests, model, on_reply)

    def _generate_uncached(self, requests: Sequence[ChatRequest], model: str,
                           on_reply: ReplyCallback | None = None) -> list[ChatResponse]:
        if self._use_batch(len(requests)):
            return self.run_batch_job(requests, model)
        return _run_sync(self.agenerate(requests, model, on_reply))

    def _use_batch(self, rows: int) -> bool:
        options = self.options
        if options.batch_mode == "online":
            return False
        if options.batch_mode == "batch":
            return True
        return bool(options.batch_threshold and options.batch_gcs_prefix and rows >= options.batch_threshold)

    def run_batch_job(self, requests: Sequence[ChatRequest], model: str | None = None) -> list[ChatResponse]:
        """Run `requests` as one Vertex batch prediction job (see `vertex_batch`)."""
        return self.batch_jobs.run(requests, model or self.model)

    async def agenerate(
        self, requests: Sequence[ChatRequest], model: str | None = None,
        on_reply: ReplyCallback | None = None,
    ) -> list[ChatResponse]:
        """The online path for callers already in asyncio: concurrent, rate limited, in order;
        `on_reply(index, reply)` is called on the loop as each row's reply (or final error) is in."""
        import aiohttp

        model = model or self.model
        concurrency = self.options.concurrency
        semaphore = asyncio.Semaphore(concurrency)
        results: list[ChatResponse] = [ChatResponse()] * len(requests)
        # Our own HTTP session for this loop (the SDK's keeps per-loop sessions and looks up proxy
        # settings on every request), closed when the batch is done.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency))
        aio = self._new_client(session).aio

        async def run(index: int, request: ChatRequest) -> None:
            async with semaphore:
                results[index] = await self._one(aio, request, model)
            if on_reply is not None:
                on_reply(index, results[index])

        try:
            async with asyncio.TaskGroup() as group:
                for index, request in enumerate(requests):
                    group.create_task(run(index, request))
        except* ModelError as group:
            raise group.exceptions[0] from None
        finally:
            await session.close()
        return results

    async def _one(self, aio: Any, request: ChatRequest, model: str) -> ChatResponse:
        """One row with its retries. The loop is written out rather than run by tenacity's
        AsyncRetrying, whose per-call setup costs about 0.1 ms: a tenth of the client's CPU per
        call at a few hundred calls per second on 2 cores."""
        options = self.options
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                text, prompt_tokens, completion_tokens = await self._call(aio, request, model)
                break
            except errors.Rejected as exc:
                if options.raise_on_client_error:
                    raise ModelError(str(exc)) from None
                return ChatResponse(error=str(exc), seconds=time.monotonic() - started)
            except Exception as exc:
                retryable = errors.is_retryable(exc)
                reason = self._redact(errors.describe(exc))[:errors.MAX_MESSAGE]
                if not retryable or attempt >= options.max_attempts:
                    why = f"gave up after {attempt} attempt(s)" if retryable else "not retried"
                    return ChatResponse(error=f"{why}: {reason}", seconds=time.monotonic() - started)
                delay = errors.backoff_delay(attempt, exc, options.backoff_initial_s, options.backoff_max_s)
                logger.info("vertex: attempt %d failed (%s); retrying in %.2f s", attempt, reason[:200],
                            delay)
                await asyncio.sleep(delay)
        return ChatResponse(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            seconds=time.monotonic() - started,
                            cost_usd=self.cost(model, prompt_tokens, completion_tokens))

    async def _call(self, aio: Any, request: ChatRequest, model: str) -> tuple[str, int, int]:
        """One HTTP call, under the rate limiter and the timeout."""
        from google.genai import errors as genai_errors

        estimate = wire.estimate_tokens(request)
        charge = await self.limiter.acquire(estimate)
        try:
            async with asyncio.timeout(self.options.timeout_s):
                if self.options.transport == "rest":
                    raw = await aio._api_client.async_request(
                        "post", self._model_path(model) + ":generateContent", self._bodies.build(request))
                    text, reason, prompt_tokens, completion_tokens = wire.parse_generate_response(
                        json.loads(raw.body) if raw.body else {})
                else:
                    text, reason, prompt_tokens, completion_tokens = await self._call_sdk(aio, request, model)
        except genai_errors.ClientError as exc:
            self.limiter.correct(charge, 0)  # a rejected call used no tokens
            if errors.status_code(exc) in errors.RETRYABLE_STATUS:
                raise
            why = errors.describe(exc)[:errors.MAX_MESSAGE]
            raise errors.Rejected(self._redact(f"Vertex AI rejected the request to model {model}: {why}. "
                                               f"Fix: {errors.hint(exc)}")) from None
        self.limiter.correct(charge, prompt_tokens + completion_tokens or estimate)
        if text is None:
            raise ValueError(f"Vertex AI returned no text (finish reason: {reason})")
        if wire.json_mode(request.params):
            try:
                json.loads(text)
            except json.JSONDecodeError:
                raise errors.NotJson(
                    f"model answered non-JSON text where JSON was asked: {text[:120]!r}") from None
        return text, prompt_tokens, completion_tokens

    async def _call_sdk(self, aio: Any, request: ChatRequest, model: str) -> tuple[str | None, str, int, int]:
        """The public `client.aio.models.generate_content` (about 1 ms more client CPU per call)."""
        from google.genai import types

        system, contents = wire.split_messages(request.messages)
        config = wire.sdk_config(request.params)
        if system:
            config.system_instruction = system
        reply = await aio.models.generate_content(
            model=model, contents=[types.Content(**c) for c in contents], config=config)
        reason = str(reply.candidates[0].finish_reason) if reply.candidates else "no candidates"
        prompt_tokens, completion_tokens = wire.usage_tokens(reply.usage_metadata)
        return reply.text, reason, prompt_tokens, completion_tokens

    def _model_path(self, model: str) -> str:
        """The SDK's resource name for `model` ("publishers/google/models/NAME" for a bare name)."""
        path = self._model_paths.get(model)
        if path is None:
            from google.genai import _transformers

            path = self._model_paths[model] = _transformers.t_model(self.client._api_client, model)
        return path

    # --- usage and cost ------------------------------------------------------------------------

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, discount: float = 1.0) -> float:
        if price_key(model, self.prices) is None and model not in self._warned_prices:
            self._warned_prices.add(model)
            logger.warning("vertex: no price for model %s; its cost counts as 0. Add it with prices=", model)
        return estimate_cost(model, prompt_tokens, completion_tokens, self.prices, discount)

    def usage(self, responses: Sequence[ChatResponse], batch: bool = False) -> Usage:
        """Usage of these responses with `cost_usd` filled in from the price table."""
        usage = Usage.from_responses(responses)
        fresh = [r for r in responses if not r.cached]
        usage.cost_usd = self.cost(self.model, sum(r.prompt_tokens for r in fresh),
                                   sum(r.completion_tokens for r in fresh),
                                   self.options.batch_discount if batch else 1.0)
        return usage

    # --- the original API's names --------------------------------------------------------------

    def generate_response(
        self,
        model_name: str,
        user_content: str,
        system_content: str | None = None,
        temperature: float = 0.0,
        max_tokens: int = 256,
        response_mime_type: str | None = None,
        response_schema: dict[str, Any] | None = None,
    ) -> str:
        """One reply text; raises ModelError if the call fails after its retries."""
        messages = ([Message(role="system", content=system_content)] if system_content else [])
        messages.append(Message(role="user", content=user_content))
        json_schema = response_schema if response_schema is not None else (
            {} if response_mime_type == "application/json" else None)
        request = ChatRequest(messages=tuple(messages), params=GenerationParams(
            temperature=temperature, max_tokens=max_tokens, json_schema=json_schema))
        reply = self._generate([request], model_name or self.model)[0]
        if not reply.ok:
            raise ModelError(f"Vertex AI call to {model_name} failed: {reply.error}")
        return reply.text

    def batch_predict(
        self, df: pd.DataFrame, prompt_state: PromptTemplate, model_name: str | None = None
    ) -> pd.DataFrame:
        """A copy of `df` with `prediction` (the answer `prompt_state.parse` reads from the reply,
        "" on failure) and `error` (None or why), each row rendered by `prompt_state.render(row)`
        with `default_params`."""
        missing = prompt_state.missing_columns(list(map(str, df.columns)))
        if missing:
            raise DatasetError(f"the prompt uses column(s) {missing} that the dataset lacks "
                               f"(it has {list(df.columns)}). Fix: rename the placeholders or add the "
                               f"columns")
        requests = [ChatRequest(messages=tuple(prompt_state.render(row)), params=self.default_params)
                    for row in df.to_dict(orient="records")]
        replies = self._generate(requests, model_name or self.model)
        out = df.copy()
        out["prediction"] = [prompt_state.parse(r.text) if r.ok else r.text for r in replies]
        out["error"] = [r.error for r in replies]
        return out

    def close(self) -> None:
        if self._client_obj is not None:
            self._client_obj.close()
            self._client_obj = None


def _run_sync(coro: Any) -> Any:
    """Run a coroutine from sync code, also when the caller is itself inside an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
