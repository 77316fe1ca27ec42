"""Failures the fake Vertex server (support/vertex_server.py) injects: one `Fault` for the next
matching requests, or a `FaultSchedule` failing a deterministic share of a whole run's requests."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from promptopt_dagster_tests.support.vertex_requests import wants_json


@dataclass
class Fault:
    """One injected failure, applied to the next `times` generateContent requests that match
    `when` (all requests if None; `times=None` means forever).

    kind: ``status`` (reply `status` with `message`, and ``Retry-After: retry_after`` if set; a
    ``{authorization}`` in `message` is replaced by the request's Authorization header, to act as a
    server that reflects credentials), ``hang`` (hold the request until `hang_s` passes or the
    server stops), ``malformed_json`` (200 with a truncated JSON body), ``non_json_reply`` (200,
    but the model's text is prose even when JSON was asked).
    """

    kind: Literal["status", "hang", "malformed_json", "non_json_reply"] = "status"
    status: int = 500
    message: str = "injected fault"
    retry_after: float | None = None
    times: int | None = 1
    when: Callable[[dict[str, Any]], bool] | None = None
    hang_s: float = 30.0


@dataclass
class FaultSchedule:
    """A deterministic share of failing generateContent requests, for a whole run: the n-th
    arrival of a given body fails when a hash of (body, n) falls under `rate`, so which attempts
    fail depends on the requests only, never on their order or timing, and a retry of a failed
    attempt is a new draw. A failure is, by shares of the failing draws: a 429 with Retry-After
    (30%), a 500 (25%), a hang longer than the client's timeout (20%), or a malformed reply (25%;
    prose where JSON was asked, else a truncated JSON body). `injected` counts them by kind.
    Set it as `VertexServer.schedule`; injected `Fault`s still come first."""

    rate: float = 0.3
    retry_after: float = 0.2
    hang_s: float = 5.0
    injected: Counter[str] = field(default_factory=Counter)
    _arrivals: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, body: dict[str, Any]) -> Fault | None:
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            arrival = self._arrivals[key]
            self._arrivals[key] += 1
        digest = hashlib.sha256(f"{arrival}:{key}".encode()).digest()
        draw = int.from_bytes(digest[:8], "big") / 2**64
        if draw >= self.rate:
            return None
        share = draw / self.rate
        if share < 0.30:
            name, fault = (
                "429",
                Fault("status", status=429, retry_after=self.retry_after, message="quota exceeded"),
            )
        elif share < 0.55:
            name, fault = "500", Fault("status", status=500, message="internal error")
        elif share < 0.75:
            name, fault = "timeout", Fault("hang", hang_s=self.hang_s)
        elif wants_json(body):
            name, fault = "non_json_reply", Fault("non_json_reply")
        else:
            name, fault = "malformed_json", Fault("malformed_json")
        with self._lock:
            self.injected[name] += 1
        return fault
