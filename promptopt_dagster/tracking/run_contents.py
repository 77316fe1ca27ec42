"""What the tracker writes into a run that exists: metrics, params, tags, text and table
artifacts, scikit-learn models. Nothing here creates a run (`store.py` does, once), so these
writes only have to survive another process writing the same run at the same moment.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import tempfile
from io import StringIO
from pathlib import Path
from typing import Any

import pandas as pd

from promptopt_dagster.tracking.connection import StoreConnection, mlflow_global_uris
from promptopt_dagster.tracking.layout import MAX_METRICS_PER_BATCH, MAX_PARAMS_PER_BATCH

logger = logging.getLogger(__name__)


def default_pip_requirements() -> list[str]:
    """Pinned requirements for a logged scikit-learn model, from the installed versions."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("scikit-learn", "numpy", "pandas", "scipy", "mlflow")]


class RunContents(StoreConnection):
    """The writes into an existing run of the live store (`store.LiveStore` has them all)."""

    # --- metrics, params, tags -----------------------------------------------------------------

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int) -> None:
        from mlflow.entities import Metric

        items = [Metric(k, v, timestamp_ms, step) for k, v in metrics.items() if not math.isnan(v)]
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=items[i : i + MAX_METRICS_PER_BATCH])

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning(
                "run %s already has param(s) %s with other values; MLflow params are immutable, "
                "so they keep their first value",
                run_id,
                ", ".join(changed),
            )
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), MAX_PARAMS_PER_BATCH):
            self._log_new_params(run_id, new[i : i + MAX_PARAMS_PER_BATCH])

    def _log_new_params(self, run_id: str, batch: list[Any]) -> None:
        """Log `batch`; when another process logs the same run's params at the same moment, the
        store refuses the batch (a unique-key error): the params still missing are logged again."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_batch(run_id, params=batch)
        except MlflowException:
            existing = self.client.get_run(run_id).data.params
            missing = [p for p in batch if p.key not in existing]
            if len(missing) == len(batch):
                raise
            if missing:
                self.client.log_batch(run_id, params=missing)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=items[i : i + MAX_PARAMS_PER_BATCH])

    # --- artifacts -----------------------------------------------------------------------------

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_table(
        self, run_id: str, artifact_file: str, df: pd.DataFrame | None = None, table_json: str | None = None
    ) -> None:
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

        if df is None:
            df = pd.read_json(StringIO(table_json or ""), orient="split")
        directory, filename = posixpath.split(posixpath.normpath(artifact_file))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / filename
            if filename.endswith(".json"):
                df.to_json(path, orient="split", index=False, date_format="iso")
            else:
                df.to_parquet(path, index=False)
            self.client.log_artifact(run_id, str(path), directory or None)
        # The tag MLflow's UI reads to show the artifact as a table (as MlflowClient.log_table does).
        logged = json.loads(self.client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in logged:
            self.client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))

    def log_sklearn_model(
        self,
        run_id: str,
        name: str,
        pip_requirements: list[str],
        model: Any = None,
        model_path: str | None = None,
    ) -> None:
        import mlflow.sklearn

        if model is None:
            import joblib

            model = joblib.load(model_path)  # our own file, written when the call was queued
        # The fluent API would file the model under the *active* experiment (default "0"); create
        # the LoggedModel in the run's experiment first and hand its id over.
        experiment_id = self.client.get_run(run_id).info.experiment_id
        logged = self.client.create_logged_model(
            experiment_id=experiment_id, name=name, source_run_id=run_id, model_type="sklearn"
        )
        with mlflow_global_uris(self.tracking_uri, self.registry_uri):
            mlflow.sklearn.log_model(
                model, name=name, pip_requirements=pip_requirements, run_id=run_id, model_id=logged.model_id
            )
        if model_path:
            Path(model_path).unlink(missing_ok=True)
