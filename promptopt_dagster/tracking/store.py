"""What each tracker call does against a live MLflow store, through `MlflowClient`: `LiveStore`,
the operations the outbox may replay (`OPS`), and here the experiments and runs, each created
once. Its other parts: the client and the creation lock (`connection.py`), the writes into a run
(`run_contents.py`), the Prompt Registry (`registry.py`), traces (`traces.write_trace`).

These operations run when MLflow answers and again when the outbox replays a queued call, so
every argument is JSON-friendly (or has a JSON form) and every run creation is idempotent.
Processes that log the same run at once end up with one run: a file lock beside a local store,
and on every store a convergent rule (tag ``promptopt.created_ns``).

Details: docs/architecture.md, 'Inside the rooms'.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any, TypedDict, Unpack

from promptopt_dagster.core.prompt_store import iteration_key
from promptopt_dagster.tracking.errors import TrackingError
from promptopt_dagster.tracking.layout import (
    EXPERIMENT_NOTE_TAG,
    TAG_CANDIDATE,
    TAG_CREATED,
    TAG_ITERATION,
    TAG_KEY,
    TAG_KIND,
    TAG_STUDY,
    experiment_name,
    experiment_note,
    runs_view_tag,
)
from promptopt_dagster.tracking.registry import PromptRegistry
from promptopt_dagster.tracking.run_contents import RunContents

logger = logging.getLogger(__name__)

# The operations the outbox may replay, by name (the names stored in queued entries).
OPS = (
    "iteration_run",
    "keyed_run",
    "candidate_run",
    "log_metrics",
    "log_params",
    "set_tags",
    "log_text",
    "log_table",
    "end_run",
    "log_sklearn_model",
    "register_prompt",
    "set_champion",
    "log_trace",
)

# How many runs of one identity a search returns: duplicates are rare, a few at most.
MAX_SAME_IDENTITY = 50
# A run is created with this stamp and stamped with the time right after; a process that died
# in between leaves it pending, and after this long it is deleted.
STAMP_PENDING = "pending"
STAMP_WAIT_S = 10.0


def _creation_order(run: Any) -> tuple[int, str]:
    """The order that picks the canonical run among runs of one identity: the creation stamp
    (runs from before the stamp existed: their start time), then the run id."""
    stamp = run.data.tags.get(TAG_CREATED)
    return (
        int(stamp) if stamp and stamp.isdigit() else int(run.info.start_time or 0) * 1_000_000,
        run.info.run_id,
    )


class RunFields(TypedDict, total=False):
    """What a run call sets besides the run's identity: MLflow-safe params and tags, and when the
    run's work started (epoch milliseconds; used only when the run is created)."""

    params: dict[str, str]
    tags: dict[str, str]
    start_time_ms: int


