"""PromptoptIOManager: assets as readable files in a local folder or under gs://bucket/prefix.

Layout: ``<base_uri>/<asset key path>/<partition path>.<ext>``, e.g.
``gs://bucket/runs/predictions/study=arith/iteration=0003.parquet``; an unpartitioned asset is
``<base_uri>/<asset key path>.<ext>``. Multi-partition dimensions appear as ``name=value``,
those in `dimension_order` (default study, iteration) first. A study-iteration key
(``arith:0003``, partitions.py) is split into its study and iteration the same way, so its
files sit where the study x iteration multi-partition of earlier versions put them. DataFrames
are Parquet, everything else JSON (pydantic models through ``model_dump(mode="json")``, rebuilt
on load when the input or upstream output is annotated with a model class, or a list/dict of
them). Nothing is pickled.

Why not dagster's `UPathIOManager`: it names a multi-partition ``arith/0003`` (values without
dimension names), and its file extension is fixed per class, while this manager picks the
format by the object's type. Why not dagster-gcp's `GCSPickleIOManager`/`GCSResource`: the former
pickles, and the latter hands out a google-cloud-storage client, whereas reads and writes here go
through `promptopt_dagster.storage` (gcsfs), which takes its credentials from the
environment (application-default credentials) and owns retries and error messages.
"""

from __future__ import annotations

import io
import json
import typing
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pandas as pd
import pydantic
import pydantic_core
from dagster import (
    ConfigurableIOManager,
    DagsterInvariantViolationError,
    DynamicPartitionsDefinition,
    InputContext,
    MetadataValue,
    MultiPartitionKey,
    MultiPartitionsDefinition,
    OutputContext,
)
from pydantic import Field, field_validator

from promptopt_dagster import storage
from promptopt_dagster.core.prompt_store import iteration_key
from promptopt_dagster.errors import StorageError
from promptopt_dagster.partitions import STUDY_ITERATION, parse_key

PARQUET = "parquet"
JSON = "json"
# Outer folders first: one study's iterations sit together.
DEFAULT_DIMENSION_ORDER = ("study", "iteration")


def _segment(text: str) -> str:
    """One path segment: readable for ordinary keys, escaped for '/', '..' and the like."""
    escaped = quote(text, safe="-_.~=+,@ ")
    return escaped.replace(".", "%2E") if escaped in (".", "..") else escaped


def _partition_parts(
    key: str | MultiPartitionKey, partitions_def: Any, first: Sequence[str] = DEFAULT_DIMENSION_ORDER
) -> list[str]:
    """``study=arith/iteration=0003`` for a multi-partition key and for a study-iteration key,
    the key itself otherwise.

    Dagster sorts dimensions by name (so declaration order is lost); dimensions listed in `first`
    come first, in that order, the others follow sorted by name."""
    dims: dict[str, str] | None = None
    if isinstance(partitions_def, DynamicPartitionsDefinition) and partitions_def.name == STUDY_ITERATION:
        study, iteration = parse_key(str(key))
        dims = {"study": study, "iteration": iteration_key(iteration)}
    elif not isinstance(key, MultiPartitionKey) and isinstance(partitions_def, MultiPartitionsDefinition):
        key = partitions_def.get_partition_key_from_str(str(key))
    if isinstance(key, MultiPartitionKey):
        dims = dict(key.keys_by_dimension)
    if dims is not None:
        order = [d for d in first if d in dims] + sorted(d for d in dims if d not in first)
        return [f"{_segment(dim)}={_segment(dims[dim])}" for dim in order]
    return [_segment(str(key))]


def _involves_model(tp: Any) -> bool:
    if isinstance(tp, type) and issubclass(tp, pydantic.BaseModel):
        return True
    return any(_involves_model(arg) for arg in typing.get_args(tp))


def _is_dataframe_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, pd.DataFrame)


