"""EvaluatorService: score predictions against references with Hugging Face `evaluate` metrics.

The metrics are local `evaluate` modules shipped in `promptopt_dagster/metrics/<name>/<name>.py`
(the Hub is not reachable at run time). Each returns its aggregate under its own name and one
score per row under ``scores``; this service turns that into a `MetricResult`.

Conventions:

- predictions are compared after ``.strip()``; ``None`` counts as an empty prediction;
- empty input is not an error: the result has ``n == 0``, no aggregates and an empty per-row
  frame (with one column per metric). A score of 0.0 for "nothing measured" would be a lie that
  decisions could act on, so callers that need a number must check ``n`` first;
- loaded modules are cached per process, since `evaluate.load` costs tens of milliseconds and the
  `evaluate` import about two seconds; both wait for the first score (or an option check), so a
  process that only validates a study, like `promptopt run` whose steps run on Celery workers,
  never imports `evaluate`.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from promptopt_dagster.errors import MetricError

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"

_modules: dict[str, Any] = {}
_locks: dict[str, threading.Lock] = {}
_load_lock = threading.Lock()


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with the package, sorted."""
    if not METRICS_DIR.is_dir():
        return []
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def _unknown(name: str) -> MetricError:
    return MetricError(
        f"unknown metric {name!r}; available metrics: {', '.join(available_metrics())}. "
        "Fix target_metric / metrics in the study file."
    )


def load_metric(name: str) -> Any:
    """The `evaluate` module for `name`, loaded once per process. A loaded one is returned
    before the metrics folder is listed again: every `EvaluatorService.evaluate` call asks."""
    module = _modules.get(name)
    if module is not None:
        return module
    if name not in available_metrics():
        raise _unknown(name)
    with _load_lock:
        if name not in _modules:
            import evaluate

            try:
                # keep_in_memory: no Arrow cache files (faster, and no lock files to clash over).
                _modules[name] = evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)
            except Exception as exc:  # evaluate raises many kinds; all mean "cannot load"
                raise MetricError(
                    f"could not load metric {name!r} from {METRICS_DIR / name}: {type(exc).__name__}: {exc}. "
                    "Reinstall promptopt_dagster (the metric modules ship with it)."
                ) from exc
            _locks[name] = threading.Lock()
    return _modules[name]


def metric_option_names(name: str) -> list[str]:
    """Keyword options the metric's `_compute` accepts (for validating study files)."""
    params = inspect.signature(load_metric(name)._compute).parameters
    return [p for p in params if p not in ("self", "predictions", "references")]


@dataclass
class MetricResult:
    """Aggregates per metric (e.g. ``{"exact_match": 0.75}``) and per-row scores, one column per
    metric and one row per prediction, in prediction order."""

    aggregates: dict[str, float]
    per_row: pd.DataFrame
    n: int = 0
    metrics: list[str] = field(default_factory=list)


class EvaluatorService:
    """A fixed set of metrics with their options, keeping the original API's name EvaluatorService.
    Unknown metrics and unknown options fail here, at construction, not mid-study; the modules
    themselves load on the first `evaluate` (checking options loads the metrics that have some)."""

    def __init__(self, metric_names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None = None):
        names = list(dict.fromkeys(metric_names))
        if not names:
            raise MetricError("no metrics given; name at least one of: " + ", ".join(available_metrics()))
        for name in names:
            if name not in available_metrics():
                raise _unknown(name)
        options = dict(options or {})
        for name, opts in options.items():
            if name not in names:
                raise MetricError(
                    f"metric_options names {name!r}, which is not among the study's metrics {names}; "
                    "add it to metrics or remove its options"
                )
            allowed = metric_option_names(name)
            bad = sorted(set(opts) - set(allowed))
            if bad:
                raise MetricError(
                    f"metric {name!r} has no option(s) {bad}; its options are: {', '.join(allowed) or 'none'}"
                )
        self.metric_names = names
        self.options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in options.items()}

    def evaluate(self, predictions: Sequence[str | None], references: Sequence[Any]) -> MetricResult:
        """Score each prediction against its reference with every metric."""
        if len(predictions) != len(references):
            raise MetricError(
                f"got {len(predictions)} predictions but {len(references)} references; "
                "pass one reference per prediction, in the same order"
            )
        preds = ["" if p is None else str(p).strip() for p in predictions]
        refs = ["" if r is None else str(r).strip() for r in references]
        if not preds:
            empty = pd.DataFrame({name: pd.Series(dtype=float) for name in self.metric_names})
            return MetricResult(aggregates={}, per_row=empty, n=0, metrics=list(self.metric_names))
        aggregates: dict[str, float] = {}
        per_row: dict[str, list[float]] = {}
        for name in self.metric_names:
            module = load_metric(name)
            with _locks[name]:  # an evaluate module holds per-call state: one call at a time
                out = module.compute(predictions=preds, references=refs, **self.options.get(name, {}))
            aggregates[name] = float(out[name])
            per_row[name] = [float(s) for s in out["scores"]]
        frame = pd.DataFrame(per_row)
        return MetricResult(aggregates, frame, n=len(preds), metrics=list(self.metric_names))
