"""Write the optimizer benchmark suite: one dataset, one study YAML and one precise prompt per task.

    .venv/bin/python benchmarks/suite/make_suite.py

Deterministic (fixed seeds, no clock): running it again rewrites the same files. The tasks are
the table in tasks.yaml (names, columns, prompts, metrics); their rows are made by rows_labels.py and
rows_values.py. Every task has

- a dataset (CSV or JSONL) with an `id` column, generated from templates and fixed tables;
- a study YAML in the format of promptopt_dagster/examples/*.yaml, whose seed prompt is VAGUE
  (what a user would type first; one of them actively misleads);
- a PRECISE prompt in precise_prompts.yaml: what an expert would write in a few lines, with no
  demonstrations. It is the hand-written reference the optimizers are measured against.

Output prompts follow the product's brace rule: {column} is filled from the row, literal braces
are doubled ({{ and }}), as in Python's str.format.

The study's split `seed` is the first seed whose hash split (the product's own `split_dataset`)
gives every split a fair share of rows; it is chosen on split sizes only, never on scores.
The stop rules let the LLM-call budget bind (`target_threshold: 1.0`, many iterations); the
benchmark sets `budget_calls` itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from rows_common import Row
from rows_labels import intent_code_list, intent_rows, ticket_rows
from rows_values import (
    animal_rows,
    capital_rows,
    date_rows,
    email_rows,
    larger_rows,
    order_rows,
    past_rows,
    person_rows,
    qa_rows,
    unit_rows,
)

HERE = Path(__file__).resolve().parent


@dataclass
class Task:
    name: str
    kind: str
    description: str
    rows: Callable[[], list[Row]]
    input_columns: list[str]
    reference_column: str
    seed_prompt: tuple[str, str]  # (system_prompt, output_prompt)
    precise_prompt: tuple[str, str]
    fmt: str = "csv"
    target_metric: str = "exact_match"
    metrics: list[str] = field(default_factory=lambda: ["f1"])
    metric_options: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"exact_match": {"ignore_whitespace": True, "strip_quotes": True}}
    )
    max_tokens: int = 32
    comment: str = ""



# --- the tasks ----------------------------------------------------------------------------------

TASKS_FILE = HERE / "tasks.yaml"
INTENT_CODES = "{intent_codes}"  # in a prompt of tasks.yaml: stands for intent_code_list()
ROW_FUNCTIONS: dict[str, Callable[[], list[Row]]] = {
    f.__name__: f
    for f in (ticket_rows, intent_rows, order_rows, larger_rows, date_rows, unit_rows, capital_rows,
              person_rows, qa_rows, animal_rows, past_rows, email_rows)
}


def _prompt(entry: dict[str, str]) -> tuple[str, str]:
    """(system_prompt, output_prompt) of a prompt in tasks.yaml, with the intent codes filled in."""
    codes = intent_code_list()
    return (entry["system_prompt"].replace(INTENT_CODES, codes),
            entry["output_prompt"].replace(INTENT_CODES, codes))


def load_tasks(path: Path = TASKS_FILE) -> list[Task]:
    """The tasks of the table in `path`; its `rows` names a function of ROW_FUNCTIONS."""
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Task(**{
            **entry,
            "rows": ROW_FUNCTIONS[entry["rows"]],
            "seed_prompt": _prompt(entry["seed_prompt"]),
            "precise_prompt": _prompt(entry["precise_prompt"]),
        })
        for entry in entries
    ]


SPLITS = {"train": 0.4, "val": 0.3, "test": 0.3}


def balanced_seed(rows: list[Row], input_columns: list[str], reference_column: str, path: Path) -> int:
    """The first split seed whose hash split gives each split at least 85% of its share of rows.
    Chosen on sizes alone (no model runs), with the product's own split function."""
    from promptopt_dagster.core.dataset import load_dataset, split_dataset

    df = load_dataset(str(path), input_columns, reference_column, "id")
    n = len(df)
    for seed in range(200):
        splits = split_dataset(df, SPLITS["train"], SPLITS["val"], seed)
        if all(len(splits[name]) >= 0.85 * share * n for name, share in SPLITS.items()):
            return seed
    return 0


def study_yaml(task: Task, split_seed: int, dataset: str, n_rows: int) -> str:
    study = {
        "name": task.name,
        "description": task.description,
        "dataset": dataset,
        "input_columns": task.input_columns,
        "reference_column": task.reference_column,
        "id_column": "id",
        "seed_prompt": {"system_prompt": task.seed_prompt[0], "output_prompt": task.seed_prompt[1]},
        "primary_model": {"temperature": 0.0, "max_tokens": task.max_tokens},
        "optimizer_model": {"temperature": 0.7, "max_tokens": 384},
        "target_metric": task.target_metric,
        "metrics": task.metrics,
        "metric_options": task.metric_options,
        "target_threshold": 1.0,
        "patience": 3,
        "max_iterations": 40,
        "candidates_per_iteration": 4,
        "minibatch_size": 10,
        "splits": SPLITS,
        "seed": split_seed,
    }
    header = (f"# Optimizer benchmark suite, task {task.name} ({task.kind}, {n_rows} rows).\n"
              f"# Written by benchmarks/suite/make_suite.py; edit that script, not this file.\n")
    return header + yaml.safe_dump(study, sort_keys=False, allow_unicode=True, width=100)


def write_all(folder: Path = HERE) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    precise: dict[str, dict[str, str]] = {}
    out: dict[str, Path] = {}
    for task in load_tasks():
        rows = task.rows()
        data = folder / f"{task.name}.{task.fmt}"
        if task.fmt == "csv":
            pd.DataFrame(rows).to_csv(data, index=False, lineterminator="\n")
        else:
            with data.open("w", encoding="utf-8", newline="\n") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        seed = balanced_seed(rows, task.input_columns, task.reference_column, data)
        study = folder / f"{task.name}.yaml"
        study.write_text(study_yaml(task, seed, data.name, len(rows)), encoding="utf-8")
        precise[task.name] = {"kind": task.kind, "system_prompt": task.precise_prompt[0],
                              "output_prompt": task.precise_prompt[1]}
        out[task.name] = study
    header = ("# Hand-written precise prompts, one per task: the reference the optimizers are measured\n"
              "# against. Written by benchmarks/suite/make_suite.py.\n")
    (folder / "precise_prompts.yaml").write_text(
        header + yaml.safe_dump(precise, sort_keys=False, allow_unicode=True, width=100), encoding="utf-8"
    )
    return out


if __name__ == "__main__":
    for name, path in write_all().items():
        print(f"{name}: {path}")
