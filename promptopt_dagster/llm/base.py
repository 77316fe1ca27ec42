"""The one protocol every LLM backend speaks: chat requests in, texts and usage out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(BaseModel):
    """Sampling settings; part of the cache key, so two calls differing here never share a reply."""

    model_config = ConfigDict(frozen=True)

    temperature: float = 0.0
    max_tokens: int = 128
    # Ask for JSON output. A backend that supports it constrains decoding (Gemini's
    # response_mime_type + response_schema); the others just get the instruction in the prompt.
    json_schema: dict[str, Any] | None = None
    seed: int = 0


class ChatRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    messages: tuple[Message, ...]
    params: GenerationParams = Field(default_factory=GenerationParams)

    @classmethod
    def of(cls, messages: Sequence[Message | dict[str, str]], **params: Any) -> ChatRequest:
        msgs = tuple(m if isinstance(m, Message) else Message(**m) for m in messages)
        return cls(messages=msgs, params=GenerationParams(**params))

    def cache_key(self, backend: str, model: str) -> str:
        payload = {
            "backend": backend,
            "model": model,
            "messages": [m.model_dump() for m in self.messages],
            "params": self.params.model_dump(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ChatResponse(BaseModel):
    """One reply. `error` is set (and `text` empty) when the call failed after retries."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost_usd: float = 0.0
    cached: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Usage:
    """What a batch of calls cost. Cached replies count in `cached_calls`, not in `calls`."""

    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cost_usd: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_responses(cls, responses: Sequence[ChatResponse]) -> Usage:
        usage = cls()
        for r in responses:
            if r.cached:
                usage.cached_calls += 1
                continue
            usage.calls += 1
            usage.failed_calls += 0 if r.ok else 1
            usage.prompt_tokens += r.prompt_tokens
            usage.completion_tokens += r.completion_tokens
            usage.seconds += r.seconds
            usage.cost_usd += r.cost_usd
        return usage

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            calls=self.calls + other.calls,
            cached_calls=self.cached_calls + other.cached_calls,
            failed_calls=self.failed_calls + other.failed_calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            seconds=self.seconds + other.seconds,
            cost_usd=self.cost_usd + other.cost_usd,
        )

    @classmethod
    def from_dict(cls, data: dict[str, float]) -> Usage:
        """Inverse of `as_dict`."""
        return cls(
            calls=int(data.get("calls", 0)),
            cached_calls=int(data.get("cached_calls", 0)),
            failed_calls=int(data.get("failed_calls", 0)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            completion_tokens=int(data.get("completion_tokens", 0)),
            seconds=float(data.get("llm_seconds", 0.0)),
            cost_usd=float(data.get("cost_usd", 0.0)),
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "cached_calls": self.cached_calls,
            "failed_calls": self.failed_calls,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "tokens": self.tokens,
            "llm_seconds": round(self.seconds, 3),
            "cost_usd": round(self.cost_usd, 6),
        }


# Called with (index in the batch, reply) as each reply arrives, before `generate` returns.
ReplyCallback = Callable[[int, ChatResponse], None]


@runtime_checkable
class LLMClient(Protocol):
    """A chat model. `generate` returns one response per request, in request order, and never
    raises for a single failed row: that row's response carries `error` instead.

    A backend may also take a keyword `on_reply: ReplyCallback | None` in `generate` and call it
    once per row as that row's reply arrives (from any thread). The response cache passes one to
    store each reply at once, so a process killed in the middle of a batch loses no paid reply."""

    backend: str
    model: str

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]: ...


class PromptTemplate(Protocol):
    """What a backend needs of a prompt to run it over rows (core.prompt_state.PromptState is
    one): the columns it lacks, the messages for a row, and how to read the answer in a reply."""

    def missing_columns(self, columns: list[str]) -> list[str]: ...

    def render(self, row: Any) -> list[Message]: ...

    def parse(self, reply: str) -> str: ...
