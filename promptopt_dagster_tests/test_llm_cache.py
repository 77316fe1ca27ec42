"""The persistent response cache, driven by the scripted fake."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from promptopt_dagster.errors import StorageError
from promptopt_dagster.llm.base import ChatRequest, ChatResponse, LLMClient, Usage
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.fake import ScriptedLLM


def ask(text: str, **params: object) -> ChatRequest:
    return ChatRequest.of([{"role": "user", "content": text}], **params)


def shout(request: ChatRequest) -> str:
    return request.messages[-1].content.upper() + " !"


def test_second_call_is_served_from_the_cache(tmp_path: Path) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    assert isinstance(llm, LLMClient) and (llm.backend, llm.model) == ("fake", "scripted")
    first = llm.generate([ask("one two"), ask("three")])
    assert [r.text for r in first] == ["ONE TWO !", "THREE !"] and not any(r.cached for r in first)
    assert inner.calls == 2

    second = llm.generate([ask("one two"), ask("three")])
    assert inner.calls == 2 and inner.batches == 1
    assert [r.text for r in second] == ["ONE TWO !", "THREE !"]
    assert all(r.cached and r.seconds == 0 for r in second)
    assert [(r.prompt_tokens, r.completion_tokens) for r in second] == [(2, 3), (1, 2)]
    assert (llm.stats.hits, llm.stats.misses) == (2, 2)
    usage = Usage.from_responses(second)
    assert usage.calls == 0 and usage.cached_calls == 2


def test_only_misses_go_to_inner_in_one_ordered_batch(tmp_path: Path) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    llm.generate([ask("b"), ask("d")])
    replies = llm.generate([ask("a"), ask("b"), ask("c"), ask("d"), ask("e"), ask("a")])
    assert [r.text for r in replies] == ["A !", "B !", "C !", "D !", "E !", "A !"]
    assert [r.cached for r in replies] == [False, True, False, True, False, True]
    assert inner.batches == 2
    assert [r.messages[-1].content for r in inner.requests[2:]] == ["a", "c", "e"]


class Killed(BaseException):
    """Stands in for SIGKILL inside a batch: not an Exception, so no layer turns it into a row error."""


def test_each_reply_is_stored_as_it_arrives_so_a_batch_cut_short_keeps_its_answers(tmp_path: Path) -> None:
    def dies_at_the_fourth(request: ChatRequest) -> str:
        if request.messages[-1].content == "r3":
            raise Killed
        return shout(request)

    batch = [ask(f"r{i}") for i in range(8)]
    with pytest.raises(Killed):
        CachedLLM(ScriptedLLM(dies_at_the_fourth), tmp_path / "c.sqlite").generate(batch)

    again = ScriptedLLM(shout)
    replies = CachedLLM(again, tmp_path / "c.sqlite").generate(batch)
    assert [r.cached for r in replies] == [True] * 3 + [False] * 5
    assert [r.messages[-1].content for r in again.requests] == [f"r{i}" for i in range(3, 8)]
    assert [r.text for r in replies] == [f"R{i} !" for i in range(8)]


def test_a_backend_without_on_reply_gets_one_batch_stored_when_it_returns(tmp_path: Path) -> None:
    class Plain:
        backend, model = "fake", "plain"

        def __init__(self) -> None:
            self.batches: list[int] = []

        def generate(self, requests: list[ChatRequest]) -> list[ChatResponse]:
            self.batches.append(len(requests))
            return [ChatResponse(text=shout(r)) for r in requests]

    inner = Plain()
    llm = CachedLLM(inner, tmp_path / "c.sqlite")
    llm.generate([ask("a"), ask("b")])
    assert [r.cached for r in llm.generate([ask("a"), ask("b"), ask("c")])] == [True, True, False]
    assert inner.batches == [2, 1]


def test_key_covers_params_and_model(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, path)
    llm.generate([ask("x"), ask("x", seed=1), ask("x", temperature=0.5), ask("x", max_tokens=3)])
    assert inner.calls == 4
    other = ScriptedLLM(shout, model="another")
    CachedLLM(other, path).generate([ask("x")])
    assert other.calls == 1


def test_cache_persists_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "c.sqlite"
    CachedLLM(ScriptedLLM(shout), path).generate([ask("kept")])
    fresh = ScriptedLLM(shout)
    [reply] = CachedLLM(fresh, path).generate([ask("kept")])
    assert fresh.calls == 0 and reply.cached and reply.text == "KEPT !"


def test_disabled_cache_passes_everything_through(tmp_path: Path) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, tmp_path / "c.sqlite", enabled=False)
    llm.generate([ask("a")])
    replies = llm.generate([ask("a")])
    assert inner.calls == 2 and not replies[0].cached
    assert not (tmp_path / "c.sqlite").exists()


def test_remote_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="local file"):
        CachedLLM(ScriptedLLM(shout), "gs://bucket/cache.sqlite")


def test_threads_share_one_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    lock = threading.Lock()
    answered: list[str] = []

    def record(request: ChatRequest) -> str:
        with lock:
            answered.append(request.messages[-1].content)
        return shout(request)

    llm = CachedLLM(ScriptedLLM(record), path)
    batches = [[ask(f"q{(t * 7 + i) % 40}") for i in range(20)] for t in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(llm.generate, batches))
    for batch, replies in zip(batches, results, strict=True):
        assert [r.text for r in replies] == [shout(q) for q in batch]
    assert set(answered) == {f"q{i}" for i in range(40)}
    assert llm.stats.hits + llm.stats.misses == 160

    fresh = ScriptedLLM(shout)
    CachedLLM(fresh, path).generate([ask(f"q{i}") for i in range(40)])
    assert fresh.calls == 0


def _fill_from_a_process(path: str, start: int) -> int:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, path)
    for i in range(start, start + 30, 3):
        llm.generate([ask(f"p{j}") for j in range(i, i + 3)])
    return inner.calls


def test_processes_share_one_cache_file(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sqlite")
    CachedLLM(ScriptedLLM(shout), path)  # create the schema once, as the first user would
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        calls = list(pool.map(_fill_from_a_process, [path, path], [0, 15]))
    assert all(c > 0 for c in calls)
    fresh = ScriptedLLM(shout)
    replies = CachedLLM(fresh, path).generate([ask(f"p{j}") for j in range(45)])
    assert fresh.calls == 0 and all(r.cached for r in replies)
    assert replies[44].text == "P44 !"
