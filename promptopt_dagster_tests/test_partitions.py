"""Study-iteration partition keys: built and parsed in one place, stored where the study x
iteration multi-partition of earlier versions stored its files."""

from __future__ import annotations

import dagster as dg
import pytest

from promptopt_dagster.io_managers import _partition_parts
from promptopt_dagster.partitions import (
    STUDY_ITERATION,
    parse_key,
    study_iteration_key,
    study_iteration_keys,
    study_iteration_partitions,
)

OLD = dg.MultiPartitionsDefinition(
    {
        "study": dg.DynamicPartitionsDefinition(name="study"),
        "iteration": dg.DynamicPartitionsDefinition(name="iteration"),
    }
)


def test_a_key_names_its_study_and_iteration() -> None:
    key = study_iteration_key("arith-2_b", 3)
    assert key == "arith-2_b:0003"
    assert parse_key(key) == ("arith-2_b", 3)
    assert parse_key(study_iteration_key("x", 12345)) == ("x", 12345)


def test_keys_of_the_old_study_x_iteration_partitions_still_parse() -> None:
    old = dg.MultiPartitionKey({"study": "arith", "iteration": "0003"})
    assert str(old) == "0003|arith"
    assert parse_key(old) == ("arith", 3)
    assert parse_key(str(old)) == ("arith", 3)


@pytest.mark.parametrize("key", ["arith", "arith:", ":0003", "arith:three", "scripted:scripted-seed"])
def test_other_keys_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="not a study iteration partition key"):
        parse_key(key)


def test_files_stay_where_the_old_partitions_put_them() -> None:
    new = _partition_parts(study_iteration_key("arith", 3), study_iteration_partitions)
    old = _partition_parts(dg.MultiPartitionKey({"study": "arith", "iteration": "0003"}), OLD)
    assert new == old == ["study=arith", "iteration=0003"]


def test_a_studys_keys_are_told_apart_from_other_studies() -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(
            STUDY_ITERATION, ["a:0000", "a:0001", "ab:0000", "b-a:0000", "a_b:0000"]
        )
        assert study_iteration_keys(instance, "a") == ["a:0000", "a:0001"]
        assert study_iteration_keys(instance, "ab") == ["ab:0000"]
