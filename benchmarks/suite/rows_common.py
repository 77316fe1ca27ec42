"""What the suite's row generators share: a row, distinct rows from a generator, and ids."""

from __future__ import annotations

import random
from collections.abc import Callable

Row = dict[str, str]


def unique(rng: random.Random, n: int, make: Callable[[random.Random], Row], key: str) -> list[Row]:
    rows: list[Row] = []
    seen: set[str] = set()
    guard = 0
    while len(rows) < n:
        guard += 1
        if guard > 100 * n:
            raise RuntimeError(f"cannot make {n} distinct rows")
        row = make(rng)
        if row[key] in seen:
            continue
        seen.add(row[key])
        rows.append(row)
    return rows


def with_ids(prefix: str, rows: list[Row]) -> list[Row]:
    return [{"id": f"{prefix}-{i + 1:03d}", **row} for i, row in enumerate(rows)]
