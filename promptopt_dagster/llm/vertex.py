"""Gemini on Vertex AI, through the google-genai client (`vertexai.generative_models` is deprecated).

Online mode sends `generateContent` calls concurrently on one asyncio loop (`client.aio`), at most
`concurrency` in flight, held under a client-side requests/tokens-per-minute limit
(`ratelimit.RateLimiter`); replies come back in request order. Transient failures (429, 408, 500,
502, 503, 504, timeouts, dropped connections, truncated bodies) are retried with exponential
backoff and jitter, waiting at least what the server's `Retry-After` asks. Other 4xx
mean the request itself is wrong: they raise `ModelError` with the server's message (or, with
`raise_on_client_error=False`, fail just that row). A row that still fails after its retries comes
back as `ChatResponse(error=...)`; the other rows keep their replies.

Transport: by default (`transport="rest"`) each call builds the REST body itself and sends it
through the SDK's API client (`client.aio._api_client.async_request`: same auth, base URL, HTTP
session and `APIError` classes), then reads the JSON reply directly. The public
`client.aio.models.generate_content` costs about 1 ms more client CPU per call in pydantic
conversions, which on 2 cores caps 32-way concurrency at about 75% of the latency bound;
`transport="sdk"` uses it anyway, and a test checks both send the same body.

Checkpointing is the project's response cache (`llm/cache.py`, SQLite keyed by request): with
`checkpoint_path` set, successful rows are stored there and a re-run of the same batch sends only
the rows that are missing. (The factory already wraps every backend in that cache when a
response cache path is configured; `checkpoint_path` is for direct use.)

Batch mode (above `batch_threshold` rows, or `mode="batch"`) writes the requests as JSONL under
`batch_gcs_prefix`, runs a Vertex batch prediction job (`client.batches.create`), polls it with a
progress callback, reads the predictions JSONL back and joins them to rows by a key carried in
each line. Batch prices are half the online ones on Vertex; `batch_discount` says so.

Credentials: production uses application-default credentials (`credentials=None`); tests pass a
static token. The token is never logged, stored or put in an error message: every text that
leaves this module goes through `promptopt_dagster.redaction.Redactor`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from promptopt_dagster.errors import DatasetError, ModelError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, GenerationParams, Message, Usage
from promptopt_dagster.llm.ratelimit import RateLimiter
from promptopt_dagster.redaction import Redactor

if TYPE_CHECKING:
    import pandas as pd
    from google import genai
    from google.genai import types

    from promptopt_dagster.llm.base import PromptTemplate

logger = logging.getLogger(__name__)
T = TypeVar("T")

# USD per 1M tokens (input, output), Vertex AI online list prices for prompts under 200k tokens,
# as of 2025. Override with `prices=` (or `estimate_cost(..., prices=)`) when they change.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.15, 0.60),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-1.5-pro": (1.25, 5.00),
    "gemini-1.5-flash": (0.075, 0.30),
}
BATCH_DISCOUNT = 0.5
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TERMINAL_JOB_STATES = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED", "JOB_STATE_FAILED",
                                 "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED"})
_CHARS_PER_TOKEN = 4.0
_MAX_MESSAGE = 500

Mode = Literal["auto", "online", "batch"]
ProgressCallback = Callable[["BatchProgress"], None]


# --- prices ---------------------------------------------------------------------------------------


def _price_key(model: str, prices: Mapping[str, tuple[float, float]]) -> str | None:
    """The price-table entry for `model`: exact name, else the longest entry that prefixes it
    (so "gemini-2.0-flash-001" and "publishers/google/models/gemini-2.0-flash" find theirs)."""
    name = model.rsplit("/", 1)[-1]
    if name in prices:
        return name
    matches = [key for key in prices if name.startswith(key)]
    return max(matches, key=len) if matches else None


def estimate_cost(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    prices: Mapping[str, tuple[float, float]] | None = None,
    discount: float = 1.0,
) -> float:
    """USD for one call (or a sum of calls) from the price table; 0.0 for a model not in it."""
    table = DEFAULT_PRICES if prices is None else prices
    key = _price_key(model, table)
    if key is None:
        return 0.0
    per_input, per_output = table[key]
    return (prompt_tokens * per_input + completion_tokens * per_output) / 1e6 * discount


# --- errors ---------------------------------------------------------------------------------------


class _NotJson(Exception):
    """The model answered prose where JSON was asked (retried: sampling may do better)."""


class _Rejected(Exception):
    """A non-retryable 4xx: carries a redacted message for the ModelError or the row error."""


def _status_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _is_retryable(exc: BaseException) -> bool:
    from google.genai import errors as genai_errors

    if isinstance(exc, genai_errors.APIError):
        return _status_code(exc) in RETRYABLE_STATUS
    if isinstance(exc, (TimeoutError, ConnectionError, json.JSONDecodeError, _NotJson)):
        return True
    try:
        import aiohttp

        if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    except ImportError:  # pragma: no cover - aiohttp comes with google-genai[aiohttp] / gcsfs
        pass
    try:
        import httpx

        return isinstance(exc, httpx.TransportError)
    except ImportError:  # pragma: no cover
        return False


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds or an HTTP date) from a google-genai APIError's HTTP
    response (httpx or aiohttp: both have `.headers`), or None."""
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    value = headers.get("Retry-After") or headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(exc: BaseException) -> str:
    from google.genai import errors as genai_errors

    if isinstance(exc, genai_errors.APIError):
        return f"HTTP {exc.code} {exc.status or ''}: {exc.message or exc.details}".replace("  ", " ")
    if isinstance(exc, TimeoutError):
        return "timed out waiting for Vertex AI"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON from Vertex AI ({exc.msg})"
    return f"{type(exc).__name__}: {exc}"


