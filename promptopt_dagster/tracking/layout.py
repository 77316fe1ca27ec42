"""Where the pipeline's records live in MLflow, and what MLflow accepts in them.

- one experiment per study, ``promptopt/<study>``;
- one parent run per iteration, ``iteration-0003`` (tags ``promptopt.study``,
  ``promptopt.iteration``), found again by tag, so re-materializing an asset reuses it;
- one nested run per candidate prompt (tag ``mlflow.parentRunId``), also found again by tag;
- prompt versions in the MLflow Prompt Registry under ``promptopt-<study>``, as a chat template
  ``[{"role": "system", ...}, {"role": "user", ...}]``; the accepted one carries alias ``champion``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from promptopt_dagster.redaction import is_secret_key, looks_like_secret_value
from promptopt_dagster.tracking.errors import TrackingError

logger = logging.getLogger(__name__)

EXPERIMENT_PREFIX = "promptopt"
PROMPT_PREFIX = "promptopt"
CHAMPION_ALIAS = "champion"
TAG_STUDY = "promptopt.study"
TAG_ITERATION = "promptopt.iteration"
TAG_CANDIDATE = "promptopt.candidate"
TAG_KIND = "promptopt.kind"
TAG_KEY = "promptopt.key"
TAG_PROMPT_ID = "promptopt.prompt_id"
TAG_CREATED = "promptopt.created_ns"  # when the creating process asked for the run (time.time_ns)
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED", "RUNNING", "SCHEDULED")

# MLflow's own limits (mlflow.utils.validation); repeated so importing this module stays light.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000

SCORE_DECIMALS = 4

# A saved view of each study's runs table (MLflow >= 3.x reads experiment tags
# ``mlflow.sharedViewState.<id>`` holding {name, createdAt, updatedAt, state}; it is listed under
# the runs table's saved views and opened by ``#/experiments/<id>/runs?viewStateShareKey=<id>``).
# Its columns exist on every iteration run and every candidate run.
RUNS_VIEW_ID = "promptopt-iterations"
RUNS_VIEW_NAME = "promptopt: iterations"
RUNS_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_METRICS = ("val_score", "train_score", "accepted", "llm_calls")
RUNS_VIEW_TAGS = ("promptopt.strategy",)
EXPERIMENT_NOTE_TAG = "mlflow.note.content"  # the experiment's description in the UI

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,249}")


def experiment_name(study: str) -> str:
    return f"{EXPERIMENT_PREFIX}/{study}"


def prompt_name(study: str) -> str:
    """A Prompt Registry name for a study slug (letters, digits, '-', '_', '.')."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", study).strip("-") or "study"
    return f"{PROMPT_PREFIX}-{slug}"


def score_text(value: float | None) -> str:
    """A score where it is text (tags, commit messages): rounded to `SCORE_DECIMALS` decimals,
    e.g. ``0.6667``; metrics keep the full float."""
    return "" if value is None else str(round(float(value), SCORE_DECIMALS))


def runs_view_state() -> dict[str, Any]:
    """The saved view's state: newest iteration first, the columns that answer "how is the
    study doing" (duration, val and train minibatch score, accepted, LLM calls, strategy)."""
    return {
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "selectedColumns": [
            "attributes.`Duration`",
            *(f"metrics.`{m}`" for m in RUNS_VIEW_METRICS),
            *(f"tags.`{t}`" for t in RUNS_VIEW_TAGS),
        ],
    }


def runs_view_tag(now_ms: int) -> tuple[str, str]:
    """The experiment tag (key, value) that saves `runs_view_state` as a view."""
    state = json.dumps(runs_view_state(), sort_keys=True)
    envelope = {"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state}
    return RUNS_VIEW_TAG_PREFIX + RUNS_VIEW_ID, json.dumps(envelope)


def experiment_note(study: str) -> str:
    """The experiment's description: where to look in this experiment."""
    return (
        f"Study `{study}`: one run per iteration (`iteration-NNNN`, from the iteration's start to its "
        "decision), one nested run per candidate prompt. Open the saved view "
        f"**{RUNS_VIEW_NAME}** for val score, train minibatch score, accepted, LLM calls and "
        f"strategy per run; the Traces tab holds the LLM calls; prompt versions are under Prompts, "
        f"`{prompt_name(study)}`, alias `{CHAMPION_ALIAS}`."
    )


def check_id(what: str, value: str) -> None:
    """Ids go into MLflow search filters and run names, so keep them to a safe alphabet."""
    if not _SAFE_ID.fullmatch(value):
        raise TrackingError(
            f"{what} {value!r} cannot name an MLflow run: use letters, digits, '_', '-', '.', ':' (max 250)"
        )


def safe_items(values: Mapping[str, Any] | None, limit: int) -> dict[str, str]:
    """Stringify, drop secret-looking keys or values, truncate to MLflow's limits."""
    out: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in (values or {}).items():
        key = str(key)
        text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
        if is_secret_key(key) or looks_like_secret_value(text):
            dropped.append(key)
            continue
        out[key[:MAX_KEY_LENGTH]] = text if len(text) <= limit else text[: limit - 3] + "..."
    if dropped:
        logger.info("not logging %d secret-looking setting(s): %s", len(dropped), ", ".join(sorted(dropped)))
    return out
