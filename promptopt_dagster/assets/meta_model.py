"""The meta-model, retrained after every iteration on the history of every study.

Why an iteration partition of the iteration job, rather than one unpartitioned asset with
an AllPartitionMapping and an AutomationCondition: the automation condition is evaluated only by
the daemon of `dagster dev`, and the headless driver (`promptopt run`) ticks the study sensors
only, so the model would never be refreshed there. As a step of the iteration job it is
retrained as soon as an iteration lands, in both, and the next iteration's `candidate_prompts`
finds it in the prompt store (`<root>/meta_model/`). Each partition is "the model as it was
after that iteration"; all are trained on the whole history across studies.
"""

from typing import Any

import dagster as dg
from pydantic import BaseModel, Field

from promptopt_dagster.assets.common import iteration_asset, study_iteration
from promptopt_dagster.assets.metadata import number
from promptopt_dagster.assets.tracking import dagster_tags
from promptopt_dagster.core.meta_model import MetaModel, history_from_store, save_to_store, training_frame
from promptopt_dagster.core.prompt_store import iteration_key
from promptopt_dagster.redaction import redact
from promptopt_dagster.resources import MetaModelResource, MlflowTrackerResource, PromptStoreResource

EXPERIMENT = "meta-model"  # MLflow experiment promptopt/meta-model, one run per fit


class MetaModelFit(BaseModel):
    """One fit of the meta-model: its cross-validation and whether the optimizer will use it."""

    status: str  # the cross-validation's status, or "no history" before any candidate was scored
    n_rows: int  # scored candidates it was trained on
    useful: bool = False  # cleared META_MODEL_MIN_SPEARMAN: the optimizer ranks with it
    cv: dict[str, Any] = Field(default_factory=dict)


@iteration_asset(kinds={"sklearn", "mlflow"}, deps=["iteration_decision"])
def meta_model(
    context: dg.AssetExecutionContext,
    prompt_store: PromptStoreResource,
    mlflow: MlflowTrackerResource,
    meta_model_policy: MetaModelResource,
) -> MetaModelFit:
    """Predicts a candidate's minibatch score from its text; cross-validated (GroupKFold by
    study) and trusted by the optimizer only above META_MODEL_MIN_SPEARMAN."""
    study, iteration = study_iteration(context, prompt_store)
    store = prompt_store.store
    history = history_from_store(store)
    if history.empty:
        context.add_output_metadata({"status": "no scored candidates yet"})
        return MetaModelFit(status="no history", n_rows=0)
    model = MetaModel(meta_model_policy.estimator).fit(training_frame(history))
    cv = model.cross_validate()
    useful = model.is_useful(meta_model_policy.min_spearman)
    info = {
        "useful": useful,
        "min_spearman": meta_model_policy.min_spearman,
        "overgenerate": meta_model_policy.overgenerate,
        "keep_fraction": meta_model_policy.keep_fraction,
        "trained_after": f"{study.name}/{iteration_key(iteration)}",
        "studies": sorted(history["study"].unique().tolist()),
    }
    folder = save_to_store(model, store.root, info)
    metadata: dict[str, dg.RawMetadataValue] = {
        "rows": len(history),
        "studies": ", ".join(info["studies"]),
        "cv_status": cv["status"],
        "cv_scheme": cv.get("scheme", "-"),
        "used_by_optimizer": useful,
        "min_spearman": number(meta_model_policy.min_spearman),
        "saved_to": folder,
    }
    for key in ("spearman", "spearman_within_study", "mae", "mae_mean_baseline"):
        if cv.get(key) is not None:
            metadata[f"cv_{key}"] = number(float(cv[key]))
    tracker = mlflow.tracker
    try:
        run_id = tracker.keyed_run(
            EXPERIMENT,
            f"{study.name}-{iteration_key(iteration)}",
            params={"trained_after": info["trained_after"], "min_spearman": meta_model_policy.min_spearman},
            tags=dagster_tags(context),
        )
        model.log_to_mlflow(tracker, run_id, step=len(history))
        tracker.log_metrics(
            run_id, {"meta_model.useful": float(useful), "meta_model.rows": float(len(history))}
        )
        tracker.end_run(run_id)
        link = mlflow.run_link(run_id)
        metadata["mlflow_run"] = dg.MetadataValue.url(link) if link else "queued (MLflow unreachable)"
    except Exception as exc:  # the model is saved; only its tracking is missing
        metadata["mlflow_status"] = f"MLflow logging failed ({type(exc).__name__}: {redact(str(exc))[:300]})"
        context.log.warning(str(metadata["mlflow_status"]))
    context.add_output_metadata(metadata)
    return MetaModelFit(status=cv["status"], n_rows=len(history), useful=useful, cv=cv)
