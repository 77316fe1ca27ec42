"""`promptopt` itself (argument parsing, settings, the persistent Dagster instance, the driver)
with the scripted LLM in place of the embedded model, in this process or in a child process."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from promptopt_dagster import definitions
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.scripted import scripted_llm_resource

# In a child process: this file is written when the first primary call arrives, and that call
# never returns, so a test can kill the process mid-iteration at a known point.
BLOCKED_ENV = "PROMPTOPT_TEST_BLOCKED_FILE"


def scripted_resources(settings: Settings) -> dict[str, object]:
    return {**_real_build_resources(settings), "llm": scripted_llm_resource(settings)}


_real_build_resources = definitions.build_resources


def use_scripted_llm(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(definitions, "build_resources", scripted_resources)


def _blocked_child() -> int:
    """`python -m promptopt_dagster_tests.support.scripted_cli run STUDY`: the CLI on the
    scripted LLM, stuck in its first primary call."""
    from promptopt_dagster import cli
    from promptopt_dagster_tests.support import scripted

    definitions.build_resources = scripted_resources  # type: ignore[assignment]
    marker = Path(os.environ[BLOCKED_ENV])

    def blocked(request):  # type: ignore[no-untyped-def]
        marker.write_text(str(os.getpid()))
        threading.Event().wait()  # until the test kills this process

    scripted.primary_responder = blocked  # type: ignore[assignment]
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(_blocked_child())
