"""PromptState, StudyConfig and the stop rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.stopping import StopRules, decide_stop
from promptopt_dagster.core.study import load_study, parse_study
from promptopt_dagster.errors import StudyConfigError

STUDY = """
name: demo
dataset: data.csv
input_columns: [text]
reference_column: label
seed_prompt:
  output_prompt: "{text}"
"""


def test_render_fills_columns_and_undoubles_literal_braces() -> None:
    p = PromptState(system_prompt="Be brief.", output_prompt='Review: {text}\nJSON like {{"a": 1}} or {{}}')
    msgs = p.render({"text": "great phone", "label": "positive"})
    assert [m.role for m in msgs] == ["system", "user"]
    assert msgs[1].content == 'Review: great phone\nJSON like {"a": 1} or {}'
    assert p.placeholders() == {"text"}
    assert p.missing_columns(["label"]) == ["text"]


def test_render_without_system_prompt_sends_only_user_message() -> None:
    msgs = PromptState(system_prompt="  ", output_prompt="{q}").render({"q": "1+1"})
    assert len(msgs) == 1 and msgs[0].content == "1+1"


def test_child_keeps_lineage_and_save_load_round_trips(tmp_path: Path) -> None:
    seed = PromptState(system_prompt="a", output_prompt="{x}")
    child = seed.child("b", "{x}", strategy="reflect")
    assert child.parent_id == seed.id and child.version == seed.version + 1
    assert child.content_hash() != seed.content_hash()
    path = child.save(str(tmp_path / "p" / "child.json"))
    loaded = PromptState.load(path)
    assert loaded == child


def test_study_loads_and_resolves_dataset_relative_to_file(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(STUDY)
    study = load_study(tmp_path / "s.yaml")
    assert study.dataset == str(tmp_path / "data.csv")
    assert study.target_metric == "exact_match" and study.all_metrics()[0] == "exact_match"
    assert study.seed_prompt_state().version == 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: demo\n  bad: [", "not valid YAML"),
        ("- a\n- b\n", "must be a YAML mapping"),
        (STUDY.replace("reference_column: label\n", ""), "reference_column: required field is missing"),
        (STUDY + "patiense: 3\n", "patiense: unknown field"),
        (STUDY.replace('"{text}"', '"{question}"'), "uses ['question'] which are not in input_columns"),
        (STUDY.replace('"{text}"', '"no placeholder"'), "at least one {column} placeholder"),
        (STUDY.replace("name: demo", "name: Demo Study"), "lowercase letters"),
        (STUDY + "splits: {train: 0.5, val: 0.5, test: 0.5}\n", "must be 1.0"),
    ],
)
def test_malformed_study_files_get_one_clear_message(text: str, expected: str) -> None:
    with pytest.raises(StudyConfigError) as info:
        parse_study(text, source="s.yaml")
    assert expected in str(info.value)
    assert "s.yaml" in str(info.value)


def test_missing_study_file(tmp_path: Path) -> None:
    with pytest.raises(StudyConfigError, match="does not exist"):
        load_study(tmp_path / "nope.yaml")


RULES = StopRules(target_threshold=0.9, patience=2, max_iterations=5, budget_calls=100)


def _stop(**kw: object) -> tuple[bool, str | None]:
    rules = RULES.model_copy(update={k: kw.pop(k) for k in list(kw) if k in StopRules.model_fields})
    args: dict[str, object] = {"best_score": 0.5, "iterations_done": 1, "calls_spent": 10}
    args = {"iterations_without_improvement": 0, **args, **kw}
    d = decide_stop(rules, **args)  # type: ignore[arg-type]
    return d.stop, d.reason


def test_stop_rules_each_fire_for_their_reason() -> None:
    assert _stop() == (False, None)
    assert _stop(best_score=0.95) == (True, "target_reached")
    assert _stop(iterations_without_improvement=2) == (True, "patience")
    assert _stop(iterations_done=5) == (True, "max_iterations")
    assert _stop(calls_spent=100) == (True, "budget")
    assert _stop(budget_calls=None, calls_spent=10**6) == (False, None)


def test_budget_stops_when_what_is_left_cannot_pay_for_the_next_iteration() -> None:
    assert _stop(calls_spent=60, next_iteration_calls=40) == (False, None)
    assert _stop(calls_spent=61, next_iteration_calls=40) == (True, "budget")
    d = decide_stop(
        RULES, best_score=0.5, iterations_done=1, iterations_without_improvement=0, calls_spent=75,
        next_iteration_calls=40,
    )
    assert d.message == (
        "budget of 100 LLM calls: 75 spent, 25 left, fewer than the 40 the next iteration may need"
    )
    assert _stop(calls_spent=100, next_iteration_calls=0) == (True, "budget")