class LiveStore(RunContents, PromptRegistry):
    """The `MlflowClient` of one tracking URI, and the operations the tracker runs through it."""

    def __init__(self, tracking_uri: str, registry_uri: str, artifact_root: str | None) -> None:
        super().__init__(tracking_uri, registry_uri, artifact_root)
        self._experiments: dict[str, str] = {}
        self.run_experiments: dict[str, str] = {}  # run id -> experiment id, as seen so far

    def execute(self, op: str, args: dict[str, Any]) -> Any:
        """Run operation `op` (one of `OPS`) with `args`."""
        if op not in OPS:
            raise TrackingError(f"unknown MLflow operation {op!r}")
        return getattr(self, op)(**args)

    # --- experiments ---------------------------------------------------------------------------

    def experiment_id(self, study: str) -> str:
        """The study's experiment id (created if missing)."""
        from mlflow.exceptions import MlflowException

        if study in self._experiments:
            return self._experiments[study]
        name = experiment_name(study)
        with self.creating():
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                location = f"{self.artifact_root.rstrip('/')}/{study}" if self.artifact_root else None
                try:
                    exp_id = self.client.create_experiment(
                        name, artifact_location=location, tags={TAG_STUDY: study}
                    )
                except MlflowException:  # created meanwhile by another process (names are unique)
                    exp = self.client.get_experiment_by_name(name)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            else:
                exp_id = exp.experiment_id
            self._describe_experiment(study, exp_id, {} if exp is None else dict(exp.tags))
        self._experiments[study] = exp_id
        return exp_id

    def _describe_experiment(self, study: str, exp_id: str, tags: Mapping[str, str]) -> None:
        """The saved runs-table view (rewritten when its state changed) and, unless someone wrote
        one, the experiment's description."""
        key, value = runs_view_tag(int(time.time() * 1000))
        try:
            current = json.loads(tags.get(key, "{}")).get("state")
        except ValueError:
            current = None
        if current != json.loads(value)["state"]:
            self._set_experiment_tag(exp_id, key, value)
        if EXPERIMENT_NOTE_TAG not in tags:
            self._set_experiment_tag(exp_id, EXPERIMENT_NOTE_TAG, experiment_note(study))

    def _set_experiment_tag(self, exp_id: str, key: str, value: str) -> None:
        """Set an experiment tag; when another process inserts the same tag at the same moment,
        the store refuses one insert (a unique-key error) and the tag it wrote stays."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_experiment_tag(exp_id, key, value)
        except MlflowException:
            if key not in self.client.get_experiment(exp_id).tags:
                raise

    def experiment_of(self, run_id: str) -> str:
        """The experiment id of a run (remembered once seen)."""
        if run_id not in self.run_experiments:
            self.run_experiments[run_id] = self.client.get_run(run_id).info.experiment_id
        return self.run_experiments[run_id]

    # --- runs ----------------------------------------------------------------------------------

    def _find_run(self, experiment_id: str, tags: Mapping[str, str]) -> str | None:
        """The canonical active run tagged `tags` (module docstring), or None. Runs still being
        created (stamp ``pending``) are waited for; one still pending after `STAMP_WAIT_S` was
        left by a process that died between its two calls, and is deleted."""
        clauses = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        deadline, delay = time.monotonic() + STAMP_WAIT_S, 0.01
        while True:
            runs = self.client.search_runs(
                [experiment_id], filter_string=clauses, max_results=MAX_SAME_IDENTITY
            )
            pending = [r for r in runs if r.data.tags.get(TAG_CREATED) == STAMP_PENDING]
            if not pending:
                break
            if time.monotonic() > deadline:
                for run in pending:
                    logger.warning("deleting run %s, left half-created by a process", run.info.run_id)
                    self._delete_run(run.info.run_id)
                left = {r.info.run_id for r in pending}
                runs = [r for r in runs if r.info.run_id not in left]
                break
            time.sleep(delay)  # another process's next call, which no event announces
            delay = min(delay * 2, 0.2)
        return min(runs, key=_creation_order).info.run_id if runs else None

    def _delete_run(self, run_id: str) -> None:
        """Delete a duplicate or abandoned run; one another process deleted first stays deleted."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.delete_run(run_id)
        except MlflowException:
            if self.client.get_run(run_id).info.lifecycle_stage != "deleted":
                raise

    def _create_run(
        self,
        exp_id: str,
        ident: Mapping[str, str],
        run_name: str,
        tags: dict[str, str],
        start_time_ms: int | None,
    ) -> tuple[str, bool]:
        """Create the run of `ident` and stamp it; the canonical run of `ident` afterwards (our
        run deleted if it is not that one), and whether it is ours."""
        from mlflow.exceptions import MlflowException

        mine = self.client.create_run(
            exp_id, start_time=start_time_ms, run_name=run_name, tags={**tags, TAG_CREATED: STAMP_PENDING}
        ).info.run_id
        try:
            # read after the run became visible: any run that a search does not show yet gets a later stamp
            self.client.set_tag(mine, TAG_CREATED, str(time.time_ns()))
        except MlflowException:  # deleted meanwhile as left half-created: another run is canonical
            canonical = self._find_run(exp_id, ident)
            return (canonical, False) if canonical else (mine, True)
        canonical = self._find_run(exp_id, ident) or mine
        if canonical != mine:
            self._delete_run(mine)
            logger.info(
                "another process created run %s for the same %s at the same time; deleted the duplicate %s",
                canonical,
                ", ".join(f"{k}={v}" for k, v in ident.items() if k != TAG_KIND),
                mine,
            )
        return canonical, canonical == mine

    def _find_or_create_run(
        self,
        exp_id: str,
        ident: dict[str, str],
        run_name: str,
        run: RunFields,
        inherited: Mapping[str, str] | None = None,
    ) -> str:
        """The run tagged `ident` (created with `inherited`, the run's tags and `ident`, starting at
        its `start_time_ms` or now, if missing); its tags are set and new params logged either way.
        MLflow cannot move the start of an existing run, so `start_time_ms` applies at creation.
        Atomic on local stores, convergent on servers (module docstring)."""
        params, tags = run.get("params") or {}, run.get("tags") or {}
        with self.creating():
            run_id = self._find_run(exp_id, ident)
            ours = False
            if run_id is None:
                tags_at_creation = {**(inherited or {}), **tags, **ident}
                run_id, ours = self._create_run(
                    exp_id, ident, run_name, tags_at_creation, run.get("start_time_ms")
                )
        if not ours and tags:
            self.set_tags(run_id, tags)
        self.run_experiments[run_id] = exp_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def iteration_run(self, study: str, iteration: int, **run: Unpack[RunFields]) -> str:
        key = iteration_key(iteration)
        ident = {TAG_KIND: "iteration", TAG_STUDY: study, TAG_ITERATION: key}
        return self._find_or_create_run(self.experiment_id(study), ident, f"iteration-{key}", run)

    def keyed_run(self, study: str, key: str, **run: Unpack[RunFields]) -> str:
        ident = {TAG_KIND: "keyed", TAG_STUDY: study, TAG_KEY: key}
        return self._find_or_create_run(self.experiment_id(study), ident, key, run)

    def candidate_run(self, parent_run_id: str, candidate_id: str, **run: Unpack[RunFields]) -> str:
        parent = self.client.get_run(parent_run_id)
        ident = {TAG_KIND: "candidate", "mlflow.parentRunId": parent_run_id, TAG_CANDIDATE: candidate_id}
        inherited = {k: v for k, v in parent.data.tags.items() if k in (TAG_STUDY, TAG_ITERATION)}
        return self._find_or_create_run(
            parent.info.experiment_id, ident, f"candidate-{candidate_id}", run, inherited
        )

    def end_run(self, run_id: str, status: str, end_time_ms: int) -> None:
        self.client.set_terminated(run_id, status=status, end_time=end_time_ms)

    # --- traces --------------------------------------------------------------------------------

    def log_trace(self, run_id: str, key: str, trace: dict[str, Any]) -> str | None:
        from promptopt_dagster.tracking.traces import write_trace

        return write_trace(self, self.experiment_of(run_id), run_id, key, trace)
