"""Partitions.

Every iteration asset is partitioned by one dynamic dimension, `study_iteration`, whose keys are
``<study>:<iteration>`` (``arith:0003``): a key is added when its iteration is about to run, so
the UI lists exactly the iterations that ran or are running, study by study, and "materialize
missing" has nothing to run for a finished study. Iteration numbers are zero-padded so keys sort
in iteration order. Study names are ``[a-z0-9][a-z0-9_-]{0,62}``, so the ``:`` separator cannot
occur in one; Dagster forbids only ``...`` and control characters in dynamic partition keys.
The study-level assets (study_report) are partitioned by `study_partitions`.

Up to version 0.1.x the iteration assets were partitioned by a multi-partition of two dynamic
dimensions, study x iteration, whose key strings read ``0003|arith`` (Dagster joins dimension
values in the order of the dimension names). `parse_key` still reads those keys, so the
materializations of a study run then are found and the study resumes under the new keys.
"""

from __future__ import annotations

import re

import dagster as dg

from promptopt_dagster.core.prompt_store import iteration_key

STUDY_ITERATION = "study_iteration"  # the dynamic partitions definition's name
SEPARATOR = ":"
# The old multi-partition key string: "<iteration>|<study>".
_OLD_KEY = re.compile(r"^(?P<iteration>\d+)\|(?P<study>[a-z0-9][a-z0-9_-]{0,62})$")

study_partitions = dg.DynamicPartitionsDefinition(name="study")
study_iteration_partitions = dg.DynamicPartitionsDefinition(name=STUDY_ITERATION)


def study_iteration_key(study: str, iteration: int) -> str:
    """The partition key of one iteration of one study, e.g. ``arith:0003``."""
    return f"{study}{SEPARATOR}{iteration_key(iteration)}"


def parse_key(key: str | dg.MultiPartitionKey) -> tuple[str, int]:
    """(study, iteration) of a study-iteration partition key; also reads the key strings of the
    old study x iteration multi-partition (``0003|arith``)."""
    if isinstance(key, dg.MultiPartitionKey):
        dims = key.keys_by_dimension
        return dims["study"], int(dims["iteration"])
    old = _OLD_KEY.match(key)
    if old:
        return old["study"], int(old["iteration"])
    study, sep, iteration = key.rpartition(SEPARATOR)
    if not sep or not study or not iteration.isdigit():
        raise ValueError(
            f"{key!r} is not a study iteration partition key (<study>:<iteration>, e.g. arith:0003)"
        )
    return study, int(iteration)


def study_iteration_keys(instance: dg.DagsterInstance, study: str) -> list[str]:
    """The study-iteration partition keys of `study` registered in the instance."""
    return [key for key in instance.get_dynamic_partitions(STUDY_ITERATION) if parse_key(key)[0] == study]


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
