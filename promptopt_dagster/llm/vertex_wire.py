"""Gemini's wire format: `generateContent` request bodies and replies in REST field names.

The client builds REST bodies itself and reads the JSON replies directly (online and in batch job
files) because the SDK's pydantic conversions cost about 1 ms of client CPU per call; the bodies
are what the SDK would send (a test compares the two).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from promptopt_dagster.llm.base import ChatRequest, GenerationParams, Message

if TYPE_CHECKING:
    from google.genai import types

_CHARS_PER_TOKEN = 4.0


def json_mode(params: GenerationParams) -> bool:
    return params.json_schema is not None


def split_messages(messages: Sequence[Message]) -> tuple[str | None, list[dict[str, Any]]]:
    """System text, and the turns as REST `contents` (roles "user" and "model")."""
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    contents = [{"role": "model" if m.role == "assistant" else "user", "parts": [{"text": m.content}]}
                for m in messages if m.role != "system"]
    return system, contents


def estimate_tokens(request: ChatRequest) -> int:
    """Tokens a call may use before we know: prompt characters / 4 plus the output allowance."""
    chars = sum(len(m.content) for m in request.messages)
    return math.ceil(chars / _CHARS_PER_TOKEN) + request.params.max_tokens


def usage_tokens(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from the SDK's usage metadata."""
    if usage is None:
        return 0, 0
    prompt = int(getattr(usage, "prompt_token_count", None) or 0)
    # Thinking tokens are billed as output on Gemini 2.5.
    completion = int(getattr(usage, "candidates_token_count", None) or 0) + int(
        getattr(usage, "thoughts_token_count", None) or 0)
    return prompt, completion


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


def generation_fields(params: GenerationParams, schema: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """The generation parameters under the SDK's snake_case names; `schema` converts a JSON schema
    for its destination (the SDK converts one itself, a REST body needs Vertex's form)."""
    fields: dict[str, Any] = {"temperature": params.temperature, "max_output_tokens": params.max_tokens}
    if params.seed:
        fields["seed"] = params.seed
    if json_mode(params):
        fields["response_mime_type"] = "application/json"
        if params.json_schema:
            fields["response_schema"] = schema(params.json_schema)
    return fields


def sdk_config(params: GenerationParams) -> types.GenerateContentConfig:
    """The same parameters as the SDK's config object (the "sdk" transport)."""
    from google.genai import types

    return types.GenerateContentConfig(**generation_fields(params, lambda schema: schema))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


class RequestBodies:
    """Builds generateContent bodies. JSON schemas go through the SDK's own JSON-schema -> Vertex
    `Schema` conversion (what `response_schema=` does), once per schema: a batch sends the same
    schema on every row."""

    def __init__(self, api_client: Callable[[], Any]) -> None:
        self._api_client = api_client  # the SDK's, created only when a schema needs converting
        self._schemas: dict[str, dict[str, Any]] = {}

    def build(self, request: ChatRequest) -> dict[str, Any]:
        system, contents = split_messages(request.messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"role": "user", "parts": [{"text": system}]}  # as the SDK sends it
        fields = generation_fields(request.params, self._vertex_schema)
        body["generationConfig"] = {_camel(name): value for name, value in fields.items()}
        return body

    def _vertex_schema(self, json_schema: dict[str, Any]) -> dict[str, Any]:
        key = json.dumps(json_schema, sort_keys=True)
        converted = self._schemas.get(key)
        if converted is None:
            from google.genai import _transformers

            schema = _transformers.t_schema(self._api_client(), json_schema)
            converted = ({} if schema is None
                         else schema.model_dump(mode="json", exclude_none=True, by_alias=True))
            self._schemas[key] = converted
        return converted
