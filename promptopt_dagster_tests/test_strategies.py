"""The optimizer's parts: clean-up of optimizer-LLM text, composition, demonstrations, answer
parsing, each strategy, and the order strategies are tried in (scripted optimizer LLM)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pandas as pd
import pytest

from promptopt_dagster.core.answers import parse_answer
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import CandidateScore
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.optimizer.bandit import StrategyBandit
from promptopt_dagster.optimizer.cleaning import clean_instruction
from promptopt_dagster.optimizer.context import Failure, ProposalContext, Tried
from promptopt_dagster.optimizer.optimizer import Optimizer
from promptopt_dagster.optimizer.parts import PromptParts, choose_demonstrations, compose
from promptopt_dagster.optimizer.selection import pick_winner
from promptopt_dagster.optimizer.strategies import STRATEGY_NAMES
from promptopt_dagster.optimizer.strategies.restate import as_template
from promptopt_dagster_tests.support.proposal import label_task_context

ROWS = [
    ("What would you say about the phone case: it fits exactly as described.", "positive"),
    ("15 - 14", "1"),
    ("France", "Paris"),
]


def test_cleaning_drops_pasted_and_paraphrased_rows_numbers_and_placeholders() -> None:
    text = (
        "123\nClassify the review as positive or negative. "
        "What would you say about the phone case, which fits exactly as described?\n"
        "15 - 14\nAnswer with the capital of the country, e.g. France gives Paris.\nReview: {review}"
    )
    cleaned = clean_instruction(text, ROWS)
    assert cleaned.text.splitlines() == [
        "Classify the review as positive or negative.",
        "Answer with the capital of the country, e.g. France gives Paris.",  # names a value: kept
    ]
    assert len(cleaned.dropped) == 4


def test_cleaning_drops_the_output_template_filled_in_but_not_an_instruction_like_it() -> None:
    """The 0.5B reflection model once proposed a rendered input as the whole instruction."""
    template = "Look at these numbers: {a} and {b}"
    text = "Look at these numbers: -10 and -10\nReply with the larger of the two numbers."
    cleaned = clean_instruction(text, ROWS, input_templates=[template])
    assert cleaned.dropped == ["Look at these numbers: -10 and -10"]
    assert cleaned.text == "Reply with the larger of the two numbers."
    # A template with no words of its own ("{text}") matches anything: it is not used.
    assert clean_instruction(text, ROWS, input_templates=["{text}"]).dropped == []


def test_cleaning_drops_a_short_line_made_only_of_one_row_s_values() -> None:
    """Seen as the first line of an accepted unit-conversion prompt."""
    rows = [("11 kg", "g", "11000"), ("10 hours", "minutes", "600")]
    cleaned = clean_instruction("11 kg; g\nConvert the quantity into the target unit.", rows)
    assert cleaned.dropped == ["11 kg; g"]
    assert clean_instruction("Convert hours to minutes.", rows).dropped == []  # words of its own


def test_cleaning_drops_a_line_without_a_word_of_three_letters() -> None:
    """'3kg' was the first line of an accepted unit-conversion prompt; a line in another script
    is an instruction like any other."""
    text = "3kg\nOK\nConvert the quantity.\n只回答城市名称"
    cleaned = clean_instruction(text, [])
    assert cleaned.dropped == ["3kg", "OK"]
    assert cleaned.text.splitlines() == ["Convert the quantity.", "只回答城市名称"]


def test_cleaning_keeps_a_clean_instruction_whole() -> None:
    text = "You label customer reviews. Reply with one word: positive or negative."
    assert clean_instruction(text, ROWS).text == text.replace(". ", ".\n")


@pytest.mark.parametrize(
    ("reply", "raw", "first", "field"),
    [
        ("Paris", "Paris", "Paris", "Paris"),
        ("Paris\nIt is the capital.", "Paris\nIt is the capital.", "Paris", "Paris"),
        ("Let me think.\nAnswer: `42`", "Let me think.\nAnswer: `42`", "Let me think.", "42"),
        ("**Answer:** Paris", "**Answer:** Paris", "Answer:** Paris", "Paris"),
    ],
)
def test_answer_parsers(reply: str, raw: str, first: str, field: str) -> None:
    assert parse_answer(reply, "raw") == raw
    assert parse_answer(reply, "first_line") == first
    assert parse_answer(reply, "answer_field") == field


def _train(n: int = 24) -> pd.DataFrame:
    labels = ["A"] * (n // 2) + ["B"] * (n // 3) + ["C"] * (n - n // 2 - n // 3)
    return pd.DataFrame(
        {"row_id": [f"r{i}" for i in range(n)], "text": [f"item {i}" for i in range(n)], "label": labels}
    )


def test_demonstrations_cover_every_label_outside_the_minibatch() -> None:
    train = _train()
    exclude = {"r0", "r1", "r2"}
    ids = choose_demonstrations(train, exclude, "label", 4, seed=1)
    chosen = train.set_index("row_id").loc[list(ids)]
    assert len(ids) == 4 and not set(ids) & exclude
    assert set(chosen["label"]) == {"A", "B", "C"}
    assert choose_demonstrations(train, exclude, "label", 4, seed=1) == ids  # deterministic


def test_compose_puts_instruction_rule_framing_and_demonstrations_in_order() -> None:
    train = _train()
    parts = PromptParts(
        instruction="Label the item.",
        output_prompt="{text}",
        format_rule="Answer with exactly one of: A, B, C.",
        demo_ids=("r3", "r20"),
        answer_parser="answer_field",
    )
    system, output = compose(parts, train, ["text"], "label")
    lines = system.splitlines()
    assert lines[:3] == ["Label the item.", "Answer with exactly one of: A, B, C.", lines[2]]
    assert "Answer:" in lines[2]
    assert "Input: item 3\nOutput: Answer: A" in system and output == "{text}"
    assert PromptParts.from_dict(parts.to_dict()) == parts


def _context(incumbent: PromptState, tried: list[Tried] | None = None) -> ProposalContext:
    return label_task_context(
        incumbent=incumbent,
        incumbent_score=0.0,
        failures=[Failure(inputs={"text": "item 5"}, expected="A", got="I think it is A")],
        history=[],
        train=_train(),
        tried=tried or [],
        format_rule="Answer with exactly one of: A, B, C. Reply with that label only, no other words.",
    )


def _optimizer_llm(replies: list[str]) -> ScriptedLLM:
    def respond(request: ChatRequest) -> str:
        return replies.pop(0) if replies else json.dumps({"candidates": [{"system_prompt": "Label it."}]})

    return ScriptedLLM(respond, model="scripted-optimizer")


SEED = PromptState(id="seed", system_prompt="", output_prompt="{text}")


def test_untried_strategies_go_first_and_all_are_tried_within_two_rounds() -> None:
    reply = json.dumps({"candidates": [{"system_prompt": "Label the item with its category."}]})
    optimizer = Optimizer(_optimizer_llm([reply]))
    bandit = StrategyBandit(STRATEGY_NAMES, seed=0)
    first = optimizer.propose(_context(SEED), 4, bandit)
    assert first.attempted[:4] == ["add_format_rule", "reflect", "restate_task", "add_examples"]
    assert len(first.candidates) == 4
    second = optimizer.propose(_context(SEED), 4, bandit, tried_on_incumbent=first.attempted)
    assert set(first.attempted) | set(second.attempted) == set(STRATEGY_NAMES)


def test_slots_a_strategy_leaves_empty_go_to_more_demonstration_sizes_at_no_optimizer_call() -> None:
    """At a zero seed (8 slots), restate_task, combine and shorten have nothing to offer here:
    their slots go to add_examples' other sizes instead of staying empty."""
    reply = json.dumps({"candidates": [{"system_prompt": "Label the item with its category."}]})
    result = Optimizer(_optimizer_llm([reply])).propose(
        _context(SEED), 8, StrategyBandit(STRATEGY_NAMES, seed=0)
    )
    assert len(result.candidates) == 8
    sizes = [
        len(c.prompt.metadata["parts"]["demo_ids"]) for c in result.candidates if c.strategy == "add_examples"
    ]
    assert sizes == [4, 2, 8]
    assert result.usage.calls == 2  # reflect and restate_task, each asked once


