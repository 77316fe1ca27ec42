"""Client-side request and token rate limits for the Vertex backend (sliding window).

Vertex AI enforces quotas per minute (requests and tokens); going over them costs a 429 and a
backoff. Holding requests back on the client keeps a large batch just under the quota instead.

Why not `aiolimiter`: its leaky bucket cannot give back an over-estimate, and a token charge is
only an estimate until the reply says how many tokens were used. A sliding window whose entries
can be corrected after the call is a few lines, so it lives here.

The limiter keeps plain data behind a `threading.Lock` (no asyncio primitive), so one instance
can be shared by successive `asyncio.run` loops and by several threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)  # identity, not value: two charges may look alike
class Charge:
    """One admitted request: what it was charged, so the amount can be corrected later."""

    at: float
    amount: float


class SlidingWindowLimiter:
    """At most `limit` units in any trailing window of `window_s` seconds.

    `acquire(amount)` waits until the amount fits; a single amount larger than the whole limit is
    admitted alone into an empty window (else it could never pass). `correct(charge, actual)`
    replaces an estimate with the real amount once known.
    """

    def __init__(
        self, limit: float, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit <= 0 or window_s <= 0:
            raise ValueError(f"rate limit and window must be positive, got {limit=}, {window_s=}")
        self.limit = float(limit)
        self.window_s = float(window_s)
        self._clock = clock
        self._entries: deque[Charge] = deque()
        self._used = 0.0
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        while self._entries and self._entries[0].at <= now - self.window_s:
            self._used -= self._entries.popleft().amount

    def _try(self, amount: float) -> tuple[Charge | None, float]:
        """Admit now (charge, 0) or say how long to wait before trying again (None, seconds)."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            if self._used + amount <= self.limit or not self._entries:
                charge = Charge(now, amount)
                self._entries.append(charge)
                self._used += amount
                return charge, 0.0
            # Wait until enough of the oldest entries have left the window.
            freed, need = 0.0, self._used + amount - self.limit
            for entry in self._entries:
                freed += entry.amount
                if freed >= need:
                    return None, max(entry.at + self.window_s - now, 0.001)
            return None, max(self._entries[-1].at + self.window_s - now, 0.001)

    async def acquire(self, amount: float = 1.0) -> Charge:
        while True:
            charge, wait = self._try(amount)
            if charge is not None:
                return charge
            await asyncio.sleep(wait)

    def correct(self, charge: Charge, actual: float) -> None:
        """Replace the charged estimate by the actual amount (entries already out of the window are
        left alone: they no longer count)."""
        with self._lock:
            if charge in self._entries:
                self._used += actual - charge.amount
            charge.amount = actual

    @property
    def used(self) -> float:
        with self._lock:
            self._prune(self._clock())
            return self._used


class RateLimiter:
    """Requests per window and tokens per window together; either may be None (unlimited)."""

    def __init__(
        self,
        requests_per_window: float | None = None,
        tokens_per_window: float | None = None,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests = (SlidingWindowLimiter(requests_per_window, window_s, clock)
                         if requests_per_window else None)
        self.tokens = SlidingWindowLimiter(tokens_per_window, window_s, clock) if tokens_per_window else None
        self.window_s = window_s

    async def acquire(self, estimated_tokens: float) -> Charge | None:
        """Wait for a request slot and for room for the estimated tokens; returns the token charge
        to correct once the reply's usage is known."""
        if self.requests is not None:
            await self.requests.acquire(1.0)
        if self.tokens is not None:
            return await self.tokens.acquire(estimated_tokens)
        return None

    def correct(self, charge: Charge | None, actual_tokens: float) -> None:
        if self.tokens is not None and charge is not None:
            self.tokens.correct(charge, actual_tokens)
