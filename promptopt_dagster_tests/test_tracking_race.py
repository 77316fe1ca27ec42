"""Several processes logging the same iteration at once (two workers re-running it, a retried step
racing a slow first attempt, two `promptopt run` of one study) leave one MLflow run per identity
and one Prompt Registry version per prompt, on a SQLite store and on a real `mlflow server`."""

from __future__ import annotations

import multiprocessing as mp
import queue
import traceback
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.tracking import (
    CHAMPION_ALIAS,
    TAG_PROMPT_ID,
    IterationLog,
    MlflowTracker,
    experiment_name,
    log_iteration,
    prompt_name,
)
from promptopt_dagster.tracking.candidates import CandidateLog
from promptopt_dagster.tracking.prompt_versions import PromptVersionLog
from promptopt_dagster.tracking.run_log import RunLog
from promptopt_dagster_tests.support.mlflow_server import MlflowServer

PROCESSES = 4
RESULT_TIMEOUT_S = 300.0
CANDIDATES = ("cand00000001", "cand00000002")
METAMODEL_KEY = "meta_model-0000"


def race_log(study: str) -> IterationLog:
    """Iteration 0 of `study`: the parent run, two candidate runs, the seed and the accepted
    candidate as prompt versions (the second one champion)."""
    seed = PromptState(system_prompt="You are precise.", output_prompt="Q: {question}\nA:", id="seed00000001")
    winner = PromptState(
        system_prompt="Be brief.", output_prompt="Q: {question}\nA:", id=CANDIDATES[0], parent_id=seed.id
    )
    return IterationLog(
        study=study,
        iteration=0,
        parent=RunLog(
            params={"iteration": 0}, metrics={"val_score": 0.5}, tags={"promptopt.accepted": "True"}
        ),
        candidates=[
            CandidateLog(candidate_id=cid, params={"strategy": "shorten"}, metrics={"val_score": 0.6})
            for cid in CANDIDATES
        ],
        prompts=[
            PromptVersionLog(seed, "seed prompt", {TAG_PROMPT_ID: seed.id}, champion=False),
            PromptVersionLog(
                winner,
                "iteration 0: shorten",
                {TAG_PROMPT_ID: winner.id},
                champion=True,
                candidate_id=winner.id,
            ),
        ],
        trace={
            "name": "iteration-0000",
            "start_ns": 1_700_000_000_000_000_000,
            "calls": 1,
            "skipped": 0,
            "groups": [
                {
                    "name": "incumbent",
                    "prompt_id": seed.id,
                    "calls": [
                        {
                            "name": "call train/1",
                            "seconds": 0.5,
                            "inputs": {"messages": [{"role": "user", "content": "Q: 1+1\nA:"}]},
                            "outputs": {"reply": "2", "prediction": "2"},
                            "attributes": {"row_id": "1", "split": "train"},
                            "error": None,
                        }
                    ],
                }
            ],
        },
    )


def log_once(tracker: MlflowTracker, study: str) -> dict[str, Any]:
    """What one process logs: the iteration, and a keyed run as the meta-model asset makes."""
    logged = log_iteration(tracker, race_log(study))
    keyed = tracker.keyed_run(study, METAMODEL_KEY, params={"rows": 40})
    return {
        "run_id": logged.run_id,
        "candidate_runs": logged.candidate_runs,
        "versions": logged.prompt_versions,
        "keyed": keyed,
        "queued": logged.queued,
    }


def _worker(uri: str, outbox: str, study: str, start: Any, results: Any) -> None:
    """One racing process: open the store, wait for the others, then log the same iteration."""
    try:
        tracker = MlflowTracker(uri, outbox_path=outbox)
        tracker.client.search_experiments(max_results=1)  # the slow first contact, before the start
        start.wait(timeout=RESULT_TIMEOUT_S)
        results.put(log_once(tracker, study))
    except BaseException:
        results.put({"error": traceback.format_exc()})


