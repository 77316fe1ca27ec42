"""What a `dagster-celery` worker imports in its main process, before it forks the pool processes
that run steps (the `imports` setting of deploy/celery/worker.yaml).

A pool process that imports these itself spends about 8 CPU seconds the first time it runs each
kind of step; forked after them, every pool process of the worker shares one copy. The list is
the code location and what its steps import lazily: the metric modules (`evaluate`), MLflow, the
Vertex client, the GCS filesystem and the meta-model's scikit-learn and skops. Importing them
starts no thread and opens no connection or file that a fork would share.
"""

from __future__ import annotations

import aiohttp  # noqa: F401
import gcsfs  # noqa: F401
import mlflow  # noqa: F401
import scipy.stats  # noqa: F401
import sklearn.compose  # noqa: F401
import sklearn.ensemble  # noqa: F401
import sklearn.feature_extraction.text  # noqa: F401
import sklearn.linear_model  # noqa: F401
import sklearn.model_selection  # noqa: F401
import sklearn.pipeline  # noqa: F401
import sklearn.preprocessing  # noqa: F401
import skops.io  # noqa: F401
from google import genai  # noqa: F401

import promptopt_dagster.definitions  # noqa: F401
import promptopt_dagster.llm.vertex  # noqa: F401
from promptopt_dagster.core.metrics import available_metrics, load_metric

for _name in available_metrics():
    load_metric(_name)