_HINTS = {
    400: "check the request: model parameters, the response schema and the prompt length",
    401: "the credentials were refused: run `gcloud auth application-default login` or set "
         "GOOGLE_APPLICATION_CREDENTIALS to a service-account key",
    403: "the credentials lack permission: grant roles/aiplatform.user on the project and check "
         "VERTEX_PROJECT_ID and that the Vertex AI API is enabled",
    404: "check the model name (PRIMARY_MODEL_NAME / OPTIMIZER_MODEL_NAME) and VERTEX_LOCATION: the model "
         "may not exist in that region",
}


# --- requests -------------------------------------------------------------------------------------


def _json_mode(params: GenerationParams) -> bool:
    return params.json_schema is not None


def _split_messages(messages: Sequence[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """System text, and the turns as REST `contents` (roles "user" and "model")."""
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    contents = [{"role": "model" if m.role == "assistant" else "user", "parts": [{"text": m.content}]}
                for m in messages if m.role != "system"]
    return system, contents


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens a call may use before we know: prompt characters / 4 plus the output allowance."""
    chars = sum(len(m.content) for m in request.messages)
    return math.ceil(chars / _CHARS_PER_TOKEN) + request.params.max_tokens


def _usage_tokens(usage: Any) -> tuple[int, int]:
    if usage is None:
        return 0, 0
    prompt = int(getattr(usage, "prompt_token_count", None) or 0)
    # Thinking tokens are billed as output on Gemini 2.5.
    completion = int(getattr(usage, "candidates_token_count", None) or 0) + int(
        getattr(usage, "thoughts_token_count", None) or 0)
    return prompt, completion


def _with_cost(response: ChatResponse, cost: float) -> ChatResponse:
    """Set `cost_usd` when ChatResponse has that field (proposed for llm/base.py)."""
    if "cost_usd" in type(response).model_fields:
        return response.model_copy(update={"cost_usd": cost})
    return response


def parse_generate_response(data: Mapping[str, Any]) -> tuple[str | None, str, int, int]:
    """(text or None, finish reason, prompt tokens, completion tokens) from a generateContent
    response body. Thought parts are skipped; thinking tokens count as output (they are billed so)."""
    candidates = data.get("candidates") or []
    first = candidates[0] if candidates else {}
    parts = (first.get("content") or {}).get("parts") or []
    texts = [p["text"] for p in parts if isinstance(p.get("text"), str) and not p.get("thought")]
    reason = str(first.get("finishReason") or ("no candidates" if not candidates else "unknown"))
    if not candidates and data.get("promptFeedback"):
        reason = f"prompt blocked: {data['promptFeedback']}"
    usage = data.get("usageMetadata") or {}
    prompt_tokens = int(usage.get("promptTokenCount") or 0)
    completion_tokens = int(usage.get("candidatesTokenCount") or 0)
    completion_tokens += int(usage.get("thoughtsTokenCount") or 0)
    return ("".join(texts) if texts else None), reason, prompt_tokens, completion_tokens


@dataclass(frozen=True)
class BatchProgress:
    """What the progress callback sees at each poll of a batch job."""

    job_name: str
    state: str
    elapsed_s: float
    completed: int | None = None
    failed: int | None = None
    total: int = 0


class _ModelView:
    """This client bound to one model, as an LLMClient (what CachedLLM wraps for checkpoints)."""

    backend = "vertex"

    def __init__(self, owner: VertexLLM, model: str) -> None:
        self.owner = owner
        self.model = model

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        return self.owner._generate_uncached(requests, self.model)


class VertexLLM:
    """Gemini on Vertex AI as an `LLMClient`, plus the seed document's `generate_response` and
    `batch_predict`. See the module docstring for the throughput, fault and batch behaviour."""

    backend = "vertex"

    def __init__(
        self,
        model: str,
        *,
        project: str | None,
        location: str = "us-central1",
        credentials: Any = None,
        base_url: str | None = None,
        concurrency: int = 16,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        rate_window_s: float = 60.0,
        max_attempts: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        timeout_s: float = 120.0,
        raise_on_client_error: bool = True,
        prices: Mapping[str, tuple[float, float]] | None = None,
        checkpoint_path: str | Path | None = None,
        mode: Mode = "auto",
        batch_threshold: int | None = None,
        batch_gcs_prefix: str | None = None,
        batch_poll_s: float = 30.0,
        batch_timeout_s: float = 24 * 3600.0,
        batch_discount: float = BATCH_DISCOUNT,
        progress: ProgressCallback | None = None,
        default_params: GenerationParams | None = None,
        transport: Literal["rest", "sdk"] = "rest",
    ) -> None:
        if not project:
            raise ModelError("the vertex backend needs a Google Cloud project: set VERTEX_PROJECT_ID "
                             "(and VERTEX_LOCATION, default us-central1)")
        if concurrency < 1 or max_attempts < 1:
            raise ModelError(f"concurrency and max_attempts must be >= 1: {concurrency=}, {max_attempts=}")
        if mode == "batch" and not batch_gcs_prefix:
            raise ModelError("batch mode needs a gs:// staging folder: set batch_gcs_prefix "
                             "(e.g. gs://BUCKET/promptopt/batch)")
        if batch_gcs_prefix and not batch_gcs_prefix.startswith("gs://"):
            raise ModelError(f"batch_gcs_prefix must be a gs:// URI, got {batch_gcs_prefix!r}")
        self.model = model
        self.project = project
        self.location = location
        self.base_url = base_url
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.raise_on_client_error = raise_on_client_error
        self.prices: Mapping[str, tuple[float, float]] = dict(DEFAULT_PRICES if prices is None else prices)
        self.checkpoint_path = checkpoint_path
        self.mode: Mode = mode
        self.batch_threshold = batch_threshold
        self.batch_gcs_prefix = batch_gcs_prefix
        self.batch_poll_s = batch_poll_s
        self.batch_timeout_s = batch_timeout_s
        self.batch_discount = batch_discount
        self.progress = progress
        self.default_params = default_params or GenerationParams()
        self.limiter = RateLimiter(requests_per_minute, tokens_per_minute, window_s=rate_window_s)
        self._redact = Redactor()
        self._redact.add(getattr(credentials, "token", None))
        self._credentials = credentials
        self._client_obj: genai.Client | None = None
        self._warned_prices: set[str] = set()
        self.transport = transport
        self._model_paths: dict[str, str] = {}
        self._schemas: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_settings(
        cls,
        model: str,
        project: str | None,
        location: str = "us-central1",
        api_endpoint: str | None = None,
        access_token: str | None = None,
        **options: Any,
    ) -> VertexLLM:
        """Build from the settings names (VERTEX_PROJECT_ID, VERTEX_LOCATION, VERTEX_API_ENDPOINT,
        VERTEX_ACCESS_TOKEN); without a token, application-default credentials are used."""
        credentials = None
        if access_token:
            from google.oauth2.credentials import Credentials

            credentials = Credentials(token=access_token)
        return cls(model, project=project, location=location, credentials=credentials,
                   base_url=api_endpoint, **options)

    def __repr__(self) -> str:  # never shows credentials
        return f"VertexLLM(model={self.model!r}, project={self.project!r}, location={self.location!r})"

    # --- the google-genai client ---------------------------------------------------------------

    @property
    def client(self) -> genai.Client:
        """The sync client (batch jobs, SDK helpers); online calls use one per event loop."""
        if self._client_obj is None:
            self._client_obj = self._new_client()
        return self._client_obj

    def _new_client(self, session: Any = None) -> genai.Client:
        from google import genai
        from google.genai import types

        # attempts=1: retries are ours (Retry-After aware); this also stops the SDK's own hidden
        # 1-10 s retry of dropped aiohttp connections.
        http_options = types.HttpOptions(
            base_url=self.base_url,
            timeout=int(self.timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
            aiohttp_client=session,
        )
        try:
            return genai.Client(vertexai=True, project=self.project, location=self.location,
                                credentials=self._credentials, http_options=http_options)
        except Exception as exc:
            raise ModelError(
                f"cannot create the Vertex AI client ({self._redact(_describe(exc))}). Fix: {_HINTS[401]}"
            ) from None

    def _config(self, params: GenerationParams) -> types.GenerateContentConfig:
        from google.genai import types

        options: dict[str, Any] = {"temperature": params.temperature, "max_output_tokens": params.max_tokens}
        if params.seed:
            options["seed"] = params.seed
        if _json_mode(params):
            options["response_mime_type"] = "application/json"
            if params.json_schema:
                options["response_schema"] = params.json_schema
        return types.GenerateContentConfig(**options)

    # --- the LLMClient protocol ----------------------------------------------------------------

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        """One response per request, in order (see the module docstring for faults)."""
        return self._generate(requests, self.model)

    def _generate(self, requests: Sequence[ChatRequest], model: str) -> list[ChatResponse]:
        if not requests:
            return []
        if self.checkpoint_path is not None:
            from promptopt_dagster.llm.cache import CachedLLM

            return CachedLLM(_ModelView(self, model), self.checkpoint_path).generate(requests)
        return self._generate_uncached(requests, model)

    def _generate_uncached(self, requests: Sequence[ChatRequest], model: str) -> list[ChatResponse]:
        if self._use_batch(len(requests)):
            return self.run_batch_job(requests, model)
        return _run_sync(self.agenerate(requests, model))

    def _use_batch(self, rows: int) -> bool:
        if self.mode == "online":
            return False
        if self.mode == "batch":
            return True
        return bool(self.batch_threshold and self.batch_gcs_prefix and rows >= self.batch_threshold)

    async def agenerate(
        self, requests: Sequence[ChatRequest], model: str | None = None
    ) -> list[ChatResponse]:
        """The online path for callers already in asyncio: concurrent, rate limited, in order."""
        import aiohttp

        model = model or self.model
        semaphore = asyncio.Semaphore(self.concurrency)
        results: list[ChatResponse] = [ChatResponse()] * len(requests)
        # Our own HTTP session for this loop (the SDK's keeps per-loop sessions and looks up proxy
        # settings on every request), closed when the batch is done.
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.concurrency))
        aio = self._new_client(session).aio

        async def run(index: int, request: ChatRequest) -> None:
            async with semaphore:
                results[index] = await self._one(aio, request, model)

        try:
            async with asyncio.TaskGroup() as group:
                for index, request in enumerate(requests):
                    group.create_task(run(index, request))
        except* ModelError as errors:
            raise errors.exceptions[0] from None
        finally:
            await session.close()
        return results

    def _delay(self, attempt: int, exc: BaseException) -> float:
        """Exponential backoff with jitter, but never less than the server's Retry-After."""
        backoff = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        backoff += random.uniform(0, self.backoff_initial_s)
        server = retry_after_seconds(exc)
        return backoff if server is None else max(backoff, server)

    async def _one(self, aio: Any, request: ChatRequest, model: str) -> ChatResponse:
        """One row with its retries. The loop is written out rather than run by tenacity's
        AsyncRetrying, whose per-call setup costs about 0.1 ms: a tenth of the client's CPU per
        call at a few hundred calls per second on 2 cores."""
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                text, prompt_tokens, completion_tokens = await self._call(aio, request, model)
                break
            except _Rejected as exc:
                if self.raise_on_client_error:
                    raise ModelError(str(exc)) from None
                return ChatResponse(error=str(exc), seconds=time.monotonic() - started)
            except Exception as exc:
                retryable = _is_retryable(exc)
                reason = self._redact(_describe(exc))[:_MAX_MESSAGE]
                if not retryable or attempt >= self.max_attempts:
                    why = f"gave up after {attempt} attempt(s)" if retryable else "not retried"
                    return ChatResponse(error=f"{why}: {reason}", seconds=time.monotonic() - started)
                delay = self._delay(attempt, exc)
                logger.info("vertex: attempt %d failed (%s); retrying in %.2f s", attempt, reason[:200],
                            delay)
                await asyncio.sleep(delay)
        response = ChatResponse(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                seconds=time.monotonic() - started)
        return _with_cost(response, self.cost(model, prompt_tokens, completion_tokens))

    async def _call(self, aio: Any, request: ChatRequest, model: str) -> tuple[str, int, int]:
        """One HTTP call, under the rate limiter and the timeout."""
        from google.genai import errors as genai_errors

        estimate = estimate_tokens(request)
        charge = await self.limiter.acquire(estimate)
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.transport == "rest":
                    raw = await aio._api_client.async_request(
                        "post", self._model_path(model) + ":generateContent", self._rest_request(request))
                    text, reason, prompt_tokens, completion_tokens = parse_generate_response(
                        json.loads(raw.body) if raw.body else {})
                else:
                    text, reason, prompt_tokens, completion_tokens = await self._call_sdk(aio, request, model)
        except genai_errors.ClientError as exc:
            self.limiter.correct(charge, 0)  # a rejected call used no tokens
            if _status_code(exc) in RETRYABLE_STATUS:
                raise
            code = _status_code(exc) or 400
            hint = _HINTS.get(code, _HINTS[400])
            raise _Rejected(self._redact(f"Vertex AI rejected the request to model {model}: "
                                         f"{_describe(exc)[:_MAX_MESSAGE]}. Fix: {hint}")) from None
        self.limiter.correct(charge, prompt_tokens + completion_tokens or estimate)
        if text is None:
            raise ValueError(f"Vertex AI returned no text (finish reason: {reason})")
        if _json_mode(request.params):
            try:
                json.loads(text)
            except json.JSONDecodeError:
                raise _NotJson(f"model answered non-JSON text where JSON was asked: {text[:120]!r}") from None
        return text, prompt_tokens, completion_tokens

    async def _call_sdk(self, aio: Any, request: ChatRequest, model: str) -> tuple[str | None, str, int, int]:
        """The public `client.aio.models.generate_content` (about 1 ms more client CPU per call)."""
        from google.genai import types

        system, contents = _split_messages(request.messages)
        config = self._config(request.params)
        if system:
            config.system_instruction = system
        reply = await aio.models.generate_content(
            model=model, contents=[types.Content(**c) for c in contents], config=config)
        reason = str(reply.candidates[0].finish_reason) if reply.candidates else "no candidates"
        prompt_tokens, completion_tokens = _usage_tokens(reply.usage_metadata)
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
        if _price_key(model, self.prices) is None and model not in self._warned_prices:
            self._warned_prices.add(model)
            logger.warning("vertex: no price for model %s; its cost counts as 0. Add it with prices=", model)
        return estimate_cost(model, prompt_tokens, completion_tokens, self.prices, discount)

    def usage(self, responses: Sequence[ChatResponse], batch: bool = False) -> Usage:
        """Usage of these responses with `cost_usd` filled in from the price table."""
        usage = Usage.from_responses(responses)
        fresh = [r for r in responses if not r.cached]
        usage.cost_usd = self.cost(self.model, sum(r.prompt_tokens for r in fresh),
                                   sum(r.completion_tokens for r in fresh),
                                   self.batch_discount if batch else 1.0)
        return usage

    # --- batch prediction jobs -----------------------------------------------------------------

    def _vertex_schema(self, json_schema: dict[str, Any]) -> dict[str, Any]:
        """The SDK's own JSON-schema -> Vertex `Schema` conversion (what `response_schema=` does),
        memoised: a batch sends the same schema on every row."""
        key = json.dumps(json_schema, sort_keys=True)
        converted = self._schemas.get(key)
        if converted is None:
            from google.genai import _transformers

            schema = _transformers.t_schema(self.client._api_client, json_schema)
            converted = ({} if schema is None
                         else schema.model_dump(mode="json", exclude_none=True, by_alias=True))
            self._schemas[key] = converted
        return converted

    def _rest_request(self, request: ChatRequest) -> dict[str, Any]:
        """The generateContent body in REST field names, as the SDK would send it (a test compares
        the two); used online by the "rest" transport and for batch input lines."""
        system, contents = _split_messages(request.messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"role": "user", "parts": [{"text": system}]}  # as the SDK sends it
        params = request.params
        generation: dict[str, Any] = {"temperature": params.temperature, "maxOutputTokens": params.max_tokens}
        if params.seed:
            generation["seed"] = params.seed
        if _json_mode(params):
            generation["responseMimeType"] = "application/json"
            if params.json_schema:
                generation["responseSchema"] = self._vertex_schema(params.json_schema)
        body["generationConfig"] = generation
        return body

    def run_batch_job(self, requests: Sequence[ChatRequest], model: str | None = None) -> list[ChatResponse]:
        """Run `requests` as one Vertex batch prediction job through GCS; rows the job could not
        answer come back with `error`. A job that fails as a whole raises ModelError."""
        from google.genai import types

        from promptopt_dagster.storage import write_text

        model = model or self.model
        if not self.batch_gcs_prefix:
            raise ModelError("batch mode needs a gs:// staging folder: set batch_gcs_prefix")
        run_id = f"{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
        base = f"{self.batch_gcs_prefix.rstrip('/')}/{run_id}"
        keys = [f"row-{i:07d}" for i in range(len(requests))]
        bodies = [self._rest_request(r) for r in requests]
        lines = [json.dumps({"key": k, "request": b}, ensure_ascii=False)
                 for k, b in zip(keys, bodies, strict=True)]
        write_text(f"{base}/requests.jsonl", "\n".join(lines) + "\n")
        started = time.monotonic()
        try:
            job = self.client.batches.create(
                model=model, src=f"{base}/requests.jsonl",
                config=types.CreateBatchJobConfig(dest=f"{base}/out/", display_name=f"promptopt-{run_id}"))
            name = job.name or ""
            logger.info("vertex: batch job %s started for %d rows (%s)", name, len(requests), base)
            deadline = started + self.batch_timeout_s
            while True:
                state = job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED"
                self._report(job, state, started, len(requests))
                if state in TERMINAL_JOB_STATES:
                    break
                if time.monotonic() > deadline:
                    raise ModelError(
                        f"batch job {name} still {state} after {self.batch_timeout_s:.0f} s. Fix: raise "
                        f"batch_timeout_s, or cancel it (client.batches.cancel) and re-run online "
                        f"(mode='online')")
                time.sleep(self.batch_poll_s)
                job = self.client.batches.get(name=name)
        except ModelError:
            raise
        except Exception as exc:
            hint = _HINTS.get(_status_code(exc) or 400, _HINTS[400])
            raise ModelError(self._redact(f"Vertex AI batch job for model {model} failed to run: "
                                          f"{_describe(exc)[:_MAX_MESSAGE]}. Fix: {hint}")) from None
        if state not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_PARTIALLY_SUCCEEDED"):
            detail = job.error.message if job.error is not None else "no detail"
            raise ModelError(self._redact(
                f"Vertex AI batch job {name} ended {state}: {detail}. Fix: check its input at "
                f"{base}/requests.jsonl and the job in the Cloud console, then re-run"))
        out_dir = (job.output_info.gcs_output_directory if job.output_info else None) or f"{base}/out"
        return self._read_predictions(out_dir, keys, bodies, model, time.monotonic() - started)

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
            why = self._redact(f"batch row failed: {status or 'no response'}")[:_MAX_MESSAGE]
            return ChatResponse(error=why, seconds=seconds)
        text, reason, prompt_tokens, completion_tokens = parse_generate_response(response)
        if text is None:
            return ChatResponse(error=f"batch row has no text (finish reason: {reason})", seconds=seconds)
        reply = ChatResponse(text=text, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, seconds=seconds)
        return _with_cost(reply, self.cost(model, prompt_tokens, completion_tokens, self.batch_discount))

    # --- the seed document's interface ---------------------------------------------------------

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
