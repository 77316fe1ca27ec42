"""Evaluations of prompt versions over other datasets, in bounded memory (no Dagster here); what
they pair up, and how a dataset file is read, is `evaluation_catalog.py`'s.

A dataset is split into shards (row ranges) that separate steps evaluate, at once where there
are several workers; a shard is read in chunks of rows (pyarrow streaming readers), each chunk
is run through the same `run_prompt` / `score_predictions` as an iteration, and the scored rows
are appended to the shard's Parquet part file: memory stays bounded by the chunk size, whatever
the number of rows. `merge_shards` adds the shards' sums up into one summary.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from promptopt_dagster.core.evaluation_catalog import (
    DatasetInfo,
    count_rows,
    iter_batches,
    missing_columns,
    read_error,
    reference_for,
    sidecar_uri,
    source_columns,
)
from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.scoring import score_predictions
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.errors import DatasetError
from promptopt_dagster.llm.base import LLMClient, Usage
from promptopt_dagster.storage import as_path, delete, join, list_files, write_text

DEFAULT_CHUNK_ROWS = 1000
# Rows one evaluation step takes on: a 100k-row dataset is ten steps that workers share.
DEFAULT_SHARD_ROWS = 10_000
EVALUATIONS_DIR = "evaluations"
# The folder of an evaluation's scored rows: one Parquet part file per shard.
PREDICTIONS_DIR = "predictions"

Progress = Callable[[str], None]


class Tally(BaseModel):
    """What a shard, or a whole evaluation, counted: rows, rows whose call failed, LLM usage,
    chunks read and seconds spent. Shards' tallies add up to the evaluation's."""

    rows: int = 0
    failed_rows: int = 0
    usage: dict[str, float] = Field(default_factory=dict)
    chunks: int = 0
    seconds: float = 0.0


class EvaluationSummary(Tally):
    """What one (prompt version, dataset) evaluation measured; scores are per-row means.
    A prompt version not applicable to the dataset has no rows and no scores, and names the
    columns it needs that the dataset lacks."""

    prompt_version: str
    study: str
    prompt_id: str
    dataset: str
    target_metric: str
    scores: dict[str, float]
    predictions_uri: str
    applicable: bool = True
    missing_columns: list[str] = Field(default_factory=list)
    dataset_columns: list[str] = Field(default_factory=list)

    def status(self) -> str:
        """`scored`, or why the prompt version was not evaluated on the dataset."""
        if self.applicable:
            return "scored"
        return f"not applicable: lacks {', '.join(self.missing_columns)}"


def _as_text(series: pd.Series) -> pd.Series:
    return series.map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v))


def _output_schema(study: StudyConfig, metrics: list[str]) -> pa.Schema:
    fields = [
        ("row_id", pa.string()),
        ("prediction", pa.string()),
        ("reference", pa.string()),
        ("error", pa.string()),
        ("cached", pa.bool_()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("seconds", pa.float64()),
        ("cost_usd", pa.float64()),
        *[(c, pa.string()) for c in study.input_columns],
        *[(m, pa.float64()) for m in metrics],
        ("score", pa.float64()),
    ]
    return pa.schema(fields)


def evaluation_dir(root: str, prompt_version: str, dataset: str) -> str:
    """Where an evaluation's predictions and summary live under the store root."""
    return join(root, EVALUATIONS_DIR, f"prompt_version={prompt_version}", f"dataset={dataset}")


@dataclass(frozen=True)
class Evaluation:
    """One prompt version (`prompt` of `study`, named `prompt_version`) on one dataset, and the
    folder its results go to: what every step of an evaluation works on."""

    prompt_version: str
    study: StudyConfig
    prompt: PromptState
    info: DatasetInfo
    out_dir: str

    @property
    def applicable(self) -> bool:
        """Whether the dataset has every column the prompt version's template and reference need."""
        return not missing_columns(self.prompt, self.study, self.info)


class Shard(BaseModel):
    """Rows [start, stop) of a dataset (stop None: to the end), evaluated by one step; the steps of
    one evaluation can run at once on different workers."""

    index: int
    count: int
    start: int = 0
    stop: int | None = None

    def part_uri(self, out_dir: str) -> str:
        return join(out_dir, PREDICTIONS_DIR, f"part-{self.index:05d}-of-{self.count:05d}.parquet")


class ShardResult(Tally):
    """What one shard measured: metric sums (not means, so shards add up), rows and usage."""

    shard: Shard
    sums: dict[str, float] = Field(default_factory=dict)


