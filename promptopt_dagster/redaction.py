"""Secrets out of everything a user can read: logs, error messages, MLflow params and artifacts.

One place decides what looks like a credential, so storage errors, LLM errors and the tracking
adapter hide the same things the same way.
"""

from __future__ import annotations

import os
import re

_SECRET_WORDS = frozenset(
    {
        "token",
        "secret",
        "password",
        "passwd",
        "pwd",
        "credential",
        "credentials",
        "apikey",
        "key",
        "auth",
        "authorization",
        "cookie",
        "private",
        "privatekey",
        "signature",
    }
)
# Keys that contain a secret word but name no secret.
_SAFE_KEYS = frozenset(
    {"partition_key", "run_key", "asset_key", "cache_key", "sort_key", "metric_key", "study_key"}
)
_SECRET_SUFFIXES = ("token", "secret", "password", "apikey", "credentials")
# Values that are secrets whatever their key says (Google OAuth / API keys, PEM keys, common tokens).
_SECRET_VALUE = re.compile(
    r"ya29\.[\w.-]{20,}|AIza[0-9A-Za-z_-]{35}"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----"
    r"|\bsk-[A-Za-z0-9_-]{20,}|\bgh[pousr]_[A-Za-z0-9]{30,}|\bhf_[A-Za-z0-9]{30,}"
)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SECRET_PARAM = re.compile(
    r"(?i)\b(access_token|token|key|sig|signature|x-goog-signature|x-goog-credential)=[^&\s]+"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")


def is_secret_key(key: str) -> bool:
    """True when a key's name suggests its value is a credential (token, key, secret, password...)."""
    lowered = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", key).lower()
    if lowered.startswith("mlflow.") or lowered.rsplit(".", 1)[-1] in _SAFE_KEYS:
        return False
    words = [w for w in re.split(r"[^a-z0-9]+", lowered) if w]
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_SUFFIXES) for w in words)


def looks_like_secret_value(value: str) -> bool:
    return bool(_SECRET_VALUE.search(value))


def redact(text: str | os.PathLike[str]) -> str:
    """`text` (a URI, a message, an artifact) without ``user:password@`` in URLs, token-like query
    parameters, bearer tokens or credential-shaped values."""
    text = _USERINFO.sub("***@", str(text))
    text = _SECRET_PARAM.sub(r"\1=***", text)
    text = _BEARER.sub(r"\1***", text)
    return _SECRET_VALUE.sub("[REDACTED]", text)


class Redactor:
    """`redact`, plus the exact secrets a client holds (an access token it was given)."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text)
