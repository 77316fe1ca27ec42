"""What the Dagster instance says about the current registration of a study: its latest
decision, whether it stopped, whether its report exists.

Dagster's SQL event log storages (SQLite and Postgres) cannot wipe a partition's
materializations, so a forgotten study's history stays in the instance. Each decision and report
carries the registration id of the study it belongs to, and only those of the current
registration count: a study registered again starts from nothing, whatever the history holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from promptopt_dagster.partitions import parse_key, study_iteration_key

DECISION = dg.AssetKey("iteration_decision")
REPORT = dg.AssetKey("study_report")
REGISTRATION = "registration"  # materialization metadata key


@dataclass(frozen=True)
class Decision:
    iteration: int
    stop: bool
    stop_message: str


def _latest_metadata(
    instance: dg.DagsterInstance, asset: dg.AssetKey, partition: str
) -> dict[str, dg.MetadataValue]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[partition]), limit=1
    ).records
    materialization = records[0].asset_materialization if records else None
    return dict(materialization.metadata) if materialization else {}


def _belongs(meta: dict[str, dg.MetadataValue], registration: str) -> bool:
    value = meta.get(REGISTRATION)
    return value is not None and value.value == registration


def materialized_iterations(instance: dg.DagsterInstance) -> dict[str, list[int]]:
    """Iterations with a materialized decision, per study, in any registration."""
    found: dict[str, list[int]] = {}
    for key in instance.get_materialized_partitions(DECISION):
        study, iteration = parse_key(key)
        found.setdefault(study, []).append(iteration)
    return found


def latest_decision(
    instance: dg.DagsterInstance, study: str, registration: str, iterations: list[int] | None = None
) -> Decision | None:
    """The highest iteration whose latest decision belongs to `registration`, or None."""
    if iterations is None:
        iterations = materialized_iterations(instance).get(study, [])
    for iteration in sorted(iterations, reverse=True):
        meta = _latest_metadata(instance, DECISION, str(study_iteration_key(study, iteration)))
        if _belongs(meta, registration):
            stop = bool(meta["stop"].value) if "stop" in meta else False
            message = str(meta["stop_message"].value) if "stop_message" in meta else ""
            return Decision(iteration, stop, message)
    return None


def is_reported(instance: dg.DagsterInstance, study: str, registration: str) -> bool:
    """The study report of this registration has been materialized."""
    return _belongs(_latest_metadata(instance, REPORT, study), registration)
