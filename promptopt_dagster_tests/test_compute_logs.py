"""Compute logs (compute_logs.py): Dagster's files and reading side, filled by a thread of the
run's process instead of `tail` and watcher processes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import dagster as dg
import pytest
import yaml

from promptopt_dagster.compute_logs import ThreadedComputeLogManager
from promptopt_dagster.instance_config import instance_config
from promptopt_dagster.settings import Settings

# Runs in a process of its own, so that its stdout and stderr are real descriptors (pytest
# replaces this process's); prints what it saw as JSON on its last stdout line.
CAPTURE = textwrap.dedent(
    """
    import json, os, subprocess, sys
    import psutil
    from promptopt_dagster.compute_logs import ThreadedComputeLogManager

    manager = ThreadedComputeLogManager(sys.argv[1])
    with manager.capture_logs(["run", "step"]):
        print("from python", flush=True)
        os.write(1, b"from native code\\n")
        subprocess.run(["echo", "from a child process"], check=True)
        print("to stderr", file=sys.stderr)
        children = len(psutil.Process().children())
    print("after the capture")
    print(json.dumps({"children": children}))
    """
)


def run_capture(tmp_path: Path) -> tuple[list[str], str, str, dict]:
    """(console lines, captured stdout file, captured stderr file, what the script saw)."""
    done = subprocess.run(
        [sys.executable, "-c", CAPTURE, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    manager = ThreadedComputeLogManager(str(tmp_path))
    data = manager.get_log_data(["run", "step"])
    assert manager.is_capture_complete(["run", "step"])
    return lines, (data.stdout or b"").decode(), (data.stderr or b"").decode(), json.loads(lines[-1])


def test_python_native_and_child_output_reach_the_file_and_the_console(tmp_path: Path) -> None:
    console, stdout, stderr, seen = run_capture(tmp_path)
    for line in ("from python", "from native code", "from a child process"):
        assert line in stdout.splitlines()
        assert line in console
    assert "after the capture" in console and "after the capture" not in stdout
    assert stderr.splitlines() == ["to stderr"]
    # Dagster's LocalComputeLogManager starts a tail and a watcher process per stream (4 for
    # this capture); this one starts none
    assert seen["children"] == 0


def test_a_run_on_the_cli_instance_keeps_its_output_for_the_ui(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    config = instance_config(Settings(DAGSTER_PG_URL=None, LLM_POOL_LIMIT=None))
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))

    @dg.asset
    def talkative() -> int:
        print("progress: 3 of 3 rows")
        return 3

    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        manager = instance.compute_log_manager
        assert isinstance(manager, ThreadedComputeLogManager)
        result = dg.materialize([talkative], instance=instance)
        assert result.success
        [captured] = [
            e.logs_captured_data for e in result.all_events if e.event_type_value == "LOGS_CAPTURED"
        ]
        data = manager.get_log_data(manager.build_log_key_for_run(result.run_id, captured.file_key))
        assert "progress: 3 of 3 rows" in (data.stdout or b"").decode()
        assert (tmp_path / "storage").is_dir()  # Dagster's default place, DAGSTER_HOME/storage
