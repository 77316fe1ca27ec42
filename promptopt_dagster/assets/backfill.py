"""Evaluations of prompt versions over other datasets, and the table that compares them.

`prompt_evaluation` is partitioned by prompt version x dataset (both dynamic; the sensors at the
end of sensors.py add the keys). Backfill it from the UI over a new dataset or a new prompt
version; `evaluation_comparison` then gathers every evaluation into one table (prompt version x
dataset x metric) in its metadata. The work is core/dataset_evaluation.py; this file only
translates.
"""

import dagster as dg

from promptopt_dagster.assets.common import prompt_markdown, usage_metadata
from promptopt_dagster.core import dataset_evaluation
from promptopt_dagster.core.scoring import evaluator_for
from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.partitions import evaluation_partitions, parse_evaluation_key
from promptopt_dagster.resources import LLMResource, PromptStoreResource
from promptopt_dagster.storage import as_path, join

GROUP = "backfill"


class DatasetsResource(dg.ConfigurableResource):
    """The datasets location (a folder or gs:// prefix; settings DATASETS_URI) and how it is used."""

    uri: str
    auto_evaluate: bool = False  # sensors launch evaluations themselves (else: backfill from the UI)
    chunk_rows: int = dataset_evaluation.DEFAULT_CHUNK_ROWS  # rows per chunk; bounds an evaluation's memory

    def files(self) -> dict[str, str]:
        return dataset_evaluation.list_datasets(self.uri)

    def inspect(self, name: str) -> dataset_evaluation.DatasetInfo:
        return dataset_evaluation.inspect_dataset(name, join(self.uri, name))


@dg.asset(
    partitions_def=evaluation_partitions,
    group_name=GROUP,
    kinds={"parquet"},
    code_version="1",
)
def prompt_evaluation(
    context: dg.AssetExecutionContext,
    llm: LLMResource,
    prompt_store: PromptStoreResource,
    datasets: DatasetsResource,
) -> dg.MaterializeResult:
    """One prompt version (a study's seed or an accepted prompt) scored on one dataset file of
    the datasets location, streamed in chunks; predictions go to Parquet in the store."""
    version, dataset = parse_evaluation_key(context.partition_key)
    store = prompt_store.store
    try:
        study_name, prompt_id = dataset_evaluation.parse_prompt_version(version)
        study = store.load_study(study_name)
        prompt = store.load_prompt(study_name, prompt_id)
        info = datasets.inspect(dataset)
        missing = dataset_evaluation.missing_columns(prompt, study, info)
        if missing:
            raise dg.Failure(
                description=(
                    f"Dataset {dataset} lacks column(s) {missing} that prompt version {version} needs "
                    f"(its template uses {sorted(prompt.placeholders())}, its reference column is "
                    f"{dataset_evaluation.reference_for(study, info.spec)!r}); the dataset has "
                    f"{info.columns}. Backfill this prompt version only over datasets with those columns, "
                    f"or add a sidecar {as_path(dataset_evaluation.sidecar_uri(info.uri)).name} that "
                    "renames columns."
                ),
                metadata={"missing_columns": missing, "dataset_columns": info.columns},
                allow_retries=False,
            )
        summary = dataset_evaluation.evaluate_dataset(
            llm.primary(study),
            evaluator_for(study),
            study,
            prompt,
            info,
            dataset_evaluation.evaluation_dir(store.root, version, dataset),
            version,
            chunk_rows=datasets.chunk_rows,
            progress=context.log.info,
        )
    except PromptoptError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.MaterializeResult(
        metadata={
            "study": study.name,
            "prompt_id": prompt.id,
            "dataset": dataset,
            "rows": summary.rows,
            "failed_rows": summary.failed_rows,
            "score": dg.MetadataValue.float(summary.scores[summary.target_metric]),
            "target_metric": summary.target_metric,
            **{f"score_{m}": dg.MetadataValue.float(v) for m, v in summary.scores.items()},
            "chunks": summary.chunks,
            "predictions": dg.MetadataValue.path(summary.predictions_uri),
            "prompt": prompt_markdown(prompt.system_prompt, prompt.output_prompt),
        }
        | usage_metadata(summary.usage)
    )


@dg.asset(deps=[prompt_evaluation], group_name=GROUP, kinds={"pandas"})
def evaluation_comparison(
    context: dg.AssetExecutionContext, prompt_store: PromptStoreResource
) -> dg.MaterializeResult:
    """Every evaluation in one table: prompt version x dataset x metric (refreshed by
    evaluation_comparison_sensor after evaluations land)."""
    summaries = dataset_evaluation.load_summaries(prompt_store.store.root)
    frame = dataset_evaluation.comparison_frame(summaries)
    pivot = dataset_evaluation.comparison_pivot(frame)
    schema = dg.TableSchema(
        columns=[
            dg.TableColumn("prompt_version", "string"),
            dg.TableColumn("study", "string"),
            dg.TableColumn("dataset", "string"),
            dg.TableColumn("metric", "string"),
            dg.TableColumn("value", "float"),
            dg.TableColumn("rows", "int"),
            dg.TableColumn("target", "bool"),
        ]
    )
    records = [dg.TableRecord(r) for r in frame.to_dict(orient="records")]
    context.log.info(f"{len(summaries)} evaluations, {len(frame)} scores")
    return dg.MaterializeResult(
        metadata={
            "evaluations": len(summaries),
            "prompt_versions": int(frame["prompt_version"].nunique()) if len(frame) else 0,
            "datasets": int(frame["dataset"].nunique()) if len(frame) else 0,
            "comparison": dg.MetadataValue.table(records=records, schema=schema),
            "by_prompt_version": dg.MetadataValue.md(
                pivot.to_markdown(index=False, floatfmt=".3f") if len(pivot) else "(no evaluations yet)"
            ),
        }
    )


BACKFILL_ASSETS = [prompt_evaluation, evaluation_comparison]
