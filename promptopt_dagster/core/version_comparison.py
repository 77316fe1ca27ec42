"""The comparison of prompt versions over datasets: every evaluation summary in the store as one
long table (prompt version x dataset x metric) and as a pivot to read at a glance."""

from __future__ import annotations

import pandas as pd

from promptopt_dagster.core.sharded_evaluation import EVALUATIONS_DIR, EvaluationSummary
from promptopt_dagster.storage import join, list_files, read_text


def load_summaries(root: str) -> list[EvaluationSummary]:
    """Every evaluation summary under the store root."""
    files = list_files(join(root, EVALUATIONS_DIR), "*/*/summary.json")
    return [EvaluationSummary.model_validate_json(read_text(f)) for f in files]


COMPARISON_COLUMNS = ["prompt_version", "dataset", "metric", "value", "status", "rows", "target"]
NOT_APPLICABLE = "n/a"


def comparison_frame(summaries: list[EvaluationSummary]) -> pd.DataFrame:
    """Long format: one row per prompt version x dataset x metric; a pair that is not applicable
    has one row, on its target metric, with no value and the missing columns in `status`."""
    rows = []
    for s in summaries:
        scores: dict[str, float | None] = (
            dict(sorted(s.scores.items())) if s.applicable else {s.target_metric: None}
        )
        rows.extend(
            {
                "prompt_version": s.prompt_version,
                "dataset": s.dataset,
                "metric": metric,
                "value": None if value is None else round(float(value), 6),
                "status": s.status(),
                "rows": s.rows,
                "target": metric == s.target_metric,
            }
            for metric, value in scores.items()
        )
    frame = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return frame.sort_values(["dataset", "metric", "prompt_version"], ignore_index=True)


def comparison_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Prompt versions as rows, (dataset, metric) as columns: the table to read at a glance.
    Scores to 3 decimals; "n/a" where the prompt version is not applicable to the dataset."""
    if frame.empty:
        return pd.DataFrame()
    shown = frame.assign(
        cell=[NOT_APPLICABLE if pd.isna(v) else f"{v:.3f}" for v in frame["value"]],
        column=[f"{d} / {m}" for d, m in zip(frame["dataset"], frame["metric"], strict=True)],
    )
    pivot = shown.pivot(index="prompt_version", columns="column", values="cell")
    for version, dataset in frame.loc[frame["value"].isna(), ["prompt_version", "dataset"]].itertuples(
        index=False
    ):
        same = [c for c in pivot.columns if c.startswith(f"{dataset} / ")]
        pivot.loc[version, same] = NOT_APPLICABLE
    pivot = pivot.fillna("")
    pivot.columns.name = None
    return pivot.reset_index()