def _json_fallback(value: Any) -> Any:
    """numpy scalars and arrays (metric results) become plain JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise pydantic_core.PydanticSerializationError(f"{type(value).__name__} is not JSON-serializable")


def _typing_type(context: InputContext | OutputContext) -> Any:
    """The annotated Python type, or Any where Dagster has none (e.g. `load_asset_value`)."""
    try:
        dagster_type = context.dagster_type
    except DagsterInvariantViolationError:
        return Any
    return getattr(dagster_type, "typing_type", Any)


class PromptoptIOManager(ConfigurableIOManager):
    """Stores asset values as Parquet (DataFrames) or JSON (everything else) under `base_uri`."""

    base_uri: str = Field(
        description="Local folder or gs://bucket/prefix under which asset files are written.",
    )

    dimension_order: list[str] = Field(
        default=list(DEFAULT_DIMENSION_ORDER),
        description="Multi-partition dimensions that come first in paths, outermost first; "
        "other dimensions follow sorted by name.",
    )

    @field_validator("base_uri")
    @classmethod
    def _check_base_uri(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("base_uri is empty: give a local folder or gs://bucket/prefix")
        return value.rstrip("/") if value not in ("/",) else value

    # --- paths ---------------------------------------------------------------------------------

    def _stem(self, context: InputContext | OutputContext, partition_key: str | None) -> str:
        if context.has_asset_key:
            parts = [_segment(p) for p in context.asset_key.path]
        else:  # a plain op output
            parts = [_segment(p) for p in context.get_identifier()]
        if partition_key is not None:
            parts += _partition_parts(partition_key, context.asset_partitions_def, self.dimension_order)
        return storage.join(self.base_uri, *parts)

    def path_for(self, context: InputContext | OutputContext, partition_key: str | None, ext: str) -> str:
        return f"{self._stem(context, partition_key)}.{ext}"

    # --- output --------------------------------------------------------------------------------

    def handle_output(self, context: OutputContext, obj: Any) -> None:
        partition_key = context.asset_partition_key if context.has_asset_partitions else None
        if isinstance(obj, pd.DataFrame):
            ext, data = PARQUET, self._to_parquet(obj)
            metadata: dict[str, Any] = {"rows": len(obj), "columns": len(obj.columns)}
        else:
            ext, data = JSON, self._to_json(context, obj)
            metadata = {}
        uri = self.path_for(context, partition_key, ext)
        storage.write_bytes(uri, data)
        context.add_output_metadata(
            {"path": MetadataValue.path(storage.redact(uri)), "format": ext, "bytes": len(data), **metadata}
        )

    @staticmethod
    def _to_parquet(frame: pd.DataFrame) -> bytes:
        buffer = io.BytesIO()
        frame.to_parquet(buffer, engine="pyarrow")
        return buffer.getvalue()

    @staticmethod
    def _to_json(context: OutputContext, obj: Any) -> bytes:
        try:
            plain = pydantic_core.to_jsonable_python(obj, fallback=_json_fallback)
        except (pydantic_core.PydanticSerializationError, TypeError, ValueError) as exc:
            what = context.asset_key.to_user_string() if context.has_asset_key else context.name
            raise TypeError(
                f"{what} returned a {type(obj).__name__}, which PromptoptIOManager cannot store: it writes "
                "pandas DataFrames as Parquet and JSON-compatible values (dict, list, str, numbers, "
                f"pydantic models) as JSON, never pickles. Convert the value before returning it. ({exc})"
            ) from exc
        return json.dumps(plain, ensure_ascii=False, indent=2).encode("utf-8")

    # --- input ---------------------------------------------------------------------------------

    def load_input(self, context: InputContext) -> Any:
        target = _typing_type(context)
        if context.upstream_output is not None:
            upstream = _typing_type(context.upstream_output)
            # a fan-in input (`list[X]` from a collected dynamic output) loads one X at a time
            fan_in = typing.get_origin(target) is list and typing.get_args(target) == (upstream,)
            if target in (Any, object, None) or fan_in:
                target = upstream
        if not context.has_asset_partitions:
            return self._load_one(context, None, target)
        keys = context.asset_partition_keys
        if len(keys) == 1:
            return self._load_one(context, keys[0], target)
        # Several upstream partitions (a partition mapping fanning in): a dict keyed by partition.
        value_type = typing.get_args(target)[1] if typing.get_origin(target) is dict else Any
        return {str(key): self._load_one(context, key, value_type) for key in keys}

    def _load_one(self, context: InputContext, partition_key: str | None, target: Any) -> Any:
        formats = [PARQUET, JSON] if _is_dataframe_type(target) else [JSON, PARQUET]
        for ext in formats:
            uri = self.path_for(context, partition_key, ext)
            try:
                data = storage.read_bytes(uri)
            except storage.MissingObjectError:
                continue
            return self._decode(ext, data, target, uri)
        raise StorageError(self._missing_message(context, partition_key, formats))

    @staticmethod
    def _decode(ext: str, data: bytes, target: Any, uri: str) -> Any:
        if ext == PARQUET:
            return pd.read_parquet(io.BytesIO(data), engine="pyarrow")
        plain = json.loads(data)
        if target not in (Any, object, None) and _involves_model(target):
            try:
                return pydantic.TypeAdapter(target).validate_python(plain)
            except pydantic.ValidationError as exc:
                raise StorageError(
                    f"{storage.redact(uri)} does not match the type {target!r} the asset expects; it was "
                    f"probably written by an older version of the asset: materialize it again. ({exc})"
                ) from exc
        return plain

    def _missing_message(self, context: InputContext, partition_key: str | None, formats: list[str]) -> str:
        asset = context.asset_key.to_user_string() if context.has_asset_key else context.name
        stem = storage.redact(self._stem(context, partition_key))
        tried = " or ".join(f"{stem}.{ext}" for ext in formats)
        if partition_key is None:
            return (
                f"asset {asset} has not been materialized yet (nothing at {tried}); "
                f"materialize it first, e.g. `dagster asset materialize --select {asset}`"
            )
        shown = "/".join(_partition_parts(partition_key, context.asset_partitions_def, self.dimension_order))
        return (
            f"asset {asset} has no materialization for partition {shown} (nothing at {tried}); "
            f"materialize that partition first, e.g. `dagster asset materialize --select {asset} "
            f"--partition '{partition_key}'`"
        )
