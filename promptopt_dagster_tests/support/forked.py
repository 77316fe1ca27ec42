"""Run a function in a child forked from the test process: for code whose state must not cross
a fork (pooled database connections)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable

TIMEOUT_S = 60.0


def _report(work: Callable[[], object], out: multiprocessing.Queue[object]) -> None:
    try:
        out.put(work())
    except BaseException as exc:  # reported to the parent, which asserts on it
        out.put(repr(exc))


def in_forked_child(work: Callable[[], object], timeout: float = TIMEOUT_S) -> tuple[object, int | None]:
    """`work()`'s result (or the repr of what it raised) in a forked child, and the child's exit
    code. `work` may be a closure: a forked child needs nothing pickled but the result."""
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue[object] = ctx.Queue()
    child = ctx.Process(target=_report, args=(work, out))
    child.start()
    answer = out.get(timeout=timeout)
    child.join(timeout=timeout)
    return answer, child.exitcode
