"""Evaluations of prompt versions over other datasets, and the table that compares them.

`prompt_evaluation` is partitioned by prompt version x dataset (both dynamic; the sensors at the
end of sensors.py add the keys). Backfill it from the UI over a new dataset or a new prompt
version; `evaluation_comparison` then gathers every evaluation into one table (prompt version x
dataset x metric) in its metadata. A prompt version whose template or reference needs a column
the dataset lacks is recorded as not applicable (a successful materialization, `applicable`
false, the missing columns named), so a backfill over "All" prompt versions ends green; an
unreadable dataset or a failing LLM fails the run. An evaluation is a graph of steps: a plan
splits the dataset into shards of `shard_rows` rows, a step per shard evaluates it (several at
once on Celery workers), a last step merges their results. The work is
core/evaluation_catalog.py and core/sharded_evaluation.py; this file only translates.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from promptopt_dagster.assets.metadata import number, prompt_markdown, table_value, usage_metadata
from promptopt_dagster.core import evaluation_catalog, sharded_evaluation, version_comparison
from promptopt_dagster.core.scoring import evaluator_for
from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.instance_config import LLM_POOL
from promptopt_dagster.partitions import evaluation_partitions, parse_evaluation_key
from promptopt_dagster.resources import LLMResource, PromptStoreResource
from promptopt_dagster.storage import as_path, join

GROUP = "backfill"


class DatasetsResource(dg.ConfigurableResource):
    """The datasets location (a folder or gs:// prefix; settings DATASETS_URI) and how it is used."""

    uri: str
    auto_evaluate: bool = False  # sensors launch evaluations themselves (else: backfill from the UI)
    chunk_rows: int = sharded_evaluation.DEFAULT_CHUNK_ROWS  # rows per chunk; bounds an evaluation's memory
    # rows per shard: each shard is a step of its own, so workers evaluate one dataset at once
    shard_rows: int = sharded_evaluation.DEFAULT_SHARD_ROWS

    def files(self) -> dict[str, str]:
        return evaluation_catalog.list_datasets(self.uri)

    def inspect(self, name: str) -> evaluation_catalog.DatasetInfo:
        return evaluation_catalog.inspect_dataset(name, join(self.uri, name))


def _evaluation(
    partition_key: str, prompt_store: PromptStoreResource, datasets: DatasetsResource
) -> sharded_evaluation.Evaluation:
    """The prompt version and dataset of an evaluation partition, loaded once per step."""
    version, dataset = parse_evaluation_key(partition_key)
    store = prompt_store.store
    study_name, prompt_id = evaluation_catalog.parse_prompt_version(version)
    return sharded_evaluation.Evaluation(
        prompt_version=version,
        study=store.load_study(study_name),
        prompt=store.load_prompt(study_name, prompt_id),
        info=datasets.inspect(dataset),
        out_dir=sharded_evaluation.evaluation_dir(store.root, version, dataset),
    )


@contextmanager
def _failing_cleanly() -> Iterator[None]:
    """A PromptoptError (bad dataset or prompt version) fails the step with its message, unretried."""
    try:
        yield
    except PromptoptError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc


@dg.op(out=dg.DynamicOut(sharded_evaluation.Shard))
def plan_evaluation_shards(
    context: dg.OpExecutionContext, prompt_store: PromptStoreResource, datasets: DatasetsResource
) -> Iterator[dg.DynamicOutput[sharded_evaluation.Shard]]:
    """Row ranges of `DatasetsResource.shard_rows` rows, one step each (a prompt version the
    dataset does not fit: one empty shard, so the evaluation still records why)."""
    with _failing_cleanly():
        evaluation = _evaluation(context.partition_key, prompt_store, datasets)
        shards = sharded_evaluation.shards_for(
            evaluation.prompt, evaluation.study, evaluation.info, datasets.shard_rows
        )
    context.log.info(f"{evaluation.info.name}: {len(shards)} shard(s) of at most {datasets.shard_rows} rows")
    for shard in shards:
        yield dg.DynamicOutput(shard, mapping_key=f"shard_{shard.index}")


@dg.op(pool=LLM_POOL)
def evaluate_evaluation_shard(
    context: dg.OpExecutionContext,
    shard: sharded_evaluation.Shard,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    datasets: DatasetsResource,
) -> sharded_evaluation.ShardResult:
    """The shard's rows through the prompt version, streamed in chunks into its part file."""
    with _failing_cleanly():
        evaluation = _evaluation(context.partition_key, prompt_store, datasets)
        if not evaluation.applicable:
            return sharded_evaluation.ShardResult(shard=shard)
        return sharded_evaluation.evaluate_shard(
            llm.primary(evaluation.study),
            evaluator_for(evaluation.study),
            evaluation,
            shard,
            chunk_rows=datasets.chunk_rows,
            progress=context.log.info,
        )


@dg.op
def merge_evaluation_shards(
    context: dg.OpExecutionContext,
    results: list[sharded_evaluation.ShardResult],
    prompt_store: PromptStoreResource,
    datasets: DatasetsResource,
) -> sharded_evaluation.EvaluationSummary:
    """The shards' results as the evaluation's summary (or its not-applicable record)."""
    with _failing_cleanly():
        evaluation = _evaluation(context.partition_key, prompt_store, datasets)
        if not evaluation.applicable:
            summary = sharded_evaluation.record_not_applicable(evaluation)
            _warn_not_applicable(context, summary, evaluation.info.uri)
            context.add_output_metadata(_not_applicable_metadata(summary))
            return summary
        summary = sharded_evaluation.merge_shards(evaluation, results)
    context.add_output_metadata(
        {
            "applicable": True,
            "score": number(summary.scores[summary.target_metric]),
            "target_metric": summary.target_metric,
            "study": evaluation.study.name,
            "prompt_id": evaluation.prompt.id,
            "dataset": evaluation.info.name,
            "rows": summary.rows,
            "failed_rows": summary.failed_rows,
            **{f"score_{m}": number(v) for m, v in summary.scores.items()},
            "chunks": summary.chunks,
            "shards": len(results),
            "predictions": dg.MetadataValue.path(summary.predictions_uri),
            "prompt": prompt_markdown(evaluation.prompt.system_prompt, evaluation.prompt.output_prompt),
        }
        | usage_metadata(summary.usage)
    )
    return summary


@dg.graph_asset(partitions_def=evaluation_partitions, group_name=GROUP, kinds={"parquet"}, code_version="2")
def prompt_evaluation() -> sharded_evaluation.EvaluationSummary:
    """One prompt version (a study's seed or an accepted prompt) scored on one dataset file of
    the datasets location: the rows split into shards that run as separate steps (on Celery
    workers, at once, within the "llm" pool's limit), each streamed in chunks into its Parquet
    part file, then one summary."""
    results = plan_evaluation_shards().map(evaluate_evaluation_shard).collect()
    return merge_evaluation_shards(results)


def _warn_not_applicable(
    context: dg.OpExecutionContext, summary: sharded_evaluation.EvaluationSummary, dataset_uri: str
) -> None:
    sidecar = as_path(evaluation_catalog.sidecar_uri(dataset_uri)).name
    context.log.warning(
        f"prompt version {summary.prompt_version} is not applicable to dataset {summary.dataset}: it needs "
        f"column(s) {summary.missing_columns} (its template and its reference column), the dataset has "
        f"{summary.dataset_columns}; recorded as not applicable, nothing evaluated. To evaluate it, add a "
        f"sidecar {sidecar} that renames the file's columns "
        "(columns: {file column: study column}) or names the reference_column."
    )


def _not_applicable_metadata(summary: sharded_evaluation.EvaluationSummary) -> dict[str, object]:
    """The metadata of a prompt version the dataset lacks columns for: no score, why not."""
    return {
        "applicable": False,
        "status": summary.status(),
        "missing_columns": summary.missing_columns,
        "dataset_columns": summary.dataset_columns,
        "target_metric": summary.target_metric,
        "study": summary.study,
        "prompt_id": summary.prompt_id,
        "dataset": summary.dataset,
        "rows": 0,
    }


@dg.asset(deps=[prompt_evaluation], group_name=GROUP, kinds={"pandas"})
def evaluation_comparison(
    context: dg.AssetExecutionContext, prompt_store: PromptStoreResource
) -> dg.MaterializeResult:
    """Every evaluation in one table: prompt version x dataset x metric (refreshed by
    evaluation_comparison_sensor after evaluations land)."""
    summaries = version_comparison.load_summaries(prompt_store.store.root)
    frame = version_comparison.comparison_frame(summaries)
    pivot = version_comparison.comparison_pivot(frame)
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("prompt_version", "string", description="<study>:<prompt id>"),
            dg.TableColumn("dataset", "string"),
            dg.TableColumn("metric", "string"),
            dg.TableColumn(
                "value", "float", description="mean over the dataset's rows; blank when not applicable"
            ),
            dg.TableColumn(
                "status",
                "string",
                description="scored, or not applicable: the columns the prompt version needs that the "
                "dataset lacks",
            ),
            dg.TableColumn("rows", "int"),
            dg.TableColumn("target", "bool", description="the study's target metric"),
        ]
    )
    records = [
        dg.TableRecord({k: table_value(v) for k, v in r.items()}) for r in frame.to_dict(orient="records")
    ]
    context.log.info(f"{len(summaries)} evaluations, {len(frame)} scores")
    return dg.MaterializeResult(
        metadata={
            "evaluations": len(summaries),
            "not_applicable": sum(not s.applicable for s in summaries),
            "prompt_versions": int(frame["prompt_version"].nunique()) if len(frame) else 0,
            "datasets": int(frame["dataset"].nunique()) if len(frame) else 0,
            "comparison": dg.MetadataValue.table(records=records, schema=schema),
            "by_prompt_version": dg.MetadataValue.md(
                pivot.to_markdown(index=False, disable_numparse=True)
                if len(pivot)
                else "(no evaluations yet)"
            ),
        }
    )


BACKFILL_ASSETS = [prompt_evaluation, evaluation_comparison]
