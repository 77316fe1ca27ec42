"""A scripted LLMClient for fast, deterministic tests: a Python function plays the model."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from promptopt_dagster.llm.base import ChatRequest, ChatResponse, ReplyCallback

Responder = Callable[[ChatRequest], str]


class ScriptedLLM:
    """Answers each request with `responder(request)`. `calls` counts answered requests (like
    Usage.calls), `batches` counts `generate` invocations, `requests` keeps every request seen.
    Token counts are whitespace word counts; a responder that raises yields a failed reply."""

    def __init__(self, responder: Responder, backend: str = "fake", model: str = "scripted") -> None:
        self.responder = responder
        self.backend = backend
        self.model = model
        self.calls = 0
        self.batches = 0
        self.requests: list[ChatRequest] = []
        self._lock = threading.Lock()

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], default: str = "", **kwargs: str) -> ScriptedLLM:
        """Reply with the value of the first key (in mapping order) found in the last user message."""
        table = dict(mapping)

        def respond(request: ChatRequest) -> str:
            user = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
            return next((reply for needle, reply in table.items() if needle in user), default)

        return cls(respond, **kwargs)

    def _one(self, request: ChatRequest) -> ChatResponse:
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        start = time.perf_counter()
        try:
            text = self.responder(request)
        except Exception as exc:
            return ChatResponse(error=f"{type(exc).__name__}: {exc}", prompt_tokens=prompt_tokens,
                                seconds=time.perf_counter() - start)
        return ChatResponse(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(text.split()),
                            seconds=time.perf_counter() - start)

    def generate(self, requests: Sequence[ChatRequest], on_reply: ReplyCallback | None = None
                 ) -> list[ChatResponse]:
        """Answers the rows one after another, like the embedded model; `on_reply` hears each."""
        with self._lock:
            self.batches += 1
            self.calls += len(requests)
            self.requests.extend(requests)
        out: list[ChatResponse] = []
        for index, request in enumerate(requests):
            out.append(self._one(request))
            if on_reply is not None:
                on_reply(index, out[-1])
        return out
