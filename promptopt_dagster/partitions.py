"""Partitions: every iteration asset is keyed by (study, iteration), both dynamic, so several
studies coexist; iteration keys are zero-padded (`0003`) so they sort."""

from __future__ import annotations

import dagster as dg

from promptopt_dagster.core.prompt_store import iteration_key

study_partitions = dg.DynamicPartitionsDefinition(name="study")
iteration_partitions = dg.DynamicPartitionsDefinition(name="iteration")
study_iteration_partitions = dg.MultiPartitionsDefinition(
    {"study": study_partitions, "iteration": iteration_partitions}
)


def study_iteration_key(study: str, iteration: int) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"study": study, "iteration": iteration_key(iteration)})


def parse_key(key: str | dg.MultiPartitionKey) -> tuple[str, int]:
    """(study, iteration) of a study x iteration partition key."""
    if not isinstance(key, dg.MultiPartitionKey):
        key = study_iteration_partitions.get_partition_key_from_str(key)
    dims = key.keys_by_dimension
    return dims["study"], int(dims["iteration"])


# Evaluations over other datasets (assets/backfill.py): prompt version x dataset, both dynamic.
# A prompt version key is "<study>:<prompt id>" (the seed and every accepted prompt of a study);
# a dataset key is a file name in the datasets location (settings.datasets_uri).
prompt_version_partitions = dg.DynamicPartitionsDefinition(name="prompt_version")
dataset_partitions = dg.DynamicPartitionsDefinition(name="dataset")
evaluation_partitions = dg.MultiPartitionsDefinition(
    {"prompt_version": prompt_version_partitions, "dataset": dataset_partitions}
)


def evaluation_key(prompt_version: str, dataset: str) -> dg.MultiPartitionKey:
    return dg.MultiPartitionKey({"prompt_version": prompt_version, "dataset": dataset})


def parse_evaluation_key(key: str | dg.MultiPartitionKey) -> tuple[str, str]:
    """(prompt version, dataset) of a prompt version x dataset partition key."""
    if not isinstance(key, dg.MultiPartitionKey):
        key = evaluation_partitions.get_partition_key_from_str(key)
    dims = key.keys_by_dimension
    return dims["prompt_version"], dims["dataset"]
