"""The end-of-study report: one row per iteration, and seed vs champion on the test split."""

from __future__ import annotations

import pandas as pd
from pydantic import BaseModel

from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.scoring import evaluate_prompt
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData
from promptopt_dagster.llm.base import LLMClient


class IterationRow(BaseModel):
    """One iteration in the report's table; `wall_seconds` is from the start of the iteration's
    run to its decision, `llm_seconds` the time spent waiting on LLM calls."""

    iteration: int
    val_score: float
    accepted: bool
    llm_calls: int
    tokens: int
    llm_seconds: float
    wall_seconds: float | None = None
    cost_usd: float = 0.0


class StudyReport(BaseModel):
    study: str
    metric: str
    rows: list[IterationRow]
    seed_prompt: PromptState
    final_prompt: PromptState
    seed_val: float
    final_val: float
    seed_test: dict[str, float]
    final_test: dict[str, float]
    total_calls: int
    total_tokens: int
    test_calls: int
    stop_message: str
    total_cost_usd: float = 0.0  # the iterations' LLM calls, from the price table (0 on local models)
    test_cost_usd: float = 0.0  # the test-split scoring of this report

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([r.model_dump() for r in self.rows])

    def table_markdown(self) -> str:
        return self.table().to_markdown(index=False, floatfmt=".3f")


def stop_summary(record: IterationRecord) -> str:
    """One line on how a study ended, e.g. "study X stopped: patience (no improvement for 3
    iterations, every strategy tried) after iteration 7; best val 0.83"; for an iteration that
    did not stop, that the study continues."""
    best = f"best val {record.best_val_score:.4g}"
    if not record.stop:
        return f"study {record.study} continues after iteration {record.iteration}; {best}"
    return (
        f"study {record.study} stopped: {record.stop_reason} ({record.stop_message}) after iteration "
        f"{record.iteration}; {best}"
    )


def build_report(
    study: StudyConfig,
    records: list[IterationRecord],
    llm: LLMClient,
    evaluator: EvaluatorService,
    data: StudyData,
) -> StudyReport:
    seed = study.seed_prompt_state()
    final = records[-1].champion
    seed_test, u1 = evaluate_prompt(llm, evaluator, data, seed, "test")
    final_test, u2 = evaluate_prompt(llm, evaluator, data, final, "test")
    rows = [
        IterationRow(
            iteration=r.iteration,
            val_score=r.champion_val_score,
            accepted=r.accepted,
            llm_calls=r.calls,
            tokens=r.tokens,
            llm_seconds=round(r.llm_seconds, 1),
            wall_seconds=None if r.wall_seconds is None else round(r.wall_seconds, 1),
            cost_usd=r.cost_usd,
        )
        for r in records
    ]
    return StudyReport(
        study=study.name,
        metric=study.target_metric,
        rows=rows,
        seed_prompt=seed,
        final_prompt=final,
        seed_val=records[0].incumbent_val_score,
        final_val=records[-1].champion_val_score,
        seed_test=seed_test,
        final_test=final_test,
        total_calls=records[-1].total_calls,
        total_tokens=records[-1].total_tokens,
        test_calls=u1.calls + u2.calls,
        stop_message=records[-1].stop_message,
        total_cost_usd=sum(r.cost_usd for r in records),
        test_cost_usd=u1.cost_usd + u2.cost_usd,
    )
