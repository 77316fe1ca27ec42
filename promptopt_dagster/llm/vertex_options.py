"""The Vertex AI backend's options, each declared once with its default.

Settings read them from `VERTEX_<FIELD>` (and `PRIMARY_MODEL_NAME` / `OPTIMIZER_MODEL_NAME` for the
two models), the Dagster `LLMResource` holds them as nested config, and `VertexLLM` takes them as
they are, so a new option is one line here and nowhere else.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from promptopt_dagster.llm.vertex_prices import BATCH_DISCOUNT, DEFAULT_PRICES

BatchMode = Literal["auto", "online", "batch"]
Transport = Literal["rest", "sdk"]


class VertexOptions(BaseModel):
    """Where Gemini runs, which models, and how hard the client pushes: throughput, retries, batch
    jobs and prices. Frozen: one client's options never change under it."""

    model_config = ConfigDict(frozen=True)

    # Where. api_endpoint and access_token only point the client at a test server; production uses
    # application-default credentials. The token is never shown (repr) or dumped.
    project_id: str | None = None
    location: str = "us-central1"
    api_endpoint: str | None = None
    access_token: str | None = Field(None, repr=False, exclude=True)
    # The models of the two roles when a study names none: one runs the prompts, one rewrites them.
    primary_model: str = "gemini-2.5-flash"
    optimizer_model: str = "gemini-2.5-pro"
    # Throughput: calls in flight, and a client-side quota per rate window (a minute; tests shorten it).
    concurrency: int = Field(16, ge=1)
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    rate_window_s: float = Field(60.0, gt=0.0)
    # Faults: tries per row of 408/429/5xx, timeouts and dropped connections, with exponential
    # backoff from backoff_initial_s up to backoff_max_s. Other 4xx raise ModelError, or with
    # raise_on_client_error=False fail only their row. A row is lost only when all its attempts
    # fail: with 30% of calls failing (a quota-bound run, a regional incident) 5 attempts lose
    # one row in 400 (0.3**5), 10 attempts one in 170,000; the extra attempts cost time only
    # when they are needed (test_production_faults runs a whole study at that failure rate).
    max_attempts: int = Field(10, ge=1)
    backoff_initial_s: float = Field(1.0, ge=0.0)
    backoff_max_s: float = Field(60.0, ge=0.0)
    timeout_s: float = Field(120.0, gt=0.0)
    raise_on_client_error: bool = True
    # "rest" builds the request body itself (about 1 ms less client CPU per call than the SDK's
    # pydantic conversions); "sdk" calls `client.aio.models.generate_content`.
    transport: Transport = "rest"
    # Batch prediction jobs: always ("batch"), never ("online"), or ("auto") for calls of at least
    # batch_threshold rows. Their JSONL is staged under batch_gcs_prefix (a gs:// folder).
    batch_mode: BatchMode = "auto"
    batch_threshold: int | None = Field(None, ge=1)
    batch_gcs_prefix: str | None = None
    batch_poll_s: float = Field(30.0, gt=0.0)
    batch_timeout_s: float = Field(24 * 3600.0, gt=0.0)
    batch_discount: float = Field(BATCH_DISCOUNT, ge=0.0)
    # USD per 1M tokens, {"model": [input, output]}; replaces the built-in table when set.
    prices: dict[str, list[float]] | None = None

    @field_validator("prices")
    @classmethod
    def _price_pairs(cls, prices: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        """A bad table fails when the options are read, naming the setting, not at the first cost."""
        for model, pair in (prices or {}).items():
            if len(pair) != 2 or any(value < 0 for value in pair):
                raise ValueError(
                    f"VERTEX_PRICES[{model!r}] must be [input, output] USD per 1M tokens (two numbers "
                    f">= 0), got {pair!r}. Fix: e.g. VERTEX_PRICES='{{\"gemini-2.5-flash\": [0.30, 2.50]}}'"
                )
        return prices

    def price_table(self) -> dict[str, tuple[float, float]]:
        """USD per 1M tokens, model -> (input, output): `prices` when set, else the built-in table."""
        if self.prices is None:
            return dict(DEFAULT_PRICES)
        return {model: (float(pair[0]), float(pair[1])) for model, pair in self.prices.items()}
