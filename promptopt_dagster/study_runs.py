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

from promptopt_dagster.partitions import parse_key

DECISION = dg.AssetKey("iteration_decision")
REPORT = dg.AssetKey("study_report")
REGISTRATION = "registration"  # materialization metadata key


@dataclass(frozen=True)
class Decision:
    iteration: int
    stop: bool
    stop_message: str


def _latest_metadata(
    instance: dg.DagsterInstance, asset: dg.AssetKey, partitions: list[str]
) -> dict[str, dg.MetadataValue]:
    """The metadata of the latest materialization of `asset` in any of `partitions`."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=partitions), limit=1
    ).records
    materialization = records[0].asset_materialization if records else None
    return dict(materialization.metadata) if materialization else {}


def _belongs(meta: dict[str, dg.MetadataValue], registration: str) -> bool:
    value = meta.get(REGISTRATION)
    return value is not None and value.value == registration


def materialized_iterations(instance: dg.DagsterInstance) -> dict[str, dict[int, list[str]]]:
    """Iterations with a materialized decision, per study, in any registration: iteration ->
    the partition keys its decisions were materialized under (one, or an old and a new key)."""
    found: dict[str, dict[int, list[str]]] = {}
    for key in instance.get_materialized_partitions(DECISION):
        try:
            study, iteration = parse_key(key)
        except ValueError:  # not an iteration key: nothing this module wrote
            continue
        found.setdefault(study, {}).setdefault(iteration, []).append(key)
    return found


def latest_decision(
    instance: dg.DagsterInstance,
    study: str,
    registration: str,
    iterations: dict[int, list[str]] | None = None,
) -> Decision | None:
    """The highest iteration whose latest decision belongs to `registration`, or None.
    `iterations` is the study's entry of `materialized_iterations`, when the caller has it."""
    if iterations is None:
        iterations = materialized_iterations(instance).get(study, {})
    for iteration in sorted(iterations, reverse=True):
        meta = _latest_metadata(instance, DECISION, iterations[iteration])
        if _belongs(meta, registration):
            stop = bool(meta["stop"].value) if "stop" in meta else False
            message = str(meta["stop_message"].value) if "stop_message" in meta else ""
            return Decision(iteration, stop, message)
    return None


def is_reported(instance: dg.DagsterInstance, study: str, registration: str) -> bool:
    """The study report of this registration has been materialized."""
    return _belongs(_latest_metadata(instance, REPORT, [study]), registration)
