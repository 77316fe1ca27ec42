"""What Gemini calls cost: Vertex AI list prices per model, and the cost of a call's tokens."""

from __future__ import annotations

from collections.abc import Mapping

PriceTable = Mapping[str, tuple[float, float]]

# USD per 1M tokens (input, output), Vertex AI online list prices for prompts under 200k tokens,
# as of 2025. Override with VertexOptions.prices (or `estimate_cost(..., prices=)`) when they change.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gemini-2.5-pro": (1.25, 10.00),
    "gemini-2.5-flash": (0.30, 2.50),
    "gemini-2.5-flash-lite": (0.10, 0.40),
    "gemini-2.0-flash": (0.15, 0.60),
    "gemini-2.0-flash-lite": (0.075, 0.30),
    "gemini-1.5-pro": (1.25, 5.00),
    "gemini-1.5-flash": (0.075, 0.30),
}
# Vertex AI bills batch prediction rows at half the online price.
BATCH_DISCOUNT = 0.5


def price_key(model: str, prices: PriceTable) -> str | None:
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
    prices: PriceTable | None = None,
    discount: float = 1.0,
) -> float:
    """USD for one call (or a sum of calls) from the price table; 0.0 for a model not in it."""
    table = DEFAULT_PRICES if prices is None else prices
    key = price_key(model, table)
    if key is None:
        return 0.0
    per_input, per_output = table[key]
    return (prompt_tokens * per_input + completion_tokens * per_output) / 1e6 * discount
