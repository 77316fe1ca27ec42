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
