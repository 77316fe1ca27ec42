"""How the Vertex client treats a failed call: retry it, reject the request, or give the row up.

Transient failures (408, 429, 500, 502, 503, 504, timeouts, dropped connections, truncated bodies,
prose where JSON was asked) are retried with exponential backoff and jitter, never sooner than the
server's `Retry-After`. Other 4xx mean the request itself is wrong: they carry the server's message
and a hint at the fix.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Longest server message kept in an error: enough to read, short enough for a log line.
MAX_MESSAGE = 500

# What to do about a rejected request, by HTTP status (400 for any other 4xx).
HINTS = {
    400: "check the request: model parameters, the response schema and the prompt length",
    401: "the credentials were refused: run `gcloud auth application-default login` or set "
         "GOOGLE_APPLICATION_CREDENTIALS to a service-account key",
    403: "the credentials lack permission: grant roles/aiplatform.user on the project and check "
         "VERTEX_PROJECT_ID and that the Vertex AI API is enabled",
    404: "check the model name (PRIMARY_MODEL_NAME / OPTIMIZER_MODEL_NAME) and VERTEX_LOCATION: the model "
         "may not exist in that region",
}


class NotJson(Exception):
    """The model answered prose where JSON was asked (retried: sampling may do better)."""


class Rejected(Exception):
    """A non-retryable 4xx: carries a redacted message for the ModelError or the row error."""


def status_code(exc: BaseException) -> int | None:
    """The HTTP status of a google-genai APIError (None for other failures)."""
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def hint(exc: BaseException) -> str:
    """The fix for a rejected request or a failed job, by its HTTP status."""
    return HINTS.get(status_code(exc) or 400, HINTS[400])


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: transient HTTP statuses and transport failures."""
    from google.genai import errors as genai_errors

    if isinstance(exc, genai_errors.APIError):
        return status_code(exc) in RETRYABLE_STATUS
    if isinstance(exc, (TimeoutError, ConnectionError, json.JSONDecodeError, NotJson)):
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


def backoff_delay(attempt: int, exc: BaseException, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter, but never less than the server's Retry-After."""
    backoff = min(max_s, initial_s * 2 ** (attempt - 1))
    backoff += random.uniform(0, initial_s)
    server = retry_after_seconds(exc)
    return backoff if server is None else max(backoff, server)


def describe(exc: BaseException) -> str:
    """One line for a failed call (not yet redacted: callers pass it through their Redactor)."""
    from google.genai import errors as genai_errors

    if isinstance(exc, genai_errors.APIError):
        return f"HTTP {exc.code} {exc.status or ''}: {exc.message or exc.details}".replace("  ", " ")
    if isinstance(exc, TimeoutError):
        return "timed out waiting for Vertex AI"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON from Vertex AI ({exc.msg})"
    return f"{type(exc).__name__}: {exc}"
