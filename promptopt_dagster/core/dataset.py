"""Load a labelled dataset (CSV, JSONL or Parquet; local or gs://), check it, and split it.

Splits and minibatches are decided by hashing each row's id, never by position or a random
generator, so they are the same on every machine and a row keeps its split when rows are added.
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from promptopt_dagster.core.errors import DatasetError, StorageError
from promptopt_dagster.core.storage import MissingObjectError, as_path, read_bytes, redact

ROW_ID = "row_id"
SPLITS = ("train", "val", "test")
# How many offending row numbers an error message names before "...".
_SHOW_ROWS = 5


# Every reader keeps values as the file wrote them: only a truly empty cell (CSV), a JSON null
# (JSONL) or a null (Parquet) is missing. pandas' default NA parsing would turn labels such as
# "NA", "None", "null", "NaN" or "N/A" into missing values, and integer columns with a null into
# floats ("1.0").


def _read_csv(data: bytes) -> pd.DataFrame:
    # dtype=str keeps "007" and "12" as written; keep_default_na=False keeps "NA", "null", ...
    # as text, so an empty cell reads as "" (caught as blank below) and nothing else is missing.
    return pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)


def _read_jsonl(data: bytes) -> pd.DataFrame:
    # Parsed with json, not pandas: no guessing of dates, numbers or NA strings; JSON null is None.
    records = []
    for number, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"line {number}: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"line {number} is a JSON {type(record).__name__}, not an object")
        records.append(record)
    if not records:
        raise pd.errors.EmptyDataError("no JSON objects")
    return pd.DataFrame(records, dtype=object)


def _read_parquet(data: bytes) -> pd.DataFrame:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    # Python values column by column: nulls become None, integers stay integers.
    columns = {
        name: pd.Series(table.column(name).to_pylist(), dtype=object)
        for name in table.column_names
        if not (name.startswith("__index_level_") and name.endswith("__"))
    }
    return pd.DataFrame(columns, index=pd.RangeIndex(table.num_rows))


READERS: dict[str, tuple[str, Callable[[bytes], pd.DataFrame]]] = {
    ".csv": ("CSV with a header row", _read_csv),
    ".jsonl": ("JSON Lines (one JSON object per line)", _read_jsonl),
    ".ndjson": ("JSON Lines (one JSON object per line)", _read_jsonl),
    ".parquet": ("Parquet", _read_parquet),
    ".pq": ("Parquet", _read_parquet),
}


def _extension(uri: str) -> str:
    return os.path.splitext(as_path(uri).name)[1].lower()


def _row_numbers(mask: pd.Series) -> str:
    """1-based data row numbers (header not counted) of the True entries, the first few."""
    rows = [str(i + 1) for i, bad in enumerate(mask.tolist()) if bad]
    shown = ", ".join(rows[:_SHOW_ROWS])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > _SHOW_ROWS else "")


def _blank(series: pd.Series) -> pd.Series:
    """True where a value is missing or only whitespace."""
    return series.isna() | series.map(lambda v: isinstance(v, str) and not v.strip())


def _check_column(df: pd.DataFrame, column: str, role: str, shown: str, field: str) -> None:
    if column in df.columns:
        return
    columns = [str(c) for c in df.columns]
    close = difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise DatasetError(
        f"{role} {column!r} is not a column of {shown}.{hint} Available columns: {columns}. "
        f"Fix {field} in the study (or the file's header)."
    )


def read_table(uri: str) -> pd.DataFrame:
    """The file at `uri` as a DataFrame, with DatasetError for a missing, unsupported,
    unreadable or empty file."""
    shown = redact(uri)
    ext = _extension(uri)
    if ext not in READERS:
        supported = ", ".join(sorted(READERS))
        raise DatasetError(
            f"dataset {shown} has unsupported extension {ext or '(none)'!r}; supported: {supported}. "
            "Convert the file or rename it to match its format."
        )
    kind, reader = READERS[ext]
    try:
        data = read_bytes(uri)
    except MissingObjectError as exc:
        raise DatasetError(
            f"dataset file {shown} does not exist; check the study's `dataset:` path "
            "(a relative path is relative to the study file)"
        ) from exc
    except StorageError as exc:
        raise DatasetError(f"cannot read dataset {shown}: {exc}") from exc
    if not data.strip():
        raise DatasetError(f"dataset {shown} is empty (0 bytes of data); add rows to it")
    try:
        df = reader(data)
    except pd.errors.EmptyDataError as exc:
        raise DatasetError(f"dataset {shown} is empty; add a header row and data rows") from exc
    except Exception as exc:  # pandas / pyarrow raise many types for a malformed file
        raise DatasetError(
            f"could not read dataset {shown} as {kind}: {type(exc).__name__}: {str(exc)[:300]}. "
            f"Check that the file is valid {kind} (and that its extension {ext!r} matches its format)."
        ) from exc
    if len(df) == 0:
        raise DatasetError(f"dataset {shown} has no data rows (columns: {list(df.columns)}); add rows to it")
    return df


def _hash_ids(df: pd.DataFrame, columns: list[str]) -> list[str]:
    """sha1 of the row's values in `columns`; repeats of the same row get -2, -3, ... in file order,
    so appending rows never changes an existing row's id."""
    seen: dict[str, int] = {}
    ids = []
    for values in df[columns].itertuples(index=False, name=None):
        payload = json.dumps([None if pd.isna(v) else str(v) for v in values], ensure_ascii=False)
        digest = hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}-{seen[digest]}")
    return ids


