"""Running a prompt on rows with an LLM: one prediction per row, and what the calls cost."""

from __future__ import annotations

import pandas as pd

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.study import ModelConfig, StudyConfig
from promptopt_dagster.errors import DatasetError
from promptopt_dagster.llm.base import ChatRequest, GenerationParams, LLMClient, Usage

PREDICTION_COLUMNS = (
    "row_id",
    "split",
    "prediction",
    "reply",
    "error",
    "cached",
    "prompt_tokens",
    "completion_tokens",
    "seconds",
    "cost_usd",
)


def check_prompt_columns(prompt: PromptState, study: StudyConfig, columns: list[str]) -> None:
    missing = prompt.missing_columns(columns)
    if missing:
        raise DatasetError(
            f"prompt {prompt.id} uses {missing} but the dataset of study {study.name!r} has no such "
            f"column; available columns: {sorted(columns)}"
        )


def run_prompt(
    llm: LLMClient, prompt: PromptState, rows: pd.DataFrame, model: ModelConfig, study: StudyConfig
) -> pd.DataFrame:
    """One prediction per row; failed rows keep an `error` instead of raising."""
    check_prompt_columns(prompt, study, list(rows.columns))
    params = GenerationParams(temperature=model.temperature, max_tokens=model.max_tokens, seed=study.seed)
    records = rows.to_dict(orient="records")
    requests = [ChatRequest(messages=tuple(prompt.render(r)), params=params) for r in records]
    responses = llm.generate(requests)
    out = pd.DataFrame(
        {
            "row_id": rows["row_id"].astype(str).to_numpy(),
            "split": rows["split"].to_numpy(),
            "prediction": [prompt.parse(r.text) for r in responses],
            "reply": [r.text for r in responses],
            "error": [r.error for r in responses],
            "cached": [r.cached for r in responses],
            "prompt_tokens": [r.prompt_tokens for r in responses],
            "completion_tokens": [r.completion_tokens for r in responses],
            "seconds": [r.seconds for r in responses],
            "cost_usd": [r.cost_usd for r in responses],
        }
    )
    out["reference"] = rows[study.reference_column].astype(str).to_numpy()
    for col in study.input_columns:
        out[col] = rows[col].to_numpy()
    return out


def usage_of(predictions: pd.DataFrame) -> Usage:
    live = predictions[~predictions["cached"].astype(bool)]
    return Usage(
        calls=len(live),
        cached_calls=int(predictions["cached"].astype(bool).sum()),
        failed_calls=int(live["error"].notna().sum()),
        prompt_tokens=int(live["prompt_tokens"].sum()),
        completion_tokens=int(live["completion_tokens"].sum()),
        seconds=float(live["seconds"].sum()),
        cost_usd=float(live["cost_usd"].sum()) if "cost_usd" in live else 0.0,
    )
