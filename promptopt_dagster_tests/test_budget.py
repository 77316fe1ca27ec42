"""budget_calls is a hard cap: studies on the scripted LLMs, through the Dagster assets and the
sensors, never spend more LLM calls than their budget, whatever the budget."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from promptopt_dagster.core.budget import min_iteration_calls
from promptopt_dagster.core.inference import usage_of
from promptopt_dagster.core.iteration import screen_and_confirm
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import evaluator_for, score_predictions
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.sensors import continue_study_sensor, new_study_sensor
from promptopt_dagster_tests.support.pipeline import ITERATION_ASSETS, Pipeline, make_pipeline, tick
from promptopt_dagster_tests.support.scripted import primary_responder, scripted_study

# Stop rules other than the budget out of reach, so the budget is what ends each study.
UNBOUNDED = {"patience": 50, "max_iterations": 50, "target_threshold": 1.01}


def run_iterations(p: Pipeline, limit: int = 30) -> list[IterationRecord]:
    """What the daemon does: start the study, then materialize iterations while the continuation
    sensor asks for them (the report, whose test scoring is outside the budget, is not run)."""
    p.store.register_study(p.study)
    [request] = tick(p, new_study_sensor).run_requests
    for _ in range(limit):
        dg.materialize(
            ITERATION_ASSETS,
            partition_key=str(request.partition_key),
            instance=p.instance,
            resources=p.resources(),
        )
        result = tick(p, continue_study_sensor)
        requests = [r for r in result.run_requests or [] if r.job_name != "report_job"]
        if not requests:
            return p.store.records(p.study.name)
        [request] = requests
    raise AssertionError(f"the study did not stop within {limit} iterations")


def live_calls(p: Pipeline) -> int:
    """Calls that reached the scripted models (replies from the response cache do not)."""
    return p.llm.inner("primary").calls + p.llm.inner("optimizer").calls


@pytest.mark.e2e
@pytest.mark.parametrize("cache_enabled", [False, True])
def test_a_study_never_spends_more_than_its_budget(tmp_path: Path, cache_enabled: bool) -> None:
    # 48 rows: minibatch 6, validation 14, so the smallest iteration may need 2 * (6 + 14) = 40
    # calls and a full one (3 candidates) up to 20 + 2 + 18 + 14 = 54.
    budgets = [40, 47, 75, 95, 133, 200]
    for budget in budgets:
        folder = tmp_path / f"budget{budget}"
        folder.mkdir()
        with dg.instance_for_test() as instance:
            p = make_pipeline(
                folder, instance, cache_enabled=cache_enabled,
                budget_calls=budget, **UNBOUNDED,
            )
            records = run_iterations(p)
            last = records[-1]
            spent = live_calls(p)
            assert spent <= budget, (budget, spent)
            assert last.total_calls == spent == sum(r.calls for r in records)  # honest accounting
            assert last.stop and last.stop_reason == "budget", (budget, last.stop_message)
            assert not any(r.stop for r in records[:-1])
            # it stops only when what is left cannot pay for another iteration
            assert budget - last.total_calls < min_iteration_calls(6, 14), (budget, last.total_calls)
            if budget == 75 and not cache_enabled:
                # iteration 0 leaves too little for a full iteration: stop, with the reason
                assert len(records) == 1 and "left, fewer than the 40" in last.stop_message
            if budget in (40, 47) and not cache_enabled:
                # the only iteration is sized to the budget: fewer candidates, no optimizer call
                assert len(last.candidates) < p.study.candidates_per_iteration
                assert any(w.startswith("budget:") for w in last.warnings)


def test_a_budget_smaller_than_one_iteration_is_refused(tmp_path: Path) -> None:
    study = scripted_study(tmp_path, budget_calls=39)
    with pytest.raises(StudyConfigError) as info:
        load_study_data(study)
    message = str(info.value)
    assert "budget_calls 39" in message and "at least 40" in message
    assert load_study_data(study.model_copy(update={"budget_calls": 40})).splits["val"] is not None


def test_no_candidate_left_by_the_budget_makes_an_empty_screening(tmp_path: Path) -> None:
    study = scripted_study(tmp_path)
    data = load_study_data(study)
    llm = ScriptedLLM(primary_responder)
    preds = screen_and_confirm(llm, evaluator_for(study), data, [], 0.0, iteration=0)
    assert preds.empty and llm.calls == 0 and {"candidate_id", "split", "cached"} <= set(preds.columns)
    scored, aggregates = score_predictions(evaluator_for(study), preds, study.target_metric, ["candidate_id"])
    assert aggregates == {} and "score" in scored.columns
    assert usage_of(preds).calls == 0

