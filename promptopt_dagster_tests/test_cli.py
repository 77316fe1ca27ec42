"""`promptopt` as a user types it: bad input gets one clear message and changes nothing; runs,
resumes, --fresh, forget, list and show on a real Dagster instance (scripted LLM)."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import dagster as dg
import pytest

from promptopt_dagster import cli
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.study import load_study
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.settings import get_settings
from promptopt_dagster_tests.support import scripted as scripted_module
from promptopt_dagster_tests.support.scripted import write_dataset, write_study
from promptopt_dagster_tests.support.scripted_cli import (
    ANSWERED_ENV,
    BLOCK_AT_ENV,
    BLOCKED_ENV,
    answered_keys,
    child_failure,
    start_blocked_child,
    use_scripted_llm,
    wait_for_marker,
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMPTOPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _edit(path: Path, **fields: object) -> Path:
    raw = json.loads(path.read_text())
    raw.update(fields)
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"reference_column": "lable"}, "Did you mean 'label'"),
        ({"target_metric": "bleurt"}, "unknown metric 'bleurt'"),
        ({"primary_model": {"backend": "local", "name": "/nowhere/model.gguf"}}, "LOCAL_MODEL_PATH"),
        ({"max_iterations": 0}, "max_iterations"),
    ],
)
def test_bad_study_exits_2_with_a_clear_message_and_registers_nothing(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, expected: str | None
) -> None:
    study = _edit(write_study(tmp_path), **change)
    code = cli.main(["run", str(study)])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert not (home / "store" / "studies").exists()
    assert not (home / "dagster" / "dagster.yaml").exists()


def test_empty_dataset_is_refused_before_anything_runs(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path)
    (tmp_path / "scripted.csv").write_text("id,review,label\n")
    assert cli.main(["run", str(study)]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    assert not (home / "store" / "studies").exists()


# --- bad models: found before anything is registered, told once, without Dagster's log ------


@pytest.mark.parametrize("kind", ["missing", "not_gguf"])
def test_a_bad_model_is_reported_once_before_anything_is_registered(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    model = tmp_path / "model.gguf"
    if kind == "not_gguf":
        model.write_text("this is not a model")
    monkeypatch.setenv("LOCAL_MODEL_PATH", str(model))
    get_settings.cache_clear()
    study = write_study(tmp_path)
    code = cli.main(["run", str(study)])
    captured = capsys.readouterr()
    assert code == 2
    [line] = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert str(model) in line and ("does not exist" in line or "not a GGUF" in line), line
    assert "ModelError" not in captured.err and "Traceback" not in captured.err
    assert "dagster" not in captured.err.lower()
    assert not (home / "store" / "studies").exists()
    assert not (home / "dagster" / "dagster.yaml").exists()
    # fixing the model is all it takes: no stale registration stands in the way
    monkeypatch.delenv("LOCAL_MODEL_PATH")
    get_settings.cache_clear()


# --- error text is plain, whole, and names the file -----------------------------------------


def test_a_yaml_error_is_printed_whole_with_the_file_name(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = tmp_path / "broken.yaml"
    study.write_text("name: s\ninput_columns: [review\nreference_column: label\n")
    assert cli.main(["run", str(study)]) == 2
    err = capsys.readouterr().err
    assert str(study) in err and "<unicode string>" not in err
    assert "[review" in err and "expected ',' or ']'" in err
    assert "^" in err  # the caret under the offending column
    assert not (home / "dagster").exists()


# --- forget never reaches outside the store; unknown names are errors ------------------------


@pytest.fixture
def registered(home: Path, tmp_path: Path) -> Path:
    """A registered study next to files that must survive anything `forget` is given."""
    PromptStore(str(home / "store")).register_study(load_study(write_study(tmp_path)))
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "runs.db").write_text("precious")
    (tmp_path / "neighbour.txt").write_text("precious")
    return tmp_path


def _tree(folder: Path) -> dict[str, str]:
    return {str(p): p.read_text() for p in folder.rglob("*") if p.is_file() and "dagster/" not in str(p)}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("..", "is not a study name"),
        ("../..", "is not a study name"),
        ("../../..", "is not a study name"),
        ("studies/../..", "is not a study name"),
        ("no-such-study", "no study named 'no-such-study'"),
    ],
)
def test_forget_refuses_anything_but_a_registered_study(
    registered: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    before = _tree(registered)
    assert cli.main(["forget", name]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "forgot" not in captured.out
    assert _tree(registered) == before
    assert (registered / "home" / "dagster" / "runs.db").read_text() == "precious"


# --- a whole study through the CLI on the scripted LLM ---------------------------------------


@pytest.fixture
def scripted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_scripted_llm(monkeypatch)


@pytest.mark.e2e
def test_run_prints_a_line_per_step_and_unwrapped_tables_when_not_a_terminal(
    scripted: None, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, max_iterations=2)
    assert cli.main(["run", str(study)]) == 0
    out = capsys.readouterr().out
    assert "iteration 0: primary inference ..." in out
    assert "iteration 1: refinement (optimizer LLM) ..." in out
    assert "report: scoring seed and final prompt on the test split ..." in out
    header = next(line for line in out.splitlines() if "iteration" in line and "wall s" in line)
    assert "val score" in header and "cost $" in header  # one line, not wrapped at 80 columns
    records = PromptStore(str(home / "store")).records("scripted")
    assert len(records) == 2 and all(r.wall_seconds and r.wall_seconds > 0 for r in records)


@pytest.mark.e2e
def test_fresh_forget_list_and_show_on_a_study_with_iterations(
    scripted: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, max_iterations=2)
    assert cli.main(["run", str(study)]) == 0
    capsys.readouterr()

    # a later process: the report, wall times included, straight from the store
    assert cli.main(["show", "scripted"]) == 0
    shown = capsys.readouterr().out
    assert "test exact_match" in shown and "stopped: " in shown
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "scripted" in listed and "finished" in listed and "max_iterations" in listed

    assert cli.main(["run", str(study), "--fresh"]) == 0
    out = capsys.readouterr().out
    assert "starting over" in out and "iteration 0: incumbent val" in out

    assert cli.main(["forget", "scripted"]) == 0
    assert "forgot scripted" in capsys.readouterr().out
    assert cli.main(["show", "scripted"]) == 2
    assert "no study named 'scripted'" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    assert "no study is registered" in capsys.readouterr().out
    assert cli.main(["run", str(study)]) == 0  # registers and runs again from scratch
    assert "iteration 0: incumbent val" in capsys.readouterr().out


def kill_when_blocked(study: Path, env: dict[str, str], marker: Path) -> None:
    """Run `promptopt run study` (scripted) in a child until it blocks in the LLM call that
    writes `marker`, then SIGKILL it."""
    child = start_blocked_child(study, env)
    try:
        wait_for_marker(marker, child_failure(child))
    finally:
        child.kill()
        child.wait()


def rerun_after_kill(study: Path, home: Path, capsys: pytest.CaptureFixture[str]) -> dg.DagsterRun:
    """`promptopt run study` again after a child was killed: it reports the killed run as left
    unfinished and finishes the study. Returns that orphaned run."""
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    with dg.DagsterInstance.get() as instance:
        [orphan] = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    assert cli.main(["run", str(study)]) == 0
    captured = capsys.readouterr()
    assert f"run {orphan.run_id} was left unfinished" in captured.err
    assert "iteration 0: incumbent val" in captured.out and "test exact_match" in captured.out
    return orphan


@pytest.mark.e2e
def test_a_run_killed_with_sigkill_is_marked_failed_and_resumed(
    scripted: None, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, max_iterations=1)
    marker = tmp_path / "blocked"
    env = {**os.environ, BLOCKED_ENV: str(marker), "PROMPTOPT_HOME": str(home)}
    kill_when_blocked(study, env, marker)  # inside iteration 0's first LLM call

    orphan = rerun_after_kill(study, home, capsys)
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(orphan.run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))


def _materialization_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict[str, object]:
    [record] = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    assert record.asset_materialization is not None
    return {k: v.value for k, v in record.asset_materialization.metadata.items()}


@pytest.mark.e2e
def test_a_run_killed_in_the_middle_of_a_batch_resumes_without_repeating_a_call(
    scripted: None, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL while the model answers iteration 0's baseline batch one row after another, after
    BLOCK_AT - 1 rows were answered: the rerun asks the model for none of them again."""
    block_at = 5  # the baseline batch is the minibatch (6 rows) plus validation
    study = write_study(tmp_path, max_iterations=1)
    marker, answered = tmp_path / "blocked", tmp_path / "answered.txt"
    env = {**os.environ, BLOCKED_ENV: str(marker), BLOCK_AT_ENV: str(block_at), ANSWERED_ENV: str(answered),
           "PROMPTOPT_HOME": str(home)}
    kill_when_blocked(study, env, marker)  # inside its block_at-th primary call
    paid_for = answered_keys(answered)
    assert len(paid_for) == block_at - 1 and len(set(paid_for)) == len(paid_for)

    orphan = rerun_after_kill(study, home, capsys)

    # the rerun's model calls (this process's scripted clients), by request key
    asked_again = [request.cache_key(client.backend, client.model)
                   for (cache, _role), client in scripted_module._CLIENTS.items()
                   if cache.startswith(str(home)) for request in client.requests]
    assert asked_again, "the rerun made no model call at all"
    assert not set(paid_for) & set(asked_again)
    with dg.DagsterInstance.get() as instance:
        assert instance.get_run_by_id(orphan.run_id).status == dg.DagsterRunStatus.FAILURE
        assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
        # the answered rows came from the cache, the rest of the batch from the model
        meta = _materialization_metadata(instance, "baseline_predictions", study_iteration_key("scripted", 0))
    assert meta["llm_cached_calls"] == block_at - 1
    assert meta["llm_calls"] == int(meta["rows"]) - (block_at - 1) > 0  # type: ignore[call-overload]


# --- help, and packaging ----------------------------------------------------------------------


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli.build_parser()
    assert "inspect" not in (parser.description or "")
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"run", "ui", "list", "show", "forget"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"promptopt {name} {action.dest} has no help text"


def test_the_package_declares_its_licence_as_an_spdx_string() -> None:
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"


@pytest.mark.e2e
def test_small_splits_are_warned_about_and_tiny_studies_refused(
    scripted: None, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = write_study(tmp_path, max_iterations=1)
    write_dataset(tmp_path / "scripted.csv", rows=24)
    assert cli.main(["run", str(study)]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "fewer than 10" in err

    tiny = write_study(tmp_path, name="tiny")
    write_dataset(tmp_path / "tiny.csv", rows=3)
    assert cli.main(["run", str(tiny)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "10" in err
    assert PromptStore(str(home / "store")).studies() == ["scripted"]
