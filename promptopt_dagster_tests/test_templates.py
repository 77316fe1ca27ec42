"""One brace rule (Python's str.format) for output prompts: in rendering, in study files, in the
Prompt Registry and in the helper production callers use."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from promptopt_dagster.core.prompt_state import (
    PromptState,
    fill_template,
    messages_for_row,
    template_error,
    template_fields,
)
from promptopt_dagster.core.study import parse_study
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.tracking import MlflowTracker, prompt_name

ROW = {"review": "Nice {lamp}", "n": 3}
VALID = [
    "{review}",
    "Review: {review}\nAnswer:",
    'Reply as JSON: {{"label": "..."}}. Review: {review}',
    "{{review}} is literal; {review} is filled; {n} too",
    "nested {{ {review} }}",
]
INVALID = ['{"label": 1} {review}', "{review", "review}", "{0}", "{review!r}", "{review:>10}", "{}"]


@pytest.mark.parametrize("template", VALID)
def test_valid_templates_render_exactly_as_str_format(template: str) -> None:
    assert template_error(template) is None
    assert fill_template(template, ROW) == template.format(**ROW)
    prompt = PromptState(system_prompt="Braces {stay} as {{written}}", output_prompt=template)
    system, user = prompt.render(ROW)
    assert system.content == "Braces {stay} as {{written}}"  # the system prompt is plain text
    assert user.content == template.format(**ROW)


@pytest.mark.parametrize("template", INVALID)
def test_invalid_templates_are_named_with_the_rule(template: str) -> None:
    problem = template_error(template)
    assert problem is not None and "{{ and }}" in problem
    assert template_fields(template) == []
    with pytest.raises(ValueError, match="doubled"):
        fill_template(template, ROW)


def test_a_study_whose_seed_has_single_json_braces_is_refused_with_the_fix() -> None:
    text = (
        "name: s\ndataset: d.csv\ninput_columns: [review]\nreference_column: label\n"
        "seed_prompt:\n  output_prompt: 'Answer as {\"label\": x}: {review}'\n"
    )
    with pytest.raises(StudyConfigError, match=r"seed_prompt.*not a \{column\} placeholder.*doubled"):
        parse_study(text, source="s.yaml")
    fixed = text.replace('{\\"label\\": x}', '{{"label": x}}').replace('{"label": x}', '{{"label": x}}')
    study = parse_study(fixed, source="s.yaml")
    assert study.seed_prompt_state().render(ROW)[-1].content == 'Answer as {"label": x}: Nice {lamp}'


def test_the_registry_round_trip_renders_the_same_messages(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, outbox_path=tmp_path / "outbox.jsonl")
    prompt = PromptState(
        system_prompt="Label the review.", output_prompt='JSON {{"label": ...}} for: {review}'
    )
    tracker.register_prompt("braces", prompt.system_prompt, prompt.output_prompt, "seed", champion=True)
    mlflow.set_registry_uri(uri)
    loaded = mlflow.genai.load_prompt(f"prompts:/{prompt_name('braces')}@champion")
    expected = [m.model_dump() for m in prompt.render(ROW)]
    assert messages_for_row(loaded, ROW) == expected
    assert messages_for_row(loaded.template, ROW) == expected
    assert messages_for_row(prompt, ROW) == expected
    # what the README tells a production caller to do by hand gives the same text
    assert loaded.template[1]["content"].format(**ROW) == expected[1]["content"]