def _check_applicable(evaluation: Evaluation) -> None:
    info = evaluation.info
    missing = missing_columns(evaluation.prompt, evaluation.study, info)
    if missing:
        raise DatasetError(
            f"prompt version {evaluation.prompt_version} cannot be evaluated on dataset {info.name}: "
            f"its template and reference need column(s) {missing}, which the dataset lacks (it has "
            f"{info.columns}). Evaluate it on a dataset with those columns, or add a sidecar "
            f"{as_path(sidecar_uri(info.uri)).name} that renames the file's columns "
            "(columns: {file column: study column}) or names the reference_column."
        )


def plan_shards(rows: int, shard_rows: int) -> list[Shard]:
    """Consecutive row ranges of at most `shard_rows` rows covering `rows` rows."""
    if shard_rows < 1:
        raise DatasetError(f"shard_rows must be at least 1, got {shard_rows}")
    count = max(1, -(-rows // shard_rows))
    return [
        Shard(index=i, count=count, start=i * shard_rows, stop=min(rows, (i + 1) * shard_rows))
        for i in range(count)
    ]


def shards_for(prompt: PromptState, study: StudyConfig, info: DatasetInfo, shard_rows: int) -> list[Shard]:
    """The shards an evaluation of `prompt` on the dataset runs in; one empty shard when the
    prompt does not fit the dataset (its evaluation only records why). DatasetError for a
    dataset without data rows."""
    if missing_columns(prompt, study, info):
        return [Shard(index=0, count=1, stop=0)]
    rows = count_rows(info)
    if rows == 0:
        raise DatasetError(f"dataset {info.name} has no data rows; add rows to it")
    return plan_shards(rows, shard_rows)


def _shard_batches(uri: str, columns: list[str], chunk_rows: int, shard: Shard) -> Iterator[pa.RecordBatch]:
    """The shard's rows of the file, in batches of at most `chunk_rows` rows."""
    offset = 0
    for batch in iter_batches(uri, columns, chunk_rows):
        lo, hi = offset, offset + batch.num_rows
        offset = hi
        if hi <= shard.start:
            continue
        if shard.stop is not None and lo >= shard.stop:
            return
        cut_lo = max(shard.start, lo) - lo
        cut_hi = (hi if shard.stop is None else min(shard.stop, hi)) - lo
        yield batch.slice(cut_lo, cut_hi - cut_lo)


def evaluate_shard(
    llm: LLMClient,
    evaluator: EvaluatorService,
    evaluation: Evaluation,
    shard: Shard,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: Progress | None = None,
) -> ShardResult:
    """Run the prompt over the shard's rows chunk by chunk, writing the scored rows to the shard's
    part file (`Shard.part_uri`). Raises DatasetError naming the columns when the dataset lacks
    what the prompt needs, or naming the row where the file stops being readable."""
    _check_applicable(evaluation)
    study, prompt, info = evaluation.study, evaluation.prompt, evaluation.info
    if chunk_rows < 1:
        raise DatasetError(f"chunk_rows must be at least 1, got {chunk_rows}")
    reference = reference_for(study, info.spec)
    wanted = [c for c in [*study.input_columns, reference] if c in info.columns]
    if info.spec.id_column:
        wanted.append(info.spec.columns.get(info.spec.id_column, info.spec.id_column))
    rename = source_columns(info.spec, list(dict.fromkeys(wanted)))
    metrics = evaluator.metric_names
    schema = _output_schema(study, metrics)
    sums = dict.fromkeys(metrics, 0.0)
    usage = Usage()
    rows = failed = chunks = 0
    start = time.perf_counter()
    target = as_path(shard.part_uri(evaluation.out_dir))
    if target.protocol in ("", "file", "local"):
        target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with target.open("wb") as sink, pq.ParquetWriter(sink, schema) as writer:
            for batch in _shard_batches(info.uri, list(rename), chunk_rows, shard):
                frame = batch.to_pandas().rename(columns=rename)
                chunk = pd.DataFrame(
                    {c: _as_text(frame[c]) if c in frame else "" for c in study.input_columns},
                    index=frame.index,
                )
                chunk[study.reference_column] = _as_text(frame[reference])
                if info.spec.id_column:
                    chunk["row_id"] = _as_text(
                        frame[info.spec.columns.get(info.spec.id_column, info.spec.id_column)]
                    )
                else:
                    first = shard.start + rows + 1
                    chunk["row_id"] = [str(first + i) for i in range(len(frame))]
                chunk["split"] = "eval"
                del frame, batch
                preds = run_prompt(llm, prompt, chunk, study.primary_model, study)
                scored, _ = score_predictions(evaluator, preds, study.target_metric, ["split"])
                for m in metrics:
                    sums[m] += float(scored[m].sum())
                usage = usage + usage_of(preds)
                failed += int(scored["error"].notna().sum())
                rows += len(scored)
                chunks += 1
                scored["error"] = scored["error"].astype(object)
                writer.write_table(
                    pa.Table.from_pandas(scored[schema.names], schema=schema, preserve_index=False)
                )
                if progress and chunks % 10 == 1:
                    progress(f"{info.name}: {rows} rows evaluated{_of(shard)}")
    except DatasetError:
        raise
    except (pa.ArrowException, KeyError, UnicodeDecodeError) as exc:
        raise read_error(info, shard.start + rows, exc) from exc
    return ShardResult(
        shard=shard,
        rows=rows,
        failed_rows=failed,
        sums=sums,
        usage=usage.as_dict(),
        chunks=chunks,
        seconds=time.perf_counter() - start,
    )


def _of(shard: Shard) -> str:
    return "" if shard.count == 1 else f" in shard {shard.index + 1}/{shard.count}"


def merge_shards(evaluation: Evaluation, results: list[ShardResult]) -> EvaluationSummary:
    """The evaluation's summary from its shards' results, written to ``<out_dir>/summary.json``;
    part files of an earlier evaluation with another number of shards are removed."""
    info, out_dir = evaluation.info, evaluation.out_dir
    counts = {r.shard.count for r in results}
    if len(counts) != 1 or sorted(r.shard.index for r in results) != list(range(counts.pop())):
        got = sorted((r.shard.index, r.shard.count) for r in results)
        raise DatasetError(
            f"evaluation {evaluation.prompt_version} on {info.name}: shards {got} do not cover the dataset"
        )
    rows = sum(r.rows for r in results)
    if rows == 0:
        raise DatasetError(f"dataset {info.name} has no data rows; add rows to it")
    parts = join(out_dir, PREDICTIONS_DIR)
    metrics = list(results[0].sums)
    usage = Usage()
    for r in results:
        usage = usage + Usage.from_dict(r.usage)
    summary = _write_summary(
        evaluation,
        rows=rows,
        failed_rows=sum(r.failed_rows for r in results),
        scores={m: sum(r.sums[m] for r in results) / rows for m in metrics},
        usage=usage.as_dict(),
        predictions_uri=parts,
        seconds=sum(r.seconds for r in results),
        chunks=sum(r.chunks for r in results),
    )
    # the summary first: stale parts go only once it points at the new ones
    current = {r.shard.part_uri(out_dir).rsplit("/", 1)[-1] for r in results}
    for uri in list_files(parts, "part-*.parquet"):
        if uri.rsplit("/", 1)[-1] not in current:
            delete(uri)
    delete(join(out_dir, "predictions.parquet"))  # the single file earlier versions wrote
    return summary


def evaluate_dataset(
    llm: LLMClient, evaluator: EvaluatorService, evaluation: Evaluation, **chunking: Any
) -> EvaluationSummary:
    """Run the prompt over every row of the dataset in one shard, chunk by chunk, into
    ``<out_dir>/predictions/``; writes ``summary.json`` there and returns it. `chunking`:
    `chunk_rows` and `progress`, as for `evaluate_shard`."""
    result = evaluate_shard(llm, evaluator, evaluation, Shard(index=0, count=1), **chunking)
    return merge_shards(evaluation, [result])


def _write_summary(evaluation: Evaluation, **outcome: Any) -> EvaluationSummary:
    """The summary of one prompt version on one dataset, written to ``<out_dir>/summary.json``."""
    summary = EvaluationSummary(
        prompt_version=evaluation.prompt_version,
        study=evaluation.study.name,
        prompt_id=evaluation.prompt.id,
        dataset=evaluation.info.name,
        target_metric=evaluation.study.target_metric,
        **outcome,
    )
    write_text(join(evaluation.out_dir, "summary.json"), summary.model_dump_json(indent=2))
    return summary


def record_not_applicable(evaluation: Evaluation) -> EvaluationSummary:
    """The evaluation of a prompt version on a dataset lacking columns it needs: no LLM call, a
    summary (``applicable`` false, the missing columns named) written to ``<out_dir>/summary.json``
    in place of any earlier one, so the comparison shows the pair as not applicable."""
    info = evaluation.info
    missing = missing_columns(evaluation.prompt, evaluation.study, info)
    if not missing:
        raise ValueError(f"prompt version {evaluation.prompt_version} is applicable to dataset {info.name}")
    return _write_summary(
        evaluation,
        scores={},
        predictions_uri="",
        applicable=False,
        missing_columns=missing,
        dataset_columns=info.columns,
    )
