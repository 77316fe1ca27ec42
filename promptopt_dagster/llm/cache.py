"""A persistent response cache in front of any LLMClient.

Re-running an iteration, a backfill or a test must not pay for the same call twice. Replies are
kept in a SQLite file (WAL mode, busy timeout) keyed by `ChatRequest.cache_key(backend, model)`,
so several threads and several processes (Dagster runs, the CLI) can share one file. Only
successful replies are stored: a failed call is retried next time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from promptopt_dagster.errors import StorageError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, LLMClient

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""
_BUSY_TIMEOUT_S = 60.0
_SELECT_CHUNK = 500  # stay well under SQLite's bound-parameter limit


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0


class CachedLLM:
    """An LLMClient that answers from the cache when it can and sends only the misses, in one
    batch and in order, to `inner`. Hits come back with `cached=True` and `seconds=0`."""

    def __init__(self, inner: LLMClient, path: str | Path, enabled: bool = True) -> None:
        if "://" in str(path):
            raise StorageError(
                f"the LLM response cache must be a local file, got {path!r}. "
                f"Fix: point it at a path on local disk (PROMPTOPT_HOME)."
            )
        self.inner = inner
        self.backend = inner.backend
        self.model = inner.model
        self.path = Path(path).expanduser()
        self.enabled = enabled
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        if enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with closing(self._connect()) as conn, conn:
                    conn.execute(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise StorageError(
                    f"cannot open the LLM response cache {self.path} ({exc}). "
                    f"Fix: make its folder writable, or disable the cache (LLM_CACHE_ENABLED=false)."
                ) from exc

    def _connect(self) -> sqlite3.Connection:
        # One short-lived connection per call: sqlite3 connections are not shareable across
        # threads, and opening one costs well under a millisecond.
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _lookup(self, keys: Sequence[str]) -> dict[str, ChatResponse]:
        found: dict[str, ChatResponse] = {}
        unique = list(dict.fromkeys(keys))
        with closing(self._connect()) as conn:
            for i in range(0, len(unique), _SELECT_CHUNK):
                chunk = unique[i : i + _SELECT_CHUNK]
                marks = ",".join("?" * len(chunk))
                query = (f"SELECT key, text, prompt_tokens, completion_tokens FROM responses "
                         f"WHERE key IN ({marks})")
                rows = conn.execute(query, chunk)
                for key, text, prompt_tokens, completion_tokens in rows:
                    found[key] = ChatResponse(text=text, prompt_tokens=prompt_tokens,
                                              completion_tokens=completion_tokens, seconds=0.0, cached=True)
        return found

    def _store(self, items: Sequence[tuple[str, ChatResponse]]) -> None:
        now = time.time()
        rows = [(k, self.backend, self.model, r.text, r.prompt_tokens, r.completion_tokens, now)
                for k, r in items if r.ok]
        if not rows:
            return
        with closing(self._connect()) as conn, conn:
            conn.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        if not self.enabled:
            with self._stats_lock:
                self.stats.misses += len(requests)
            return self.inner.generate(requests)
        keys = [r.cache_key(self.backend, self.model) for r in requests]
        hits = self._lookup(keys)
        out: list[ChatResponse | None] = [hits.get(k) for k in keys]
        # Each distinct missing key is sent once; a repeat within the batch reuses that reply.
        first_index: dict[str, int] = {}
        for i, key in enumerate(keys):
            if out[i] is None and key not in first_index:
                first_index[key] = i
        if first_index:
            fresh = self.inner.generate([requests[i] for i in first_index.values()])
            if len(fresh) != len(first_index):
                raise RuntimeError(f"{type(self.inner).__name__}.generate returned {len(fresh)} replies "
                                   f"for {len(first_index)} requests")
            by_key = dict(zip(first_index, fresh, strict=True))
            self._store(list(by_key.items()))
            for i, key in enumerate(keys):
                if out[i] is None:
                    reply = by_key[key]
                    out[i] = reply if first_index[key] == i else reply.model_copy(
                        update={"cached": reply.ok, "seconds": 0.0})
        misses = len(first_index)
        with self._stats_lock:
            self.stats.misses += misses
            self.stats.hits += len(requests) - misses
        return [r for r in out if r is not None]