def load_dataset(
    uri: str | os.PathLike[str],
    input_columns: list[str],
    reference_column: str,
    id_column: str | None = None,
) -> pd.DataFrame:
    """Read and check a dataset. Returns all its columns plus a string `row_id` column first: the
    id column's values if given (must be unique), else a stable hash of the inputs and reference.
    The reference column becomes strings; missing input values become empty strings."""
    uri = str(uri)
    shown = redact(uri)
    df = read_table(uri)
    df.columns = [str(c) for c in df.columns]
    for column in input_columns:
        _check_column(df, column, "input column", shown, "input_columns")
    _check_column(df, reference_column, "reference column", shown, "reference_column")
    if id_column is not None:
        _check_column(df, id_column, "id column", shown, "id_column")
    elif ROW_ID in df.columns:
        raise DatasetError(
            f"dataset {shown} already has a {ROW_ID!r} column; set `id_column: {ROW_ID}` in the study "
            "to use it as the row id, or rename the column"
        )

    blank = _blank(df[reference_column])
    if blank.any():
        raise DatasetError(
            f"reference_column {reference_column!r} of {shown} is empty in {int(blank.sum())} row(s) "
            f"(data rows {_row_numbers(blank)}, counting from 1 after the header); fill in the expected "
            "outputs or remove those rows"
        )
    df[reference_column] = df[reference_column].map(str)
    for column in input_columns:
        df[column] = df[column].map(lambda v: "" if _is_missing(v) else v)

    if id_column is not None:
        ids = df[id_column]
        missing = _blank(ids)
        if missing.any():
            raise DatasetError(
                f"id_column {id_column!r} of {shown} is empty in data rows {_row_numbers(missing)}; "
                "give every row an id, or remove id_column to use hashed ids"
            )
        ids = ids.map(str)
        dup = ids.duplicated(keep=False)
        if dup.any():
            values = sorted(set(ids[dup]))[:_SHOW_ROWS]
            raise DatasetError(
                f"id_column {id_column!r} of {shown} is not unique: {values} repeat (data rows "
                f"{_row_numbers(dup)}); make the ids unique, or remove id_column to use hashed ids"
            )
        row_ids = ids.tolist()
    else:
        row_ids = _hash_ids(df, [*input_columns, reference_column])

    if id_column == ROW_ID:
        df = df.drop(columns=[ROW_ID])
    df.insert(0, ROW_ID, row_ids)
    return df.reset_index(drop=True)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists / arrays are values, not missing
        return False


def _unit_hash(text: str) -> float:
    """A number in [0, 1) from a string, uniform and stable across processes and machines."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16) / float(16**15)


def split_dataset(df: pd.DataFrame, train: float, val: float, seed: int) -> dict[str, pd.DataFrame]:
    """Split rows into train / val / test (the rest) by hashing f"{seed}:{row_id}".

    A row's split depends only on its id, the seed and the fractions, so adding rows never moves
    an existing row. With few rows a split can come out empty; then (and only then) the row whose
    hash lies nearest to that split's range is moved into it from a split with two or more rows,
    so every split has at least one row whenever the data has three or more."""
    test = 1.0 - train - val
    if not (0 < train < 1 and 0 < val < 1 and test > 1e-9):
        raise DatasetError(
            f"split fractions train={train:g}, val={val:g} leave test={test:g}; each must be above 0 "
            "and train + val below 1 (e.g. train 0.4, val 0.3, test 0.3)"
        )
    if ROW_ID not in df.columns:
        raise DatasetError(f"the frame has no {ROW_ID!r} column; load it with load_dataset first")
    if len(df) < 3:
        raise DatasetError(
            f"the dataset has {len(df)} row(s); train / val / test need at least 3 (in practice 30 or more)"
        )
    if df[ROW_ID].duplicated().any():
        raise DatasetError(f"{ROW_ID} values are not unique; load the data with load_dataset")

    u = np.array([_unit_hash(f"{seed}:{rid}") for rid in df[ROW_ID]])
    labels = np.where(u < train, "train", np.where(u < train + val, "val", "test")).astype(object)
    bounds = {"train": (0.0, train), "val": (train, train + val), "test": (train + val, 1.0)}
    for name in SPLITS:
        if (labels == name).any():
            continue
        lo, hi = bounds[name]
        sizes = {s: int((labels == s).sum()) for s in SPLITS}
        donors = np.array([sizes[s] >= 2 for s in labels])
        distance = np.maximum(np.maximum(lo - u, u - hi), 0.0)
        distance[~donors] = np.inf
        labels[int(np.argmin(distance))] = name
    return {name: df[labels == name].reset_index(drop=True) for name in SPLITS}


def minibatch(df: pd.DataFrame, size: int, seed: int, iteration: int) -> pd.DataFrame:
    """`size` rows of `df` chosen by hashing f"{seed}:{iteration}:{row_id}": the same rows for every
    candidate of one iteration (a fair comparison, and cacheable), other rows in the next
    iteration. Rows keep their order in `df`; all rows if `df` has no more than `size`."""
    if size < 1:
        raise DatasetError(f"minibatch size must be at least 1, got {size}; fix minibatch_size in the study")
    if ROW_ID not in df.columns:
        raise DatasetError(f"the frame has no {ROW_ID!r} column; load it with load_dataset first")
    if len(df) <= size:
        return df.reset_index(drop=True)
    keys = np.array([_unit_hash(f"{seed}:{iteration}:{rid}") for rid in df[ROW_ID]])
    positions = np.sort(np.argsort(keys, kind="stable")[:size])
    return df.iloc[positions].reset_index(drop=True)
