"""`promptopt` itself (argument parsing, settings, the persistent Dagster instance, the driver)
with the scripted LLM in place of the embedded model, in this process or in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from promptopt_dagster import definitions
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.scripted import scripted_llm_resource

# In a child process: this file is written when the BLOCK_AT_ENV-th primary call (default the
# first) reaches the model, and that call never returns, so a test can kill the process
# mid-iteration, or mid-batch, at a known point.
BLOCKED_ENV = "PROMPTOPT_TEST_BLOCKED_FILE"
BLOCK_AT_ENV = "PROMPTOPT_TEST_BLOCK_AT_CALL"
# If set, the blocked call goes on (and answers) once this file exists, instead of never.
RELEASE_ENV = "PROMPTOPT_TEST_RELEASE_FILE"
# If set, the cache key of every request the scripted models answer is appended to this file,
# one line each, as it is answered: what a test counts across processes.
ANSWERED_ENV = "PROMPTOPT_TEST_ANSWERED_FILE"


def scripted_resources(settings: Settings) -> dict[str, object]:
    return {**_real_build_resources(settings), "llm": scripted_llm_resource(settings)}


_real_build_resources = definitions.build_resources


def use_scripted_llm(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(definitions, "build_resources", scripted_resources)


def answered_keys(path: Path) -> list[str]:
    """The keys a child appended to its ANSWERED_ENV file (none if it wrote nothing)."""
    return path.read_text().split() if path.exists() else []


def start_blocked_child(study: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """`promptopt run study` on the scripted LLM in a child, blocking as `env`'s BLOCKED_ENV,
    BLOCK_AT_ENV and RELEASE_ENV say; its stderr is piped (text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "promptopt_dagster_tests.support.scripted_cli", "run", str(study)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def blocked_pids(marker: Path) -> set[int]:
    """The pids of every process that reached its blocked call: each also writes
    `<marker>.<pid>` next to `marker`."""
    return {int(p.name.rsplit(".", 1)[1]) for p in marker.parent.glob(f"{marker.name}.*")}


def wait_for_marker(marker: Path, failure: Callable[[], str | None], timeout: float = 120) -> None:
    """Until `marker` exists (a blocked scripted call wrote it). `failure()` says why waiting is
    pointless (the process that should get there ended), or None; either fails the test."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        reason = failure()
        assert reason is None, reason
        assert time.monotonic() < deadline, f"nothing reached the blocking LLM call in {timeout:.0f} s"
        time.sleep(0.05)


def child_failure(child: subprocess.Popen[str]) -> Callable[[], str | None]:
    """For `wait_for_marker`: the child's stderr once it has ended."""

    def failure() -> str | None:
        if child.poll() is None:
            return None
        return f"the child ended: {child.stderr.read() if child.stderr else ''}"

    return failure


_blocking = False  # whether this process's responders are wrapped already


def block_primary_calls_from_environment() -> None:
    """Wrap this process's scripted responders as the BLOCKED_ENV, BLOCK_AT_ENV, RELEASE_ENV
    and ANSWERED_ENV variables say (nothing to do without BLOCKED_ENV)."""
    from promptopt_dagster.llm.base import ChatRequest
    from promptopt_dagster_tests.support import scripted

    global _blocking
    if not os.environ.get(BLOCKED_ENV) or _blocking:
        return
    _blocking = True
    marker = Path(os.environ[BLOCKED_ENV])
    block_at = int(os.environ.get(BLOCK_AT_ENV, "1"))
    answered = os.environ.get(ANSWERED_ENV)
    release = os.environ.get(RELEASE_ENV)
    lock = threading.Lock()
    primary_calls = 0

    def record(request: ChatRequest, role: str) -> None:
        if answered:
            with lock, open(answered, "a") as log:
                log.write(request.cache_key("fake", f"scripted-{role}") + "\n")

    def primary(request: ChatRequest) -> str:
        nonlocal primary_calls
        with lock:
            primary_calls += 1
            blocked = primary_calls == block_at
        if blocked:
            # one marker per process too, so a test can see several processes blocked at once
            marker.with_name(f"{marker.name}.{os.getpid()}").touch()
            marker.write_text(str(os.getpid()))
            while not (release and Path(release).exists()):  # until released, or killed
                time.sleep(0.05)
        reply = real_primary(request)
        record(request, "primary")
        return reply

    def optimizer(request: ChatRequest) -> str:
        reply = real_optimizer(request)
        record(request, "optimizer")
        return reply

    real_primary, real_optimizer = scripted.primary_responder, scripted.optimizer_responder
    scripted.primary_responder = primary  # type: ignore[assignment]
    scripted.optimizer_responder = optimizer  # type: ignore[assignment]


def _blocked_child() -> int:
    """`python -m promptopt_dagster_tests.support.scripted_cli run STUDY`: the CLI on the
    scripted LLM, stuck in its BLOCK_AT_ENV-th primary call (default the first) until the
    RELEASE_ENV file appears (if that is set) or the process is killed."""
    from promptopt_dagster import cli

    definitions.build_resources = scripted_resources  # type: ignore[assignment]
    block_primary_calls_from_environment()
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_blocked_child())