def race(uri: str, outbox: Path, study: str, processes: int = PROCESSES) -> list[dict[str, Any]]:
    """Run `processes` workers released together by a barrier; their results."""
    ctx = mp.get_context("spawn")  # no MLflow client state copied from this process
    start, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(uri, str(outbox), study, start, results)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        out = [results.get(timeout=RESULT_TIMEOUT_S) for _ in procs]
    except queue.Empty:
        pytest.fail("a racing process sent no result")
    finally:
        for proc in procs:
            proc.join(timeout=RESULT_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
    return out


def census(tracker: MlflowTracker, study: str) -> dict[str, Counter[str]]:
    """Active runs per identity and registry versions per prompt id and per prompt text."""
    from mlflow.entities import ViewType

    client = tracker.client
    exp = client.get_experiment_by_name(experiment_name(study))
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
    per_run: Counter[str] = Counter()
    for run in runs:
        tags = run.data.tags
        kind = tags.get("promptopt.kind")
        ident = {"iteration": tags.get("promptopt.iteration"), "candidate": tags.get("promptopt.candidate")}
        per_run[f"{kind}:{ident.get(kind) or tags.get('promptopt.key')}"] += 1
    versions = tracker.store.prompt_versions(prompt_name(study))
    traces = client.search_traces(locations=[exp.experiment_id], include_spans=False)
    return {
        "runs": per_run,
        "traces": Counter(t.info.tags.get("promptopt.trace_key", "") for t in traces),
        "versions_by_id": Counter(v.tags.get(TAG_PROMPT_ID, "") for v in versions),
        "versions_by_text": Counter(str(v.template) for v in versions),
    }


def check_one_of_each(tracker: MlflowTracker, study: str, results: list[dict[str, Any]]) -> None:
    assert tracker.flush() >= 0 and tracker.pending() == []
    counts = census(tracker, study)
    expected_runs = {
        "iteration:0000": 1,
        **{f"candidate:{c}": 1 for c in CANDIDATES},
        f"keyed:{METAMODEL_KEY}": 1,
    }
    seen = {k: dict(v) for k, v in counts.items()}
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, f"{len(errors)} process(es) failed; {seen}; first error: {errors[0]}"
    assert dict(counts["runs"]) == expected_runs, f"runs per identity and versions per prompt: {seen}"
    assert sorted(counts["versions_by_id"].values()) == [1, 1], seen
    assert sorted(counts["versions_by_text"].values()) == [1, 1], seen
    assert dict(counts["traces"]) == {f"{study}.0000": 1}, seen
    # every process ended up with the same, surviving run and version ids
    ids = {tracker.resolve(r["run_id"]) for r in results}
    assert len(ids) == 1, f"processes used {len(ids)} different iteration runs"
    [run_id] = ids
    assert tracker.client.get_run(run_id).info.lifecycle_stage == "active"
    assert len({tracker.resolve(r["keyed"]) for r in results}) == 1
    for cid in CANDIDATES:
        cand = {tracker.resolve(r["candidate_runs"][cid]) for r in results}
        assert len(cand) == 1, f"candidate {cid} logged to {len(cand)} runs"
        assert tracker.client.get_run(cand.pop()).data.tags["mlflow.parentRunId"] == run_id
    assert len({tuple(sorted(r["versions"].items())) for r in results if r["queued"] == 0}) <= 1
    champion = tracker.client.get_prompt_version_by_alias(prompt_name(study), CHAMPION_ALIAS)
    assert champion.tags[TAG_PROMPT_ID] == CANDIDATES[0]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("mlflow-server")
    with MlflowServer(f"sqlite:///{root}/mlflow.db", root / "artifacts") as server:
        yield server


@pytest.mark.e2e
def test_racing_processes_on_a_sqlite_store_leave_one_run_and_one_version_each(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = MlflowTracker(uri, outbox_path=tmp_path / "outbox.jsonl")
    tracker.client.search_experiments(max_results=1)  # the schema, created once before the race
    results = race(uri, tmp_path / "outbox.jsonl", "race-sqlite")
    check_one_of_each(tracker, "race-sqlite", results)


@pytest.mark.e2e
def test_racing_processes_on_a_tracking_server_leave_one_run_and_one_version_each(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    tracker = MlflowTracker(mlflow_server.url, outbox_path=tmp_path / "outbox.jsonl")
    results = race(mlflow_server.url, tmp_path / "outbox.jsonl", "race-server")
    check_one_of_each(tracker, "race-server", results)


def test_relogging_an_iteration_in_one_process_reuses_its_runs_and_versions(tmp_path: Path) -> None:
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", outbox_path=tmp_path / "outbox.jsonl")
    first = log_once(tracker, "relog")
    second = log_once(tracker, "relog")
    assert first == second
    check_one_of_each(tracker, "relog", [first, second])


def test_a_run_left_half_created_is_replaced_and_an_unstamped_older_run_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from promptopt_dagster.tracking import store

    monkeypatch.setattr(store, "STAMP_WAIT_S", 0.5)
    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", outbox_path=tmp_path / "outbox.jsonl")
    exp = tracker.experiment_id("leftovers")
    ident = {"promptopt.kind": "iteration", "promptopt.study": "leftovers"}
    # a process that died between creating its run and stamping it
    dead = tracker.client.create_run(
        exp, tags={**ident, "promptopt.iteration": "0001", "promptopt.created_ns": "pending"}
    ).info.run_id
    run = tracker.iteration_run("leftovers", 1)
    assert run != dead
    assert tracker.client.get_run(dead).info.lifecycle_stage == "deleted"
    assert tracker.client.get_run(run).data.tags["promptopt.created_ns"].isdigit()
    # a run created before runs were stamped is found again, not duplicated
    old = tracker.client.create_run(exp, tags={**ident, "promptopt.iteration": "0002"}).info.run_id
    assert tracker.iteration_run("leftovers", 2) == old
    assert census(tracker, "leftovers")["runs"] == Counter({"iteration:0001": 1, "iteration:0002": 1})


def test_a_link_that_collides_with_another_process_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tracking server answers a link that raced another process's link to the same run with
    BAD_REQUEST (UNIQUE constraint on the run's `mlflow.linkedPrompts` tag); the version still ends
    up linked."""
    from mlflow.exceptions import MlflowException

    tracker = MlflowTracker(f"sqlite:///{tmp_path}/mlflow.db", outbox_path=tmp_path / "outbox.jsonl")
    run = tracker.iteration_run("linked", 0)
    client = tracker.store.client
    real_link = client.link_prompt_version_to_run
    collisions = iter([MlflowException("UNIQUE constraint failed: tags.key, tags.run_uuid")])

    def colliding_link(run_id: str, uri: str) -> None:
        collision = next(collisions, None)
        if collision is not None:
            raise collision
        real_link(run_id, uri)

    monkeypatch.setattr(client, "link_prompt_version_to_run", colliding_link)
    version = tracker.register_prompt("linked", "Be brief.", "Q: {q}\nA:", None, {}, False, run_id=run)
    linked = client.get_run(run).data.tags["mlflow.linkedPrompts"]
    assert f'"version": "{version}"' in linked and next(collisions, None) is None
