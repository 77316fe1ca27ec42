"""The optimizer: proposal sources, JSON parsing and retries, selection rules."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import CandidateScore
from promptopt_dagster.errors import OptimizerError
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.context import Failure, HistoryEntry, ProposalContext
from promptopt_dagster.optimizer.optimizer import Optimizer
from promptopt_dagster.optimizer.parts import infer_format_rule
from promptopt_dagster.optimizer.reply import parse_proposals, reflection_messages
from promptopt_dagster.optimizer.selection import choose_for_validation, pick_winner
from promptopt_dagster.optimizer.strategies.edits import shorten
from promptopt_dagster_tests.support.proposal import label_task_context

TRAIN = pd.DataFrame(
    {
        "row_id": [f"r{i}" for i in range(10)],
        "text": [f"text {i}" for i in range(10)],
        "label": ["SPORT", "TECH"] * 5,
    }
)


def ctx(**kw: object) -> ProposalContext:
    args: dict[str, object] = dict(
        incumbent=PromptState(system_prompt="", output_prompt="{text}"),
        incumbent_score=0.2,
        failures=[Failure(inputs={"text": "text 1"}, expected="TECH", got="It is about technology.")],
        history=[HistoryEntry(system_prompt="Classify.", score=0.1)],
        train=TRAIN,
        format_rule=infer_format_rule(TRAIN["label"].tolist()),
    )
    args.update(kw)
    return label_task_context(**args)


def good_reply(request: ChatRequest) -> str:
    return json.dumps({"candidates": [{"system_prompt": "Give the topic code.", "rationale": "be direct"}]})


def test_format_rule_is_inferred_from_labels_numbers_and_short_answers() -> None:
    assert "exactly one of: SPORT, TECH" in (infer_format_rule(["SPORT", "TECH"] * 4) or "")
    assert "only the final number" in (infer_format_rule(["12", "-3", "40", "7", "2"]) or "")
    assert "at most 2 words" in (infer_format_rule([f"paris {i}" for i in range(9)] + ["x"]) or "")
    one_word = infer_format_rule([f"1957-03-{d:02d}" for d in range(10, 30)]) or ""
    assert "a single word" in one_word and "1 words" not in one_word
    assert infer_format_rule([" ".join(["word"] * 30) + str(i) for i in range(5)]) is None


def test_many_label_codes_are_listed_even_when_most_appear_once() -> None:
    """22 intent codes in 32 train rows: the rule names every code, so a small model answers
    with a code rather than a description (free single-word answers that rarely repeat, such as
    cities, stay an open answer)."""
    codes = [f"intent_{i}" for i in range(22)]
    rule = infer_format_rule(codes + codes[:10]) or ""
    assert rule.startswith("Answer with exactly one of: ") and all(c in rule for c in codes)
    cities = ["paris", "rome", "lima", "oslo", "bern", "kyiv", "riga", "doha", "baku", "rome"]
    assert "exactly one of" not in (infer_format_rule(cities) or "")


def test_parse_proposals_accepts_fenced_and_bare_shapes_and_rejects_garbage() -> None:
    fenced = '```json\n{"candidates": [{"system_prompt": "A", "rationale": "b"}]}\n```'
    assert parse_proposals(fenced)[0].system_prompt == "A"
    assert parse_proposals('Sure! {"system_prompt": "B"}')[0].system_prompt == "B"
    assert parse_proposals('[{"system_prompt": "C"}]')[0].system_prompt == "C"
    with pytest.raises(ValueError, match="not JSON"):
        parse_proposals("no json here")
    with pytest.raises(ValueError, match="wrong shape"):
        parse_proposals('{"candidates": []}')


def test_a_reply_cut_off_by_max_tokens_keeps_its_whole_candidates() -> None:
    """The 0.5B model writes long rationales and runs out of tokens inside the second candidate."""
    cut = (
        '{\n  "candidates": [\n    {"system_prompt": "What is the capital of {country}?", "rationale": '
        '"short"},\n    {"system_prompt": "What is the capital city of Jap'
    )
    [whole] = parse_proposals(cut)
    assert whole.system_prompt == "What is the capital of {country}?" and whole.rationale == "short"
    with pytest.raises(ValueError, match="not JSON"):
        parse_proposals('{"candidates": [{"system_prompt": "What is the cap')


def test_reflection_meta_prompt_shows_failures_history_and_asks_for_json() -> None:
    c = ctx()
    [system, user] = reflection_messages(c.incumbent, c.metric, 0.2, c.failures, c.history, 2)
    assert "JSON" in system.content
    assert "Expected: TECH" in user.content and "Got: It is about technology." in user.content
    assert "score 0.10: Classify." in user.content and "Write 2 new" in user.content


def test_propose_combines_reflection_with_data_driven_strategies() -> None:
    llm = ScriptedLLM(good_reply)
    result = Optimizer(llm).propose(ctx(), 4, StrategyBandit(["add_format_rule", "add_examples", "shorten"]))
    strategies = [c.strategy for c in result.candidates]
    assert strategies[:3] == ["add_format_rule", "reflect", "add_examples"] and len(strategies) == 4
    reflect = result.candidates[1].prompt
    assert reflect.system_prompt.startswith("Give the topic code.")
    assert "exactly one of: SPORT, TECH" in reflect.system_prompt  # the data rule rides along
    examples = next(c for c in result.candidates if c.strategy == "add_examples").prompt.system_prompt
    assert "Output: SPORT" in examples and "Output: TECH" in examples
    assert "text 0" not in examples and "text 1" not in examples  # never the screening minibatch
    assert all(c.prompt.parent_id == ctx().incumbent.id or c.prompt.parent_id for c in result.candidates)
    assert result.usage.calls == 2  # reflect and restate_task, one call each


def test_optimizer_retries_with_a_new_seed_then_gives_a_clear_error() -> None:
    replies = iter(["not json", good_reply(None)])  # type: ignore[arg-type]
    llm = ScriptedLLM(lambda r: next(replies))
    result = Optimizer(llm, strategies=["reflect"]).propose(ctx(), 1, StrategyBandit(["shorten"]))
    assert len(result.candidates) == 1 and result.usage.calls == 2
    seeds = {r.params.seed for r in llm.requests}
    assert len(seeds) == 2  # a cached bad reply would otherwise come back

    bad = ScriptedLLM(lambda r: "I am not able to produce JSON.")
    with pytest.raises(OptimizerError) as info:
        Optimizer(bad, strategies=["reflect"]).propose(ctx(), 1, StrategyBandit(["shorten"]))
    assert "no usable JSON in 3 attempts" in str(info.value)
    assert "stronger optimizer_model" in str(info.value)


def test_shorten_drops_repeats_and_the_longest_sentence() -> None:
    text = "Be brief. Be brief. Answer with a label. This sentence is long and says very little at all."
    assert shorten(text) == "Be brief. Answer with a label."
    assert shorten("Be brief.") is None


def test_selection_validates_only_candidates_that_hold_up_and_accepts_only_improvements() -> None:
    s = [
        CandidateScore(candidate_id="a", strategy="x", prompt_chars=50, train_score=0.8),
        CandidateScore(candidate_id="b", strategy="x", prompt_chars=20, train_score=0.8),
        CandidateScore(candidate_id="c", strategy="x", prompt_chars=10, train_score=0.1),
    ]
    chosen = choose_for_validation(s, incumbent_train=0.5, top=1)
    assert [c.candidate_id for c in chosen] == ["b"]  # tie on score: the shorter prompt
    assert choose_for_validation(s, incumbent_train=0.9, top=2) == []
    s[1].val_score = 0.6
    assert pick_winner(s, incumbent_val=0.6) is None  # equal is not an improvement
    assert pick_winner(s, incumbent_val=0.5).candidate_id == "b"  # type: ignore[union-attr]


def test_proposals_that_paste_a_training_case_are_dropped_with_a_warning() -> None:
    def copying(request: ChatRequest) -> str:
        return json.dumps(
            {"candidates": [{"system_prompt": "What about text 1? Answer TECH.", "rationale": ""}]}
        )

    optimizer = Optimizer(ScriptedLLM(copying), strategies=["add_format_rule", "reflect"])
    result = optimizer.propose(ctx(), 3, StrategyBandit(["add_format_rule"]))
    assert "reflect" not in [c.strategy for c in result.candidates]
    assert any("stray line" in w and "text 1" in w for w in result.warnings)
    assert [c.strategy for c in result.candidates] == ["add_format_rule"]


# --- the LLM-call budget ----------------------------------------------------------------------


def test_failed_optimizer_attempts_count_in_the_usage() -> None:
    bad = ScriptedLLM(lambda r: "I am not able to produce JSON.")
    result = Optimizer(bad, strategies=["reflect", "add_format_rule"]).propose(
        ctx(), 2, StrategyBandit(["add_format_rule"])
    )
    assert [c.strategy for c in result.candidates] == ["add_format_rule"]
    assert any("no usable JSON" in w for w in result.warnings)
    assert bad.calls == 3 and result.usage.calls == 3  # spent, so counted against the budget


def test_max_calls_caps_the_optimizer_llm() -> None:
    llm = ScriptedLLM(good_reply)
    bandit = StrategyBandit(["add_format_rule", "add_examples"])
    result = Optimizer(llm).propose(ctx(), 4, bandit, max_calls=0)
    assert llm.calls == 0 and result.usage.calls == 0
    assert "reflect" not in [c.strategy for c in result.candidates] and result.candidates
    assert any("budget" in w for w in result.warnings)

    bad = ScriptedLLM(lambda r: "not json")
    result = Optimizer(bad, strategies=["reflect", "add_format_rule"]).propose(
        ctx(), 2, StrategyBandit(["add_format_rule"]), max_calls=2
    )
    assert bad.calls == 2 and result.usage.calls == 2
    assert any("budget is spent" in w for w in result.warnings)


def test_a_budget_that_leaves_no_candidate_gives_an_empty_result_not_an_error() -> None:
    llm = ScriptedLLM(good_reply)
    bandit = StrategyBandit(["shorten"])
    result = Optimizer(llm, strategies=["reflect"]).propose(ctx(), 2, bandit, max_calls=0)
    assert result.candidates == [] and llm.calls == 0
    assert any("budget" in w for w in result.warnings)


def test_a_minibatch_tie_sends_different_strategies_to_validation() -> None:
    """Three demonstration sets and `stack` tie on the minibatch: the second place goes to the
    other strategy, not to the next-shortest set (two draws of one idea teach validation less)."""
    s = [
        CandidateScore(candidate_id="d4", strategy="add_examples", prompt_chars=300, train_score=0.6),
        CandidateScore(candidate_id="st", strategy="stack", prompt_chars=400, train_score=0.6),
        CandidateScore(candidate_id="d2", strategy="add_examples", prompt_chars=200, train_score=0.6),
        CandidateScore(candidate_id="hi", strategy="add_examples", prompt_chars=500, train_score=0.9),
    ]
    chosen = choose_for_validation(s, incumbent_train=0.0, top=3)
    assert [c.candidate_id for c in chosen] == ["hi", "st", "d2"]  # a better score still comes first
    assert [c.candidate_id for c in choose_for_validation(s[:3], 0.0, 2)] == ["d2", "st"]