def test_reflection_with_pasted_rows_is_cleaned_before_screening() -> None:
    pasted = json.dumps(
        {"candidates": [{"system_prompt": "item 5\nLabel each item as A, B or C.\n{text}", "rationale": "r"}]}
    )
    result = Optimizer(_optimizer_llm([pasted]), strategies=["reflect"]).propose(
        _context(SEED), 1, StrategyBandit(STRATEGY_NAMES)
    )
    [cand] = result.candidates
    assert cand.prompt.system_prompt.splitlines()[0] == "Label each item as A, B or C."
    assert "{text}" not in cand.prompt.system_prompt and "item 5" not in cand.prompt.system_prompt
    assert any("stray line" in w for w in result.warnings)


def test_combine_joins_the_best_instruction_template_and_demonstrations() -> None:
    good_instruction = PromptParts("Label the item with its category.", "{text}")
    good_demos = PromptParts("", "{text}", demo_ids=("r3", "r20"))
    tried = [
        Tried(good_instruction, "reflect", train_score=0.5, val_score=0.6),
        Tried(PromptParts("Say something.", "{text}"), "reflect", train_score=0.1, val_score=None),
        Tried(good_demos, "add_examples", train_score=0.7, val_score=0.7),
        Tried(PromptParts("", "Which category is {text}?"), "restate_task", train_score=0.6, val_score=0.65),
    ]
    result = Optimizer(_optimizer_llm([]), strategies=["combine"]).propose(
        _context(SEED, tried), 1, StrategyBandit(STRATEGY_NAMES)
    )
    [cand] = result.candidates
    parts = PromptParts.of(cand.prompt)
    assert parts.instruction == good_instruction.instruction and parts.demo_ids == ("r3", "r20")
    assert parts.output_prompt == "Which category is {text}?"
    assert cand.prompt.system_prompt.startswith("Label the item with its category.")


