"""Load a labelled dataset (CSV, JSONL or Parquet; local or gs://), check it, and split it.

Splits and minibatches are decided by hashing each row's id, never by position or a random
generator, so they are the same on every machine. Splits are exact (each within one row of its
fraction), stratified by label for classification data, and stable when rows are appended up to
the rows at a split boundary (see split_dataset for the exact guarantee).
"""

from __future__ import annotations

import difflib
import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from promptopt_dagster.errors import DatasetError, StorageError
from promptopt_dagster.redaction import redact
from promptopt_dagster.storage import MissingObjectError, as_path, read_bytes

ROW_ID = "row_id"
# load_dataset records the reference column here, so split_dataset can stratify by it.
REFERENCE_ATTR = "reference_column"
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


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset file format: `read` loads a whole file (load_dataset); the evaluations over other
    datasets (core/evaluation_catalog.py) stream the same formats in chunks."""

    name: str
    description: str
    read: Callable[[bytes], pd.DataFrame]


CSV = DatasetFormat("csv", "CSV with a header row", _read_csv)
JSONL = DatasetFormat("jsonl", "JSON Lines (one JSON object per line)", _read_jsonl)
PARQUET = DatasetFormat("parquet", "Parquet", _read_parquet)
# The dataset file formats, by file extension (lower case).
FORMATS: dict[str, DatasetFormat] = {
    ".csv": CSV,
    ".jsonl": JSONL,
    ".ndjson": JSONL,
    ".parquet": PARQUET,
    ".pq": PARQUET,
}


def extension(uri: str) -> str:
    """The file extension of `uri`, lower case, with its dot ('' when it has none)."""
    return os.path.splitext(as_path(uri).name)[1].lower()


def format_of(uri: str) -> DatasetFormat | None:
    """The format of the file at `uri` by its extension; None when it is not a dataset format."""
    return FORMATS.get(extension(uri))


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
    ext = extension(uri)
    fmt = FORMATS.get(ext)
    if fmt is None:
        supported = ", ".join(sorted(FORMATS))
        raise DatasetError(
            f"dataset {shown} has unsupported extension {ext or '(none)'!r}; supported: {supported}. "
            "Convert the file or rename it to match its format."
        )
    kind = fmt.description
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
        df = fmt.read(data)
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
    The reference column becomes strings; missing input values become empty strings. The
    reference column's name is kept in ``df.attrs["reference_column"]`` for split_dataset."""
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
    df = df.reset_index(drop=True)
    df.attrs[REFERENCE_ATTR] = reference_column  # split_dataset stratifies by it
    return df


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists / arrays are values, not missing
        return False


