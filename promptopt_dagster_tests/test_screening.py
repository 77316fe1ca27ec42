"""Screening stops a candidate that can no longer match the incumbent on the minibatch, or no
longer enter the best screened there, and never one that still could: the same candidates reach
validation as with full screening."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from promptopt_dagster.core.iteration import (
    SCREEN_BLOCK,
    screen_and_confirm,
    screen_candidate,
    screening_bar,
)
from promptopt_dagster.core.records import Candidate
from promptopt_dagster.core.scoring import evaluator_for, score_predictions
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster_tests.support.scripted import primary_responder, scripted_study

LABEL_RULE = "Answer with exactly one of: negative, positive."


def wrong_after(right: int) -> ScriptedLLM:
    """Right on its first `right` calls, then the wrong label."""
    calls = {"n": 0}

    def respond(request: ChatRequest) -> str:
        calls["n"] += 1
        good = primary_responder(request)
        return good if calls["n"] <= right else {"positive": "negative", "negative": "positive"}[good]

    return ScriptedLLM(respond)


@pytest.fixture
def minibatch(tmp_path: Path) -> tuple[object, pd.DataFrame]:
    study = scripted_study(tmp_path, minibatch_size=12)
    rows = load_study_data(study).iteration_rows(0)
    return study, rows[rows["split"] == "train"]


@pytest.mark.parametrize(
    ("incumbent", "right", "screened"),
    [
        (0.75, 0, 4),  # 0 of 4 right: at most 8/12 = 0.67 after the first block
        (0.75, 4, 8),  # 4 of 4, then 0 of 4: at most 8/12 after the second block
        (0.75, 12, 12),  # every row right
        (0.5, 0, 8),  # 8/12 = 0.67 still reachable after the first block, 4/12 not after the second
        (0.0, 0, 12),  # nothing to match: every row
        (1.0, 3, 4),  # one miss in the first block against a perfect incumbent
    ],
)
def test_screening_stops_once_the_incumbent_is_out_of_reach(
    minibatch: tuple[object, pd.DataFrame], incumbent: float, right: int, screened: int
) -> None:
    study, train = minibatch
    assert len(train) == 12 and SCREEN_BLOCK == 4
    prompt = study.seed_prompt_state().child(LABEL_RULE, "{review}")  # type: ignore[attr-defined]
    llm = wrong_after(right)
    evaluator = evaluator_for(study)  # type: ignore[arg-type]
    result = screen_candidate(llm, evaluator, study, prompt, train, incumbent)  # type: ignore[arg-type]
    preds = result.predictions
    assert len(preds) == len(result.scores) == llm.calls == screened
    assert preds["row_id"].tolist() == train["row_id"].tolist()[:screened]  # in minibatch order
    # the blocks' row scores are the rows' scores: the same as scoring every row at once
    whole, agg = score_predictions(evaluator, preds, study.target_metric, ["split"])  # type: ignore[attr-defined]
    assert result.scores == whole["score"].tolist()
    assert result.score == pytest.approx(agg["train"]["exact_match"])
    assert sum(result.scores) == min(right, screened)


def test_a_stopped_candidate_is_not_validated_and_a_reachable_one_is(tmp_path: Path) -> None:
    study = scripted_study(tmp_path, minibatch_size=12)
    data = load_study_data(study)
    good = Candidate(
        prompt=study.seed_prompt_state().child(LABEL_RULE, "{review}"), strategy="add_format_rule"
    )
    chatty = Candidate(
        prompt=study.seed_prompt_state().child("Say what you think.", "{review}"), strategy="reflect"
    )
    llm = ScriptedLLM(primary_responder)  # the bare label under the rule, prose otherwise
    preds = screen_and_confirm(llm, evaluator_for(study), data, [chatty, good], 0.75, iteration=0)
    by = preds.groupby(["candidate_id", "split"]).size().to_dict()
    n_val = len(data.iteration_rows(0).query("split == 'val'"))
    assert by[(chatty.prompt.id, "train")] == SCREEN_BLOCK and (chatty.prompt.id, "val") not in by
    assert by[(good.prompt.id, "train")] == 12 and by[(good.prompt.id, "val")] == n_val
    assert llm.calls == SCREEN_BLOCK + 12 + n_val


@pytest.mark.parametrize(
    ("full", "incumbent", "top", "bar"),
    [
        ([], 0.0, 2, 0.0),  # nothing screened yet: the incumbent's score
        ([0.9], 0.0, 2, 0.0),  # one of two places still open
        ([0.9, 0.5], 0.0, 2, 0.5),  # the lower of the best two
        ([0.9, 0.5, 0.7], 0.0, 2, 0.7),
        ([0.9, 0.5], 0.6, 2, 0.6),  # never below the incumbent
        ([0.4], 0.0, 1, 0.4),
    ],
)
def test_the_screening_bar_is_the_lowest_place_among_the_best_screened(
    full: list[float], incumbent: float, top: int, bar: float
) -> None:
    assert screening_bar(full, incumbent, top) == pytest.approx(bar)


def test_racing_stops_a_candidate_that_cannot_enter_the_best_two_and_validates_the_same_two(
    tmp_path: Path,
) -> None:
    """Against a seed at zero, two candidates right on every row set the bar at 1.0: a third
    that misses its first rows stops after one block instead of spending the whole minibatch,
    and the two validated are those full screening would validate."""
    study = scripted_study(tmp_path, minibatch_size=12)
    data = load_study_data(study)
    good = [
        Candidate(
            prompt=study.seed_prompt_state().child(LABEL_RULE + extra, "{review}"), strategy="add_format_rule"
        )
        for extra in ("", " Be brief.")
    ]
    chatty = Candidate(
        prompt=study.seed_prompt_state().child("Say what you think.", "{review}"), strategy="reflect"
    )
    n_val = len(data.iteration_rows(0).query("split == 'val'"))

    raced = ScriptedLLM(primary_responder)
    preds = screen_and_confirm(raced, evaluator_for(study), data, [*good, chatty], 0.0, iteration=0)
    by = preds.groupby(["candidate_id", "split"]).size().to_dict()
    assert by[(chatty.prompt.id, "train")] == SCREEN_BLOCK and (chatty.prompt.id, "val") not in by
    assert all(by[(g.prompt.id, "train")] == 12 and by[(g.prompt.id, "val")] == n_val for g in good)
    assert raced.calls == 2 * 12 + SCREEN_BLOCK + 2 * n_val

    # screened first, the chatty candidate has nothing to race against: every row, not validated
    full = ScriptedLLM(primary_responder)
    preds = screen_and_confirm(full, evaluator_for(study), data, [chatty, *good], 0.0, iteration=0)
    validated = set(preds.loc[preds["split"] == "val", "candidate_id"])
    assert validated == {g.prompt.id for g in good}
    assert full.calls == 3 * 12 + 2 * n_val