def test_frame_answer_and_first_line_carry_their_parser_in_the_prompt() -> None:
    result = Optimizer(_optimizer_llm([]), strategies=["first_line", "frame_answer"]).propose(
        _context(SEED), 2, StrategyBandit(STRATEGY_NAMES)
    )
    parsers = {c.strategy: c.prompt.answer_parser for c in result.candidates}
    assert parsers == {"first_line": "first_line", "frame_answer": "answer_field"}
    framed = next(c.prompt for c in result.candidates if c.strategy == "frame_answer")
    assert framed.parse("I think.\nAnswer: B") == "B"
    assert len({c.prompt.content_hash() for c in result.candidates}) == 2


def test_a_validation_tie_goes_to_the_shorter_prompt_but_not_at_zero() -> None:
    short = CandidateScore(
        candidate_id="s", strategy="shorten", prompt_chars=40, train_score=0.5, val_score=0.6
    )
    assert pick_winner([short], incumbent_val=0.6, incumbent_chars=80) == short
    assert pick_winner([short], incumbent_val=0.6, incumbent_chars=30) is None
    zero = short.model_copy(update={"val_score": 0.0})
    assert pick_winner([zero], incumbent_val=0.0, incumbent_chars=80) is None


def test_an_exhausted_search_gives_no_candidate_instead_of_failing_the_run() -> None:
    """Reflection that only pastes a case, and nothing else new to try: the iteration goes on
    with no candidate (found by the benchmark, where it failed the run)."""
    pasted = json.dumps({"candidates": [{"system_prompt": "item 5", "rationale": "r"}]})
    rule = "Answer with exactly one of: A, B, C. Reply with that label only, no other words."
    parts = PromptParts(instruction="", output_prompt="{text}", format_rule=rule)
    incumbent = PromptState(
        id="inc", system_prompt=rule, output_prompt="{text}", metadata={"parts": parts.to_dict()}
    )
    result = Optimizer(_optimizer_llm([pasted]), strategies=["reflect", "add_format_rule"]).propose(
        _context(incumbent), 2, StrategyBandit(STRATEGY_NAMES)
    )
    assert result.candidates == [] and result.attempted == ["reflect", "add_format_rule"]
    assert any("no new candidate" in w for w in result.warnings), result.warnings


CAPITALS = pd.DataFrame(
    {
        "row_id": [f"c{i}" for i in range(8)],
        "country": ["Japan", "Peru", "Norway", "Egypt", "Chile", "Kenya", "Nepal", "Spain"],
        "capital": ["Tokyo", "Lima", "Oslo", "Cairo", "Santiago", "Nairobi", "Kathmandu", "Madrid"],
    }
)