def _unit_hash(text: str) -> float:
    """A number in [0, 1) from a string, uniform and stable across processes and machines."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16) / float(16**15)


# A reference column "looks like a label set" (and splits are stratified by it) when it has
# between 2 and MAX_STRATA distinct values and at least STRATUM_ROWS rows per value on average.
MAX_STRATA = 20
STRATUM_ROWS = 3


def looks_like_labels(references: pd.Series) -> bool:
    """True when the references look like a classification label set: 2 to 20 distinct values,
    and at least 3 rows per distinct value on average (n >= 3 * distinct). Free text, numbers
    that are all different, or a single repeated value are not."""
    distinct = references.astype(str).nunique()
    return 2 <= distinct <= MAX_STRATA and len(references) >= STRATUM_ROWS * distinct


def _max_flow(
    supply: list[int],
    cap: list[list[int]],
    sink_cap: list[int],
    flow: list[list[int]],
    order: list[list[int]],
) -> None:
    """Augment `flow` (strata x splits) in place to a maximum flow of the network source ->
    stratum s (capacity supply[s]) -> split j (cap[s][j]) -> sink (sink_cap[j]). Augmenting paths
    never lower the flow into the sink, so splits keep what an earlier call gave them. Each
    stratum tries splits in `order[s]`; everything is in a fixed order, hence deterministic."""
    n_strata, n_splits = len(supply), len(sink_cap)

    def augment() -> bool:
        used = [sum(row) for row in flow]
        into = [sum(flow[s][j] for s in range(n_strata)) for j in range(n_splits)]
        # breadth-first search from every stratum with supply left; parents for the path
        parent_of_split: dict[int, int] = {}
        parent_of_stratum: dict[int, int | None] = {s: None for s in range(n_strata) if used[s] < supply[s]}
        queue = list(parent_of_stratum)
        while queue:
            s = queue.pop(0)
            for j in order[s]:
                if j in parent_of_split or flow[s][j] >= cap[s][j]:
                    continue
                parent_of_split[j] = s
                if into[j] < sink_cap[j]:
                    while True:  # walk back: stratum s -> split j, then s's own parent edge
                        flow[s][j] += 1
                        back = parent_of_stratum[s]
                        if back is None:
                            return True
                        flow[s][back] -= 1
                        j, s = back, parent_of_split[back]
                for t in range(n_strata):  # residual edge split j -> stratum t (undo t's flow)
                    if t not in parent_of_stratum and flow[t][j] > 0:
                        parent_of_stratum[t] = j
                        queue.append(t)
        return False

    while augment():
        pass


def _allocate(
    sizes: list[int], fractions: tuple[float, ...], min_train: list[int], slack: int = 0
) -> list[list[int]] | None:
    """Rows per stratum and split, or None if impossible: each split's total within one row of
    n * fraction; each stratum's count within one row (plus `slack`) of its size * fraction (a
    "controlled rounding"); at least min_train[s] train rows in stratum s."""
    n, k = sum(sizes), len(fractions)
    ideal = [[round(size * f, 9) for f in fractions] for size in sizes]
    lo = [[max(0, math.floor(q) - slack) for q in row] for row in ideal]
    hi = [[min(size, math.ceil(q) + slack) for q in row] for size, row in zip(sizes, ideal, strict=True)]
    for s, need in enumerate(min_train):
        lo[s][0] = max(lo[s][0], need)
        hi[s][0] = max(hi[s][0], lo[s][0])
    totals = [round(n * f, 9) for f in fractions]
    col_lo = [math.floor(t) for t in totals]
    col_hi = [math.ceil(t) for t in totals]
    base = [sum(row[j] for row in lo) for j in range(k)]
    supply = [size - sum(row) for size, row in zip(sizes, lo, strict=True)]
    if any(x < 0 for x in supply) or any(b > c for b, c in zip(base, col_hi, strict=True)):
        return None
    cap = [[h - low for h, low in zip(hrow, lrow, strict=True)] for hrow, lrow in zip(hi, lo, strict=True)]
    # round up the cells with the largest fractional part first, as largest-remainder would
    order = [sorted(range(k), key=lambda j, row=row: (-(row[j] % 1), j)) for row in ideal]
    flow = [[0] * k for _ in sizes]
    _max_flow(supply, cap, [max(0, c - b) for c, b in zip(col_lo, base, strict=True)], flow, order)
    _max_flow(supply, cap, [c - b for c, b in zip(col_hi, base, strict=True)], flow, order)
    counts = [[a + b for a, b in zip(lrow, frow, strict=True)] for lrow, frow in zip(lo, flow, strict=True)]
    cols = [sum(row[j] for row in counts) for j in range(k)]
    fits = all(sum(row) == size for row, size in zip(counts, sizes, strict=True)) and all(
        low <= c <= high for c, low, high in zip(cols, col_lo, col_hi, strict=True)
    )
    return counts if fits else None


def _allocate_relaxed(
    sizes: list[int], fractions: tuple[float, ...], min_train: list[int]
) -> list[list[int]]:
    """_allocate, widening the per-stratum bounds (never the split totals) until it fits. Needed
    only when the forced train rows of small labels crowd the train split; if even that fails
    (more such labels than train rows), without forced train rows."""
    for need in (min_train, [0] * len(sizes)):
        for slack in range(max(sizes) + 1):
            counts = _allocate(sizes, fractions, need, slack)
            if counts is not None:
                return counts
    raise AssertionError("unreachable: the unconstrained allocation always fits")  # pragma: no cover


def split_dataset(
    df: pd.DataFrame, train: float, val: float, seed: int, reference_column: str | None = None
) -> dict[str, pd.DataFrame]:
    """Split rows into train / val / test (the rest), exactly to the fractions.

    Sizes: each split has within one row of n * fraction (its floor or ceiling), and the three
    add up to n. With very few rows a split can be empty; load_study_data refuses such studies.

    Strata: when the reference column (`reference_column`, else the one load_dataset recorded in
    ``df.attrs["reference_column"]``) looks like a label set (`looks_like_labels`: 2 to 20
    distinct values, at least 3 rows per value on average), each label is a stratum: its rows are
    shared out within one row of its size * fraction, and every label with 3 or more rows gets
    at least one train row (provided the train split has a row for each such label). Where those
    two cannot both hold, the per-label counts stray further, never the split totals. Otherwise
    all rows are one stratum.

    Order: within a stratum rows are ordered by sha1(f"{seed}:{row_id}") and allocated by rank:
    the first ones to train, the next to val, the rest to test. No random generator is used, so
    the split depends only on the row ids, the labels, the seed and the fractions: the same on
    every machine and whatever the order of the rows in the file.

    Appending rows (guarantee): an existing row can only change split by crossing one of its
    stratum's two boundaries in that hash order. A stratum that gains m rows (m = 0 included)
    moves at most m + 1 of its existing rows across each boundary, so at most 2m + 2 in all;
    typically far fewer (the new rows fall on both sides of a boundary in proportion, so about
    the square root of m move). This holds while the stratification stays the same (the label
    set rule gives the same answer, and no stratum needed its bounds widened); a new label
    only adds a stratum."""
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

    column = reference_column or df.attrs.get(REFERENCE_ATTR)
    stratified = column is not None and column in df.columns and looks_like_labels(df[column])
    strata = df[column].astype(str).tolist() if stratified else [""] * len(df)
    row_ids = df[ROW_ID].astype(str).tolist()
    keys = [hashlib.sha1(f"{seed}:{rid}".encode()).hexdigest() for rid in row_ids]
    members: dict[str, list[int]] = {}
    for position, name in enumerate(strata):
        members.setdefault(name, []).append(position)
    names = sorted(members)
    for name in names:
        members[name].sort(key=lambda i: (keys[i], row_ids[i]))
    sizes = [len(members[name]) for name in names]
    min_train = [1 if stratified and size >= STRATUM_ROWS else 0 for size in sizes]
    counts = _allocate_relaxed(sizes, (train, val, test), min_train)

    positions: dict[str, list[int]] = {name: [] for name in SPLITS}
    for name, (n_train, n_val, _) in zip(names, counts, strict=True):
        ranked = members[name]
        positions["train"] += ranked[:n_train]
        positions["val"] += ranked[n_train : n_train + n_val]
        positions["test"] += ranked[n_train + n_val :]
    # rows keep their order in the file within each split
    return {name: df.iloc[sorted(rows)].reset_index(drop=True) for name, rows in positions.items()}


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
