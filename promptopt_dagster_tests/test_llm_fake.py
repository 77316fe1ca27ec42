"""The scripted fake LLM that the fast tests build on."""

from __future__ import annotations

from promptopt_dagster.llm.base import ChatRequest, LLMClient, Usage
from promptopt_dagster.llm.fake import ScriptedLLM


def test_scripted_llm_counts_and_records() -> None:
    llm = ScriptedLLM(lambda r: f"echo {r.messages[-1].content}", backend="b", model="m")
    assert isinstance(llm, LLMClient) and (llm.backend, llm.model) == ("b", "m")
    reqs = [
        ChatRequest.of([{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi there"}]),
        ChatRequest.of([{"role": "user", "content": "x"}]),
    ]
    replies = llm.generate(reqs)
    assert [r.text for r in replies] == ["echo hi there", "echo x"]
    assert [(r.prompt_tokens, r.completion_tokens) for r in replies] == [(4, 3), (1, 2)]
    assert llm.calls == 2 and llm.batches == 1 and llm.requests == reqs
    llm.generate(reqs[:1])
    assert llm.calls == 3 and llm.batches == 2 and len(llm.requests) == 3


def test_raising_responder_gives_an_error_row() -> None:
    def responder(request: ChatRequest) -> str:
        if "boom" in request.messages[-1].content:
            raise ValueError("scripted failure")
        return "ok"

    llm = ScriptedLLM(responder)
    replies = llm.generate([ChatRequest.of([{"role": "user", "content": c}]) for c in ["boom", "fine"]])
    assert replies[0].error == "ValueError: scripted failure" and replies[0].text == ""
    assert replies[1].ok and replies[1].text == "ok"
    assert Usage.from_responses(replies).failed_calls == 1


def test_from_mapping_matches_substrings_of_the_last_user_message() -> None:
    llm = ScriptedLLM.from_mapping({"2+3": "5", "capital of France": "Paris"}, default="?", model="map")
    msgs = [
        [{"role": "user", "content": "What is 2+3?"}],
        [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And the capital of France?"}],
        [{"role": "system", "content": "2+3"}, {"role": "user", "content": "nothing known"}],
    ]
    replies = llm.generate([ChatRequest.of(m) for m in msgs])
    assert [r.text for r in replies] == ["5", "Paris", "?"]
    assert llm.model == "map"


def test_responder_can_be_swapped_between_calls() -> None:
    llm = ScriptedLLM(lambda r: "first")
    llm.responder = lambda r: "second"
    assert llm.generate([ChatRequest.of([{"role": "user", "content": "q"}])])[0].text == "second"