def _capital_context() -> ProposalContext:
    seed = PromptState(id="seed", system_prompt="", output_prompt="Tell me about {country}.")
    return replace(
        _context(seed),
        failures=[Failure(inputs={"country": "Chile"}, expected="Santiago", got="Chile is long.")],
        train=CAPITALS,
        minibatch_ids={"c4", "c5"},
        input_columns=["country"],
        reference_column="capital",
        format_rule="Reply with only the answer, a single word, no explanation.",
    )


def test_restate_task_turns_a_question_about_one_example_into_the_output_template() -> None:
    """A misleading seed template is replaced: the optimizer LLM sees examples, not the seed's
    wording, and its question about one example becomes a template of the input column."""
    shown: list[str] = []

    def respond(request: ChatRequest) -> str:
        shown.append(request.messages[-1].content)
        example = r"Input: country: (\w+)\nWanted reply \(capital\): (\w+)"
        (country, capital), *_ = re.findall(example, shown[-1])
        questions = [
            f"What is the capital city of {country}? Reply with only the answer.",
            "What is the capital of {country}?",
            f"What is the capital of {country}? It is {capital}.",  # gives an example's answer away
            "Name a capital city.",  # places no input column
        ]
        return json.dumps({"candidates": [{"system_prompt": q, "rationale": "r"} for q in questions]})

    result = Optimizer(ScriptedLLM(respond, model="scripted-optimizer"), strategies=["restate_task"]).propose(
        _capital_context(), 4, StrategyBandit(STRATEGY_NAMES)
    )
    templates = [c.prompt.output_prompt for c in result.candidates]
    assert templates == [
        "What is the capital city of {country}? Reply with only the answer.",
        "What is the capital of {country}?",
    ]
    assert all(c.prompt.system_prompt.startswith("Reply with only the answer") for c in result.candidates)
    assert sum("dropped a question" in w for w in result.warnings) == 2
    [message] = shown
    assert "Tell me about" not in message and "{country}" in message
    # the fields and the reply's column are named: what lets a small model say what is asked
    assert "Each input has the fields country; the wanted reply is its capital." in message
    # examples come from outside the screening minibatch
    assert message.count("Wanted reply (capital):") == 4
    assert "Santiago" not in message and "Nairobi" not in message


def test_a_template_places_every_input_column_longest_value_first() -> None:
    row = {"quantity": "12 hours", "target_unit": "minutes", "value": "720"}
    assert as_template("In how many minutes are 12 hours?", row, ["quantity", "target_unit"]) == (
        "In how many {target_unit} are {quantity}?"
    )
    assert as_template("How many seconds are in 12 hours?", row, ["quantity", "target_unit"]) is None
    assert as_template("Convert {quantity} into {target_unit}.", row, ["quantity", "target_unit"]) == (
        "Convert {quantity} into {target_unit}."
    )
    assert as_template("Use {braces} for 12 hours in minutes", row, ["quantity", "target_unit"]) is None


def test_add_examples_tries_other_sizes_then_another_draw_of_the_incumbents_size() -> None:
    four = choose_demonstrations(_train(), {"r0", "r1"}, "label", 4, seed=0)
    incumbent = SEED.child("", "{text}", "raw", parts=PromptParts("", "{text}", demo_ids=four).to_dict())
    tried = [
        Tried(PromptParts("", "{text}", demo_ids=four[:2]), "add_examples", 0.4, None),
        Tried(PromptParts("", "{text}", demo_ids=four), "add_examples", 0.6, 0.6),
    ]
    result = Optimizer(_optimizer_llm([]), strategies=["add_examples"]).propose(
        _context(incumbent, tried), 3, StrategyBandit(STRATEGY_NAMES)
    )
    sets = [PromptParts.of(c.prompt).demo_ids for c in result.candidates]
    # the untried sizes (8, then 0) first, then four other rows
    assert [len(s) for s in sets] == [8, 0, 4]
    assert sets[2] != four and not set(sets[2]) & {"r0", "r1"}
    labels = _train().set_index("row_id").loc[list(sets[2]), "label"]
    assert set(labels) == {"A", "B", "C"}  # a redraw still covers every label


