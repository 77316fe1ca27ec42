"""A study's rows, loaded, checked and split: what every step of an iteration measures on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from promptopt_dagster.core.budget import min_iteration_calls
from promptopt_dagster.core.dataset import load_dataset, minibatch, split_dataset
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.errors import DatasetError, StudyConfigError
from promptopt_dagster.redaction import redact

# The smallest study that can measure anything: fewer rows, or a split with fewer rows, is
# refused; validation or test splits smaller than WARN_SPLIT_ROWS give warnings.
MIN_ROWS = 10
MIN_SPLIT_ROWS = 2
WARN_SPLIT_ROWS = 10
SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}


@dataclass
class StudyData:
    """A study's rows, split. `warnings` are plain sentences about data too small to measure
    well (e.g. a validation split under 10 rows), for the CLI and asset metadata to show."""

    study: StudyConfig
    splits: dict[str, pd.DataFrame]
    warnings: list[str] = field(default_factory=list)

    def iteration_rows(self, iteration: int) -> pd.DataFrame:
        """The rows an incumbent is measured on: this iteration's train minibatch, and val."""
        mb = minibatch(self.splits["train"], self.study.minibatch_size, self.study.seed, iteration)
        return pd.concat(
            [mb.assign(split="train"), self.splits["val"].assign(split="val")], ignore_index=True
        )

    def rows(self, split: str) -> pd.DataFrame:
        return self.splits[split].assign(split=split)


def load_study_data(study: StudyConfig) -> StudyData:
    """Load, check and split the study's dataset. Raises DatasetError when the data cannot measure
    anything: fewer than MIN_ROWS rows, or a split with fewer than MIN_SPLIT_ROWS rows. Smaller
    than WARN_SPLIT_ROWS validation or test splits are allowed, with a warning each."""
    df = load_dataset(study.dataset, study.input_columns, study.reference_column, study.id_column)
    shown = redact(study.dataset)
    fractions = study.splits
    if len(df) < MIN_ROWS:
        raise DatasetError(
            f"dataset {shown} has {len(df)} rows; a study needs at least {MIN_ROWS} (with at least "
            f"{MIN_SPLIT_ROWS} rows in each of train, val and test) to measure anything, and 30 or "
            "more to measure it well. Add rows to the dataset."
        )
    splits = split_dataset(df, fractions.train, fractions.val, study.seed, study.reference_column)
    sizes = {name: len(part) for name, part in splits.items()}
    shown_sizes = ", ".join(f"{name} {size}" for name, size in sizes.items())
    small = [name for name, size in sizes.items() if size < MIN_SPLIT_ROWS]
    if small:
        raise DatasetError(
            f"dataset {shown} has {len(df)} rows, split {shown_sizes} by `splits: {{train: "
            f"{fractions.train:g}, val: {fractions.val:g}, test: {fractions.test:g}}}`; train, val and "
            f"test need at least {MIN_SPLIT_ROWS} rows each to measure anything ({' and '.join(small)} "
            f"{'has' if len(small) == 1 else 'have'} fewer). Add rows to the dataset, or raise "
            + " and ".join(f"splits.{name}" for name in small)
            + " in the study."
        )
    if study.budget_calls is not None:
        needed = min_iteration_calls(min(study.minibatch_size, sizes["train"]), sizes["val"])
        if study.budget_calls < needed:
            raise StudyConfigError(
                f"budget_calls {study.budget_calls} cannot pay for one iteration of study "
                f"{study.name!r}: the smallest iteration may need {needed} LLM calls (the incumbent and "
                f"one candidate, each on the {min(study.minibatch_size, sizes['train'])}-row minibatch "
                f"and the {sizes['val']} validation rows). Raise budget_calls to at least {needed}, or "
                "lower minibatch_size or splits.val."
            )
    warnings = [
        f"{SPLIT_NAMES[name]} has {sizes[name]} rows (fewer than {WARN_SPLIT_ROWS}): one row moves its "
        f"score by {1 / sizes[name]:.2f}, so {'decisions' if name == 'val' else 'the test score'} "
        f"will be coarse. Add rows, or raise splits.{name} in the study."
        for name in ("val", "test")
        if sizes[name] < WARN_SPLIT_ROWS
    ]
    return StudyData(study=study, splits=splits, warnings=warnings)
