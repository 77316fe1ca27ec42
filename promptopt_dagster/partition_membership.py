"""Dynamic partition lookups answered from memory for a few seconds.

Dagster asks its event-log storage whether a dynamic partition exists before each step's inputs
and outputs are checked: about 100 identical queries in one iteration of a study. Partitions are
added far more often than deleted, so a yes is kept for `MEMBERSHIP_TTL_S` seconds per database
and process. A delete made through this process forgets the key at once; a delete made by
another process is seen within `MEMBERSHIP_TTL_S`. A no is never kept: a partition another
process has just added is found on the next lookup.
"""

from __future__ import annotations

import threading
import time

MEMBERSHIP_TTL_S = 5.0
clock = time.monotonic  # seconds; tests move it

# (scope, partitions definition, key) -> when the storage last said it exists (monotonic s)
_seen: dict[tuple[str, str, str], float] = {}
_lock = threading.Lock()


def forget_partitions(scope: str | None = None) -> None:
    """Forget what was seen, for one database (`scope`) or all."""
    with _lock:
        for key in [k for k in _seen if scope is None or k[0] == scope]:
            del _seen[key]


class PartitionMembershipCache:
    """Mixin for a Dagster event-log storage; `membership_scope` names its database."""

    def membership_scope(self) -> str:
        raise NotImplementedError

    def has_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> bool:
        key = (self.membership_scope(), partitions_def_name, partition_key)
        now = clock()
        with _lock:
            seen = _seen.get(key)
        if seen is not None and now - seen < MEMBERSHIP_TTL_S:
            return True
        exists = bool(super().has_dynamic_partition(partitions_def_name, partition_key))  # type: ignore[misc]
        with _lock:
            if exists:
                _seen[key] = now
            else:
                _seen.pop(key, None)
        return exists

    def delete_dynamic_partition(self, partitions_def_name: str, partition_key: str) -> None:
        super().delete_dynamic_partition(partitions_def_name, partition_key)  # type: ignore[misc]
        with _lock:  # after the delete: a lookup that ran during it may have kept a yes
            _seen.pop((self.membership_scope(), partitions_def_name, partition_key), None)

    def wipe(self) -> None:
        forget_partitions(self.membership_scope())
        super().wipe()  # type: ignore[misc]
