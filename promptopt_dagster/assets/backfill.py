"""Evaluations of prompt versions over other datasets, and the table that compares them.

`prompt_evaluation` is partitioned by prompt version x dataset (both dynamic; the sensors at the
end of sensors.py add the keys). Backfill it from the UI over a new dataset or a new prompt
version; `evaluation_comparison` then gathers every evaluation into one table (prompt version x
dataset x metric) in its metadata. A prompt version whose template or reference needs a column
the dataset lacks is recorded as not applicable (a successful materialization, `applicable`
false, the missing columns named), so a backfill over "All" prompt versions ends green; an
unreadable dataset or a failing LLM fails the run. The work is core/dataset_evaluation.py; this
file only translates.
"""

import dagster as dg

from promptopt_dagster.assets.metadata import number, prompt_markdown, table_value, usage_metadata
from promptopt_dagster.core import dataset_evaluation, version_comparison
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
    pool="llm",
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
        out_dir = dataset_evaluation.evaluation_dir(store.root, version, dataset)
        if dataset_evaluation.missing_columns(prompt, study, info):
            summary = dataset_evaluation.record_not_applicable(study, prompt, info, out_dir, version)
            return _not_applicable(context, summary, info.uri)
        summary = dataset_evaluation.evaluate_dataset(
            llm.primary(study),
            evaluator_for(study),
            study,
            prompt,
            info,
            out_dir,
            version,
            chunk_rows=datasets.chunk_rows,
            progress=context.log.info,
        )
    except PromptoptError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.MaterializeResult(
        metadata={
            "applicable": True,
            "score": number(summary.scores[summary.target_metric]),
            "target_metric": summary.target_metric,
            "study": study.name,
            "prompt_id": prompt.id,
            "dataset": dataset,
            "rows": summary.rows,
            "failed_rows": summary.failed_rows,
            **{f"score_{m}": number(v) for m, v in summary.scores.items()},
            "chunks": summary.chunks,
            "predictions": dg.MetadataValue.path(summary.predictions_uri),
            "prompt": prompt_markdown(prompt.system_prompt, prompt.output_prompt),
        }
        | usage_metadata(summary.usage)
    )


def _not_applicable(
    context: dg.AssetExecutionContext, summary: dataset_evaluation.EvaluationSummary, dataset_uri: str
) -> dg.MaterializeResult:
    """The materialization of a prompt version the dataset lacks columns for: no score, why not."""
    sidecar = as_path(dataset_evaluation.sidecar_uri(dataset_uri)).name
    context.log.warning(
        f"prompt version {summary.prompt_version} is not applicable to dataset {summary.dataset}: it needs "
        f"column(s) {summary.missing_columns} (its template and its reference column), the dataset has "
        f"{summary.dataset_columns}; recorded as not applicable, nothing evaluated. To evaluate it, add a "
        f"sidecar {sidecar} that renames the file's columns "
        "(columns: {file column: study column}) or names the reference_column."
    )
    return dg.MaterializeResult(
        metadata={
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
    )


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
