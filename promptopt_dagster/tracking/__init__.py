"""MLflow tracking: the tracker with its offline outbox, and what each iteration logs.

Sits above `core/` and `optimizer/` (it reads their records) and below the Dagster wiring;
nothing in `core/` or `optimizer/` imports it.
"""

from promptopt_dagster.tracking.client import MlflowTracker
from promptopt_dagster.tracking.connection import mlflow_global_uris
from promptopt_dagster.tracking.errors import TrackingError
from promptopt_dagster.tracking.iteration_log import (
    IterationLog,
    LoggedIteration,
    build_iteration_log,
    log_iteration,
)
from promptopt_dagster.tracking.layout import CHAMPION_ALIAS, TAG_PROMPT_ID, experiment_name, prompt_name
from promptopt_dagster.tracking.outbox import PENDING_PREFIX
from promptopt_dagster.tracking.registry import RegisteredPrompt

__all__ = [
    "CHAMPION_ALIAS",
    "PENDING_PREFIX",
    "TAG_PROMPT_ID",
    "IterationLog",
    "LoggedIteration",
    "MlflowTracker",
    "RegisteredPrompt",
    "TrackingError",
    "build_iteration_log",
    "experiment_name",
    "log_iteration",
    "mlflow_global_uris",
    "prompt_name",
]
