"""What the iteration assets share: their decorator, the study and iteration of their partition,
the study's rows, and metadata.

Every step of an iteration needs the study's registered config and most need its rows. Within one
run they are loaded once: the config is cached per (run id, prompt store root, study), and the
rows per config object, so a run started after the study was registered again, or after its
dataset changed, loads both afresh. A direct invocation of an asset (no run) caches nothing."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import dagster as dg

from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData, load_study_data
from promptopt_dagster.partitions import parse_key, study_iteration_partitions
from promptopt_dagster.resources import PromptStoreResource

GROUP = "iteration"

# Dagster's run id of an asset invoked directly, outside any run.
_NO_RUN = "EPHEMERAL"
# A few runs at a time at most are in flight in one process (in-process executor, one run each).
_CACHE_SIZE = 8
_lock = threading.Lock()
_studies: OrderedDict[tuple[str, str, str], StudyConfig] = OrderedDict()
_data: OrderedDict[int, tuple[StudyConfig, StudyData]] = OrderedDict()


def iteration_asset(
    *, kinds: set[str], **asset_args: Any
) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """`dg.asset` for a step of an iteration: partitioned by (study, iteration) and in the group
    the iteration job selects, so no step can be left out of the job or keyed differently."""
    return dg.asset(partitions_def=study_iteration_partitions, group_name=GROUP, kinds=kinds, **asset_args)


class StudyIteration(NamedTuple):
    """The study (its registered config) and the iteration an asset's partition key names."""

    study: StudyConfig
    iteration: int


def _remember(cache: OrderedDict, key: object, value: object) -> None:  # type: ignore[type-arg]
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def study_iteration(context: dg.AssetExecutionContext, prompt_store: PromptStoreResource) -> StudyIteration:
    """The study and iteration of the asset's partition; the study is loaded once per run."""
    name, iteration = parse_key(context.partition_key)
    run_id = context.run_id
    if run_id == _NO_RUN:
        return StudyIteration(prompt_store.store.load_study(name), iteration)
    key = (run_id, prompt_store.root, name)
    with _lock:
        study = _studies.get(key)
    if study is None:
        study = prompt_store.store.load_study(name)
        with _lock:
            _remember(_studies, key, study)
    return StudyIteration(study, iteration)


def study_data(study: StudyConfig) -> StudyData:
    """The study's rows, loaded, checked and split once per config object (so once per run for
    the config `study_iteration` returns)."""
    with _lock:
        entry = _data.get(id(study))
    if entry is not None and entry[0] is study:
        return entry[1]
    data = load_study_data(study)
    with _lock:
        # The entry holds the config, so its id cannot be reused while the entry lives.
        _remember(_data, id(study), (study, data))
    return data
