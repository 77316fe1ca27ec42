"""promptopt_dagster: prompt optimization as a Dagster asset graph."""

import os

# gcsfs 2026.x picks an experimental class at import time when this is unset, and every call
# then waits 60 s on a gRPC path emulators and most buckets lack. Set it before anything imports gcsfs.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

# Runs offline on one machine by default: MLflow's usage telemetry would try to reach the internet
# from every process that imports it.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
