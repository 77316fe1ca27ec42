"""What the evaluations of prompt versions over other datasets pair up (no Dagster here): the
prompt versions worth comparing, the datasets in the datasets location, how a dataset file is
read, and whether a prompt version fits a dataset. `sharded_evaluation.py` runs the evaluations.

Convention for the datasets location (a local folder or a gs:// prefix, settings.datasets_uri):

- every file directly in it in a dataset format (core/dataset.py FORMATS: ``*.csv``, ``*.jsonl`` /
  ``*.ndjson`` and ``*.parquet`` / ``*.pq``) is a dataset; its file name is its partition key;
- an optional sidecar ``<file stem>.yaml`` next to it (``reviews.yaml`` for ``reviews.csv``)
  says how to read it: ``reference_column`` (default: each study's own reference column),
  ``id_column`` (default: the row number), ``columns`` (a renaming, file column -> study
  column, e.g. ``{text: review}``) and a free-text ``description``;
- a prompt version can be evaluated on a dataset when the dataset has every column its template
  uses (``{column}``) and the reference column. Other input columns of the study are optional.
  A prompt version that needs a column the dataset lacks is *not applicable* to it: its
  evaluation records that (`sharded_evaluation.record_not_applicable`) instead of a score.

A file is inspected from its header, first line or Parquet footer only, and read in record
batches by pyarrow's streaming readers: one block of it in memory at a time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from promptopt_dagster.core.dataset import CSV, FORMATS, JSONL, PARQUET, extension, format_of
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.errors import DatasetError
from promptopt_dagster.storage import as_path, exists, list_files, read_text, redact, with_retries

# Bytes pyarrow's CSV / JSON readers parse at once: with the chunk size, what bounds memory.
READ_BLOCK_BYTES = 1 << 20


class DatasetSpec(BaseModel):
    """The optional sidecar ``<stem>.yaml`` of a dataset file."""

    model_config = ConfigDict(extra="forbid")

    reference_column: str | None = Field(None, description="the expected output; default: the study's")
    id_column: str | None = Field(None, description="stable row id; default: the 1-based row number")
    columns: dict[str, str] = Field(default_factory=dict, description="rename: file column -> study column")
    description: str = ""


class DatasetInfo(BaseModel):
    """A dataset file as the sensors see it: its columns (after the sidecar's renaming)."""

    name: str
    uri: str
    columns: list[str]
    spec: DatasetSpec
    signature: str


# --- prompt versions -----------------------------------------------------------------------------


def prompt_version_key(study: str, prompt_id: str) -> str:
    """The partition key of a prompt version: ``<study>:<prompt id>``."""
    return f"{study}:{prompt_id}"


def parse_prompt_version(key: str) -> tuple[str, str]:
    """(study, prompt id) of a prompt version key."""
    study, sep, prompt_id = key.partition(":")
    if not sep or not study or not prompt_id:
        raise DatasetError(f"prompt version key {key!r} is not of the form '<study>:<prompt id>'")
    return study, prompt_id


def prompt_versions(store: PromptStore) -> list[str]:
    """The versions worth comparing elsewhere: every study's seed and every accepted prompt."""
    keys: list[str] = []
    for study in store.studies():
        keys.append(prompt_version_key(study, f"{study}-seed"))
        for record in sorted(store.records(study), key=lambda r: r.iteration):
            if record.accepted and record.accepted_id:
                keys.append(prompt_version_key(study, record.accepted_id))
    return list(dict.fromkeys(keys))


# --- the datasets location ----------------------------------------------------------------------


def list_datasets(folder: str) -> dict[str, str]:
    """Dataset files directly in `folder` (local or gs://): {file name: uri}, sorted."""
    return {as_path(f).name: f for f in list_files(folder, "*") if extension(f) in FORMATS}


def sidecar_uri(dataset_uri: str) -> str:
    path = as_path(dataset_uri)
    return str(path.parent / f"{path.stem}.yaml")


def load_spec(dataset_uri: str) -> DatasetSpec:
    """The dataset's sidecar, or the defaults when it has none."""
    uri = sidecar_uri(dataset_uri)
    if not exists(uri):
        return DatasetSpec()
    try:
        raw = yaml.safe_load(read_text(uri)) or {}
        return DatasetSpec.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        raise DatasetError(
            f"sidecar {redact(uri)} of dataset {as_path(dataset_uri).name} is invalid: {exc}. It may set "
            "reference_column, id_column, columns (file column -> study column) and description."
        ) from exc


def signature(uri: str) -> str:
    """Changes when the file changes (size and modification time, or the GCS generation)."""
    info: dict[str, Any] = with_retries("stat", uri, lambda fs, p: fs.info(p))
    stamp = info.get("generation") or info.get("mtime") or info.get("updated") or info.get("etag") or ""
    return f"{info.get('size', '')}-{stamp}"


def _open(uri: str) -> Any:
    try:
        return as_path(uri).open("rb")
    except FileNotFoundError as exc:
        raise DatasetError(f"dataset file {redact(uri)} does not exist") from exc


def file_columns(uri: str) -> list[str]:
    """The file's columns, read from its header, first line or Parquet footer only."""
    ext = extension(uri)
    fmt = format_of(uri)
    shown = redact(uri)
    if fmt is None:
        raise DatasetError(f"{shown}: unsupported extension {ext!r}; use one of {tuple(FORMATS)}")
    try:
        with _open(uri) as handle:
            if fmt is PARQUET:
                return [str(n) for n in pq.ParquetFile(handle).schema_arrow.names]
            first = handle.readline().decode("utf-8").strip()
            if not first:
                raise DatasetError(f"dataset {shown} is empty; add a header row and data rows")
            if fmt is CSV:
                header = next(csv.reader([first]))
                if handle.readline().strip() == b"":
                    raise DatasetError(f"dataset {shown} has a header but no data rows; add rows")
                return [h.strip() for h in header]
            return [str(k) for k in pajson.read_json(io.BytesIO(first.encode())).column_names]
    except DatasetError:
        raise
    except Exception as exc:  # pyarrow / csv / unicode errors all mean "not readable as that format"
        raise DatasetError(
            f"could not read dataset {shown}: {type(exc).__name__}: {str(exc)[:300]}. Check that the file "
            f"is valid {ext[1:].upper()} and that its extension matches its format."
        ) from exc


def inspect_dataset(name: str, uri: str) -> DatasetInfo:
    """Read the header and the sidecar; DatasetError when either is unusable."""
    spec = load_spec(uri)
    raw = file_columns(uri)
    unknown = sorted(set(spec.columns) - set(raw))
    if unknown or (spec.id_column and spec.id_column not in raw):
        bad = unknown or [spec.id_column]
        raise DatasetError(
            f"sidecar {redact(sidecar_uri(uri))} names column(s) {bad} that {name} does not have; "
            f"its columns are {raw}"
        )
    columns = [spec.columns.get(c, c) for c in raw]
    if spec.reference_column and spec.reference_column not in columns:
        raise DatasetError(
            f"sidecar {redact(sidecar_uri(uri))} names reference_column {spec.reference_column!r}, "
            f"which {name} does not have; its columns are {columns}"
        )
    return DatasetInfo(name=name, uri=uri, columns=columns, spec=spec, signature=signature(uri))


def reference_for(study: StudyConfig, spec: DatasetSpec) -> str:
    return spec.reference_column or study.reference_column


def missing_columns(prompt: PromptState, study: StudyConfig, info: DatasetInfo) -> list[str]:
    """Columns the prompt's template and the reference need that the dataset lacks."""
    needed = [*sorted(prompt.placeholders()), reference_for(study, info.spec)]
    return [c for c in needed if c not in info.columns]


# --- streaming ----------------------------------------------------------------------------------


def source_columns(spec: DatasetSpec, wanted: list[str]) -> dict[str, str]:
    """{file column: study column} for the study columns in `wanted` the file has."""
    back = {v: k for k, v in spec.columns.items()}
    return {back.get(c, c): c for c in wanted}


def iter_batches(uri: str, columns: list[str], chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """The file's `columns` (file names) in record batches of at most `chunk_rows` rows; CSV
    values stay strings as written. Only one block of the file is in memory at a time."""
    fmt = format_of(uri)
    with _open(uri) as handle:
        if fmt is PARQUET:
            batches: Iterator[pa.RecordBatch] = pq.ParquetFile(handle).iter_batches(
                batch_size=chunk_rows, columns=columns
            )
        elif fmt is CSV:
            batches = pacsv.open_csv(
                handle,
                read_options=pacsv.ReadOptions(block_size=READ_BLOCK_BYTES),
                convert_options=pacsv.ConvertOptions(
                    include_columns=columns, column_types={c: pa.string() for c in columns}
                ),
            )
        else:
            batches = pajson.open_json(handle, read_options=pajson.ReadOptions(block_size=READ_BLOCK_BYTES))
        for batch in batches:
            if fmt is JSONL:
                batch = batch.select(columns)
            for start in range(0, batch.num_rows, chunk_rows):
                yield batch.slice(start, chunk_rows)


def read_error(info: DatasetInfo, rows: int, exc: Exception) -> DatasetError:
    return DatasetError(
        f"could not read dataset {info.name} after {rows} rows: {type(exc).__name__}: {str(exc)[:300]}. "
        "Check that the file is well formed and its values consistent from row to row."
    )


def count_rows(info: DatasetInfo) -> int:
    """The dataset's data rows, read in blocks (Parquet: from its footer)."""
    if format_of(info.uri) is PARQUET:
        with _open(info.uri) as handle:
            try:
                return pq.ParquetFile(handle).metadata.num_rows
            except pa.ArrowException as exc:
                raise read_error(info, 0, exc) from exc
    first = next(iter(source_columns(info.spec, info.columns[:1])), None)
    if first is None:
        raise DatasetError(f"dataset {info.name} has no columns; add a header row and data rows")
    rows = 0
    try:
        for batch in iter_batches(info.uri, [first], 1 << 16):
            rows += batch.num_rows
    except (pa.ArrowException, KeyError, UnicodeDecodeError) as exc:
        raise read_error(info, rows, exc) from exc
    return rows
