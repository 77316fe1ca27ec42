"""The embedded default LLM: a GGUF model run in-process by llama.cpp (through `xllamacpp`).

By default the packaged Qwen2.5-Coder-0.5B-Instruct, or any GGUF file in LOCAL_MODEL_PATH; finding,
joining and checking that file is `llm/weights.py`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, ReplyCallback
from promptopt_dagster.llm.weights import DEFAULT_CACHE_DIR, resolve_model_path

# One llama.cpp server per (model file, context, slots, threads) per process: loading costs ~1-2 s
# and ~0.6 GB, and the server is safe to call from several threads. The pid is in the key because
# a forked child inherits the dict but not the server's threads.
_SERVERS: dict[tuple[int, str, int, int, int], Any] = {}
_SERVERS_LOCK = threading.Lock()


def _server_for(model: Path, n_ctx: int, parallel: int, threads: int) -> Any:
    key = (os.getpid(), str(model), n_ctx, parallel, threads)
    with _SERVERS_LOCK:
        server = _SERVERS.get(key)
        if server is None:
            import xllamacpp  # deferred: importing it costs ~0.1 s and only this backend needs it

            params = xllamacpp.CommonParams()
            params.model.path = str(model)
            params.n_ctx = n_ctx * parallel  # llama.cpp splits the context across the slots
            params.n_parallel = parallel
            params.cpuparams.n_threads = threads
            params.cpuparams_batch.n_threads = threads
            params.verbosity = -1
            params.hostnames = ["127.0.0.1"]
            # Determinism: a reply must depend on its request only, never on what the server saw
            # before. llama.cpp reuses cached prompt prefixes (the slot's KV cache, and a RAM
            # cache of earlier prompts) by default; computing a prompt partly from cache changes
            # the floating-point results, so greedy outputs moved with the call order. Requests
            # also send cache_prompt=false (see _payload); these server defaults back that up.
            params.cache_prompt = False
            params.cache_ram_mib = 0
            params.cache_idle_slots = False
            params.n_cache_reuse = 0
            params.slot_prompt_similarity = 0.0
            try:
                server = xllamacpp.Server(params)
            except Exception as exc:
                raise ModelError(
                    f"llama.cpp could not load {model} ({exc}). The file may be truncated or of an "
                    f"unsupported architecture. Fix: use another GGUF file in LOCAL_MODEL_PATH, or unset "
                    f"it to use the packaged model."
                ) from exc
            _SERVERS[key] = server
        return server


def _usable_cores() -> int:
    """Cores this process may run on (a container's limit, not the host's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _payload(request: ChatRequest) -> dict[str, Any]:
    """The chat-completions body. Deterministic for a given request: the sampling seed is the
    request's own (fixed per request, part of the cache key), and cache_prompt=false makes
    llama.cpp evaluate the whole prompt afresh instead of reusing the KV cache of an earlier
    request, which made outputs depend on call order (see LocalLLM)."""
    p = request.params
    body: dict[str, Any] = {
        "messages": [m.model_dump() for m in request.messages],
        "temperature": p.temperature,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
        "cache_prompt": False,
    }
    if p.json_schema is not None:
        # Grammar-constrained decoding: llama.cpp turns the schema into a GBNF grammar, so even
        # the 0.5B model can only emit JSON of this shape (unless max_tokens cuts it short).
        body["response_format"] = {"type": "json_object", "schema": p.json_schema}
    return body


def _describe_error(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type", "error")
        return f"{kind}: {error.get('message', json.dumps(error)[:300])}"
    return str(error)[:500]


class LocalLLM:
    """An LLMClient over a local GGUF model. Sequential by default: on 2 cores, concurrent slots
    were no faster for short requests and made greedy outputs depend on batching.

    Determinism: with parallel=1 (the default) a request gets the same reply whatever was asked
    before it, in which order, and in a fresh server: every request is evaluated from an empty
    KV cache (cache_prompt=false, no prompt RAM cache) with its own fixed seed. The price: the
    prompt prefix requests share (the system prompt, demonstrations) is evaluated on every call.
    Measured on 2 (busy) cores, 20 one-word classifications sharing a system prompt: about 2x the
    CPU time per call (3.2 -> 6.5 s with a 40-token shared prefix, 7.2 -> 13.2 s with a
    110-token one holding four demonstrations); the response cache spares repeated calls.
    With parallel > 1 concurrent requests are batched together and replies may still depend on
    which requests shared a batch."""

    backend = "local"

    def __init__(
        self,
        model_path: str | None = None,
        cache_dir: str | Path = DEFAULT_CACHE_DIR,
        *,
        n_ctx: int = 8192,
        parallel: int = 1,
        threads: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if parallel < 1:
            raise ModelError(f"parallel must be at least 1, got {parallel}")
        self.model_file = resolve_model_path(model_path, cache_dir)
        self.model = self.model_file.stem
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.threads = threads or _usable_cores()
        self.progress = progress
        self._server = _server_for(self.model_file, n_ctx, parallel, self.threads)

    def _one(self, request: ChatRequest) -> ChatResponse:
        start = time.perf_counter()
        try:
            reply = self._server.handle_chat_completions(_payload(request))
        except Exception as exc:  # the server raises e.g. ValueError for a schema it cannot compile
            return ChatResponse(error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
        seconds = time.perf_counter() - start
        if not isinstance(reply, dict):
            return ChatResponse(error=f"unexpected reply from llama.cpp: {str(reply)[:300]}", seconds=seconds)
        if "error" in reply or "choices" not in reply:
            return ChatResponse(error=_describe_error(reply.get("error", reply)), seconds=seconds)
        usage = reply.get("usage") or {}
        try:
            text = reply["choices"][0]["message"].get("content") or ""
        except (IndexError, KeyError, TypeError, AttributeError):
            return ChatResponse(error=f"malformed reply from llama.cpp: {json.dumps(reply)[:300]}",
                                seconds=seconds)
        return ChatResponse(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            seconds=seconds,
        )

    def generate(self, requests: Sequence[ChatRequest], on_reply: ReplyCallback | None = None
                 ) -> list[ChatResponse]:
        """One reply per request, in order; `on_reply(index, reply)` hears each as it is done."""
        total = len(requests)
        if self.parallel == 1 or total <= 1:
            out: list[ChatResponse] = []
            for request in requests:
                out.append(self._one(request))
                if on_reply is not None:
                    on_reply(len(out) - 1, out[-1])
                if self.progress:
                    self.progress(len(out), total)
            return out
        results: list[ChatResponse | None] = [None] * total
        with ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="local-llm") as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for done, future in enumerate(as_completed(futures), start=1):
                index = futures[future]
                results[index] = future.result()
                if on_reply is not None:
                    on_reply(index, future.result())
                if self.progress:
                    self.progress(done, total)
        return [r for r in results if r is not None]
