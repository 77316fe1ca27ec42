"""End to end on the real embedded model: a shipped study, two iterations through the sensors."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from promptopt_dagster.core.study import load_study
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import drive
from promptopt_dagster.examples import EXAMPLES_DIR
from promptopt_dagster.settings import Settings

pytestmark = pytest.mark.e2e


def test_tiny_study_improves_on_the_seed_over_two_iterations(tmp_path: Path) -> None:
    raw = yaml.safe_load((EXAMPLES_DIR / "tiny_sentiment.yaml").read_text())
    # Out of reach, so the sensors must carry the study into a second iteration.
    # Two candidates an iteration (four while the seed scores zero) keep it to a few minutes.
    raw.update(
        target_threshold=1.01,
        max_iterations=2,
        candidates_per_iteration=2,
        dataset=str(EXAMPLES_DIR / raw["dataset"]),
    )
    study_file = tmp_path / "tiny.yaml"
    study_file.write_text(yaml.safe_dump(raw))
    study = load_study(study_file)

    settings = Settings(PROMPTOPT_HOME=tmp_path / "home")
    defs = build_definitions(settings)
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    store.register_study(study)
    with dg.instance_for_test() as instance:
        result = drive(defs, instance, study.name)
        assert [r.job for r in result.runs] == ["iteration_job", "iteration_job", "report_job"]
        records = store.records(study.name)
        assert [r.iteration for r in records] == [0, 1]
        assert records[-1].stop_reason == "max_iterations"
        seed_val = records[0].incumbent_val_score
        assert records[-1].champion_val_score > seed_val
        assert records[-1].champion.id != study.seed_prompt_state().id
        # iteration 1 started from iteration 0's champion
        assert records[1].incumbent_id == records[0].champion.id
        report = defs.load_asset_value("study_report", partition_key=study.name, instance=instance)
        assert report["final_test"]["exact_match"] >= report["seed_test"]["exact_match"]
        assert report["total_calls"] == sum(r.calls for r in records)
