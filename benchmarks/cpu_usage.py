"""CPU seconds spent by each kind of process while a benchmark round runs.

On a machine with few cores, orchestration and the test servers compete with each other for
CPU; a round whose processes together keep every core busy is CPU-bound, whatever its latency
bound says. A background thread reads every process's CPU time (user + system) twice a second
and keeps the last reading of each one, so processes that start and exit within the round
(drivers, step processes) are counted up to their last reading. Only this process and its
descendants are counted (other work on the machine is not), grouped by role from their command
line; the whole machine's busy time is reported apart.

    with CpuUsage(own_role="benchmark + fake Vertex server") as cpu:
        ...  # the round
    cpu.by_role()       # {"celery workers": 181.2, "drivers": 55.0, ...}
    cpu.machine_busy_s  # all cores, every process on the machine
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from types import TracebackType

import psutil

INTERVAL_S = 0.5
# First match wins; each pattern is looked for in the joined command line.
ROLES: tuple[tuple[str, str], ...] = (
    ("promptopt_dagster.cli run", "drivers (promptopt run)"),
    ("dagster-celery", "celery workers"),
    ("celery", "celery workers"),
    ("execute_run", "run workers"),
    ("gcp-storage-emulator", "GCS emulator"),
    ("redis-server", "redis"),
    ("postgres", "postgres"),
)


def role_of(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    for pattern, role in ROLES:
        if pattern in text:
            return role
    return None


class CpuUsage:
    """Samples per-process CPU time from `__enter__` to `__exit__` (see the module docstring)."""

    def __init__(self, own_role: str = "this process") -> None:
        self.own_role = own_role
        self._own = os.getpid()
        self._start: dict[tuple[int, float], float] = {}
        self._last: dict[tuple[int, float], tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-usage", daemon=True)
        self._busy_start = 0.0
        self.machine_busy_s = 0.0

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _sample(self, baseline: bool = False) -> None:
        """Record the CPU time of this process and its descendants (not other processes of the
        machine); with `baseline`, as their starting point (processes first seen later started
        within the round and start from 0)."""
        try:
            me = psutil.Process(self._own)
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
                    role = self.own_role if proc.pid == self._own else role_of(proc.cmdline())
            except psutil.Error:  # exited since listed
                continue
            if role is None:
                role = "other children"
            used = times.user + times.system
            self._start.setdefault(key, used if baseline else 0.0)
            self._last[key] = (role, used)

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            self._sample()

    def __enter__(self) -> CpuUsage:
        self._sample(baseline=True)
        self._busy_start = self._busy()
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.machine_busy_s = self._busy() - self._busy_start

    def by_role(self) -> dict[str, float]:
        """CPU seconds used within the round, per role, largest first."""
        totals: dict[str, float] = defaultdict(float)
        for key, (role, used) in self._last.items():
            totals[role] += max(0.0, used - self._start.get(key, 0.0))
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
