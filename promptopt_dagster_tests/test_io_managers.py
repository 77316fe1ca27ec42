"""PromptoptIOManager on a toy study x iteration graph, on a local folder and on the GCS emulator."""

import json
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from dagster import AssetExecutionContext
from pydantic import BaseModel

from promptopt_dagster import storage
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, gcs_emulator  # noqa: F401

STUDY = dg.DynamicPartitionsDefinition(name="study")
ITERATION = dg.DynamicPartitionsDefinition(name="iteration")
PARTS = dg.MultiPartitionsDefinition({"study": STUDY, "iteration": ITERATION})
KEY = dg.MultiPartitionKey({"study": "arith", "iteration": "0003"})

SEEN: dict[str, Any] = {}  # what downstream assets received from the IO manager


class Candidate(BaseModel):
    text: str
    score: float
    created_at: datetime


@dg.asset(partitions_def=PARTS)
def predictions(context: AssetExecutionContext) -> pd.DataFrame:
    key = context.partition_key
    assert isinstance(key, dg.MultiPartitionKey)
    return pd.DataFrame(
        {
            "row": [1, 2, 3],
            "score": [0.5, 1.0, 0.25],
            "answer": ["a", "b", "c"],
            "label": pd.Categorical(["x", "y", "x"]),
            "ok": [True, False, True],
            "tokens": pd.array([10, None, 12], dtype="Int64"),
            "at": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
            "study": key.keys_by_dimension["study"],
        }
    )


@dg.asset(partitions_def=PARTS)
def scores(predictions: pd.DataFrame) -> dict[str, Any]:
    SEEN["predictions"] = predictions
    return {"n": len(predictions), "mean": float(predictions["score"].mean()), "tags": ["x", "y"]}


@dg.asset(partitions_def=PARTS)
def best(scores: dict[str, Any]) -> Candidate:
    SEEN["scores"] = scores
    return Candidate(
        text="answer with a number", score=scores["mean"], created_at=datetime(2026, 1, 1, tzinfo=UTC)
    )


@dg.asset(partitions_def=PARTS)
def pool(best: Candidate) -> list[Candidate]:
    SEEN["best"] = best
    return [best, best.model_copy(update={"text": "shorter"})]


@dg.asset(partitions_def=PARTS)
def pool_size(pool: list[Candidate]) -> int:
    SEEN["pool"] = pool
    return len(pool)


@dg.asset
def catalog() -> dict[str, list[str]]:
    return {"studies": ["arith"]}


@dg.asset
def catalog_reader(catalog) -> int:  # noqa: ANN001 - unannotated on purpose: plain JSON comes back
    SEEN["catalog"] = catalog
    return len(catalog["studies"])


GRAPH = [predictions, scores, best, pool, pool_size]


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENV_RETRY_ATTEMPTS, "3")
    monkeypatch.setenv(storage.ENV_RETRY_INITIAL_WAIT, "0.05")
    monkeypatch.setenv(storage.ENV_RETRY_MAX_WAIT, "0.2")
    SEEN.clear()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        inst.add_dynamic_partitions("study", ["arith", "sentiment"])
        inst.add_dynamic_partitions("iteration", ["0003", "0004"])
        yield inst


def _materialize(
    assets: list[Any],
    base_uri: str,
    instance: dg.DagsterInstance,
    partition_key: str | None = KEY,
    **kwargs: Any,
) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        assets,
        resources={"io_manager": PromptoptIOManager(base_uri=base_uri)},
        instance=instance,
        partition_key=partition_key,
        **kwargs,
    )


def _check_round_trip(base: str, instance: dg.DagsterInstance) -> None:
    result = _materialize(GRAPH, base, instance)
    assert result.success

    stem = f"{base}/{{}}/study=arith/iteration=0003"
    expected = {name: stem.format(name) for name in ("predictions", "scores", "best", "pool", "pool_size")}
    assert storage.exists(expected["predictions"] + ".parquet")
    for name in ("scores", "best", "pool", "pool_size"):
        assert storage.exists(expected[name] + ".json"), name
    assert result.asset_materializations_for_node("predictions")[0].metadata["format"].value == "parquet"

    frame = SEEN["predictions"]
    original = predictions(dg.build_asset_context(partition_key=KEY))
    pd.testing.assert_frame_equal(frame, original)
    assert str(frame["label"].dtype) == "category" and str(frame["tokens"].dtype) == "Int64"

    assert SEEN["scores"] == {"n": 3, "mean": pytest.approx(1.75 / 3), "tags": ["x", "y"]}
    assert isinstance(SEEN["best"], Candidate) and SEEN["best"].created_at.tzinfo is not None
    assert [type(c) for c in SEEN["pool"]] == [Candidate, Candidate]
    assert SEEN["pool"][1].text == "shorter"

    # People (and other tools) can read the JSON directly.
    best_json = json.loads(storage.read_text(expected["best"] + ".json"))
    assert best_json["text"] == "answer with a number" and best_json["created_at"].startswith("2026-01-01")

    # Unpartitioned assets are named after the asset; an unannotated input gets plain JSON.
    assert _materialize([catalog, catalog_reader], base, instance, partition_key=None).success
    assert storage.exists(f"{base}/catalog.json")
    assert SEEN["catalog"] == {"studies": ["arith"]}


def test_round_trip_on_local_folder(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    _check_round_trip(str(tmp_path), instance)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert "predictions/study=arith/iteration=0003.parquet" in files
    assert "best/study=arith/iteration=0003.json" in files
    assert not [f for f in files if f.endswith(".tmp")]


@pytest.mark.e2e
def test_round_trip_on_gcs_emulator(gcs_emulator: GcsEmulator, instance: dg.DagsterInstance) -> None:  # noqa: F811
    base = gcs_emulator.uri("io", uuid.uuid4().hex[:8])
    _check_round_trip(base, instance)
    listed = storage.list_files(f"{base}/best", "**/*.json")
    assert listed == [f"{base}/best/study=arith/iteration=0003.json"]


def test_partitions_do_not_overwrite_each_other(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    other = dg.MultiPartitionKey({"study": "sentiment", "iteration": "0004"})
    assert _materialize([predictions, scores], str(tmp_path), instance).success
    assert _materialize([predictions, scores], str(tmp_path), instance, partition_key=other).success
    a = json.loads((tmp_path / "scores/study=arith/iteration=0003.json").read_text())
    b = pd.read_parquet(tmp_path / "predictions/study=sentiment/iteration=0004.parquet")
    assert a["n"] == 3 and set(b["study"]) == {"sentiment"}


def test_missing_upstream_names_asset_and_partition(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    with pytest.raises(Exception) as excinfo:
        _materialize([predictions, scores], str(tmp_path), instance, selection=[scores])
    chain, exc = [], excinfo.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__
    text = "\n".join(chain)
    assert "asset predictions has no materialization for partition study=arith/iteration=0003" in text
    assert "materialize that partition first" in text


def test_unsupported_value_is_refused_not_pickled(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    @dg.asset
    def opaque() -> object:
        return object()

    result = _materialize([opaque], str(tmp_path), instance, partition_key=None, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("opaque")
    assert failure is not None and "never pickles" in str(failure.error)
    assert not list(tmp_path.rglob("opaque*"))


def test_failed_write_leaves_no_file(
    tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename that publishes the file fails: neither the target nor the temp file remains."""

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", broken_replace)
    result = _materialize([catalog], str(tmp_path), instance, partition_key=None, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("catalog")
    assert failure is not None and "No space left on device" in str(failure.error)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert os.path.isdir(tmp_path)