def test_add_examples_never_proposes_a_set_measured_before() -> None:
    train = _train(6)  # r0, r1 in the minibatch: only four rows can be shown
    pool = tuple(sorted(set(train["row_id"]) - {"r0", "r1"}))
    ctx = _context(SEED)
    ctx.train = train
    first = Optimizer(_optimizer_llm([]), strategies=["add_examples"]).propose(
        ctx, 1, StrategyBandit(STRATEGY_NAMES)
    )
    [cand] = first.candidates
    shown = PromptParts.of(cand.prompt)
    assert sorted(shown.demo_ids) == list(pool)
    ctx = _context(cand.prompt, [Tried(shown, "add_examples", 0.5, 0.5)])
    ctx.train = train
    again = Optimizer(_optimizer_llm([]), strategies=["add_examples"]).propose(
        ctx, 4, StrategyBandit(STRATEGY_NAMES)
    )
    seen = [PromptParts.of(c.prompt) for c in again.candidates]
    assert shown not in seen and len(set(seen)) == len(seen)


def test_sizes_measured_with_another_instruction_are_measured_again_before_a_redraw() -> None:
    two = choose_demonstrations(_train(), {"r0", "r1"}, "label", 2, seed=0)
    old = PromptParts("Label it.", "{text}", demo_ids=two)
    new = PromptParts("Label the item as A, B or C.", "{text}", demo_ids=two)  # a newer champion
    incumbent = SEED.child(new.instruction, "{text}", "raw", parts=new.to_dict())
    tried = [Tried(old.with_(demo_ids=d), "add_examples", 0.5, None) for d in [(), two, two + ("r5", "r6")]]
    tried.append(
        Tried(old.with_(demo_ids=two + ("r5", "r6", "r7", "r8", "r9", "r10")), "add_examples", 0.5, None)
    )
    result = Optimizer(_optimizer_llm([]), strategies=["add_examples"]).propose(
        _context(incumbent, tried), 1, StrategyBandit(STRATEGY_NAMES)
    )
    [cand] = result.candidates
    assert len(PromptParts.of(cand.prompt).demo_ids) == 4  # not another draw of 2


def test_stack_puts_the_format_rule_the_frame_and_add_examples_first_set_on_a_bare_prompt() -> None:
    result = Optimizer(_optimizer_llm([]), strategies=["add_examples", "stack"]).propose(
        _context(SEED), 2, StrategyBandit(STRATEGY_NAMES)
    )
    by = {c.strategy: c.prompt for c in result.candidates}
    examples, stacked = PromptParts.of(by["add_examples"]), PromptParts.of(by["stack"])
    assert stacked.demo_ids == examples.demo_ids and len(stacked.demo_ids) == 4
    assert not set(stacked.demo_ids) & {"r0", "r1"}  # never a minibatch row
    assert stacked.format_rule == _context(SEED).format_rule
    assert (examples.answer_parser, stacked.answer_parser) == ("raw", "answer_field")
    # the demonstrations answer in the frame the reply is parsed from
    assert "Output: Answer: " in by["stack"].system_prompt
    assert by["stack"].parse("It is B.\nAnswer: B") == "B"


def test_stack_is_measured_once_per_study() -> None:
    stack = Optimizer(_optimizer_llm([]), strategies=["stack"])
    measured = [
        Tried(PromptParts("", "{text}", demo_ids=("r5",), answer_parser="answer_field"), "stack", 0.2, None)
    ]
    assert stack.propose(_context(SEED, measured), 2, StrategyBandit(STRATEGY_NAMES)).candidates == []
    assert len(stack.propose(_context(SEED), 2, StrategyBandit(STRATEGY_NAMES)).candidates) == 1


def test_stack_leaves_a_prompt_with_demonstrations_or_a_parser_alone() -> None:
    stack = Optimizer(_optimizer_llm([]), strategies=["stack"])
    with_demos = SEED.child("", "{text}", "raw", parts=PromptParts("", "{text}", demo_ids=("r5",)).to_dict())
    framed = SEED.child(
        "", "{text}", "first_line", parts=PromptParts("", "{text}", answer_parser="first_line").to_dict()
    )
    for incumbent in (with_demos, framed):
        result = stack.propose(_context(incumbent), 2, StrategyBandit(STRATEGY_NAMES))
        assert result.candidates == [] and result.attempted == ["stack"]
