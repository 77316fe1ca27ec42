"""What a generateContent request body says, read the way the fake Vertex server and the
scripted responders need it: the user's and the system's text, whether JSON was asked, and a
stand-in token count."""

from __future__ import annotations

import math
from typing import Any


def user_text(body: dict[str, Any]) -> str:
    """The text of the last user turn of a generateContent body."""
    for content in reversed(body.get("contents", [])):
        if content.get("role", "user") == "user":
            return "".join(part.get("text", "") for part in content.get("parts", []))
    return ""


def system_text(body: dict[str, Any]) -> str:
    instruction = body.get("systemInstruction") or {}
    return "".join(part.get("text", "") for part in instruction.get("parts", []))


def wants_json(body: dict[str, Any]) -> bool:
    return (body.get("generationConfig") or {}).get("responseMimeType") == "application/json"


def count_tokens(text: str) -> int:
    """The server's stand-in for a tokenizer: one token per 4 characters, at least 1."""
    return max(1, math.ceil(len(text) / 4))
