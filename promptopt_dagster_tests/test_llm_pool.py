"""One LLM quota across every run on an instance: the LLM-calling assets share the Dagster pool
"llm" (LLM_POOL_LIMIT), and each process's client keeps its own VERTEX_CONCURRENCY, so at most
LLM_POOL_LIMIT x VERTEX_CONCURRENCY requests are in flight, however many studies run at once.

Proved on real components: two `promptopt run` processes on one PostgreSQL instance against the
fake Vertex server, which holds its first requests until the overlap under test has happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from promptopt_dagster.instance_config import LLM_POOL
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.vertex import VertexLLM
from promptopt_dagster.llm.vertex_options import VertexOptions
from promptopt_dagster_tests.support.postgres import PostgresServer, database_name, postgres_instance
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)
from promptopt_dagster_tests.support.scripted import gemini_responder, write_study
from promptopt_dagster_tests.support.vertex_server import VertexServer

TOKEN = "test-token-pool-5ecret"
CLIENT_CONCURRENCY = 2  # VERTEX_CONCURRENCY of each process: the quota with a pool limit of 1
WAIT_S = 240.0
POLL_S = 0.05

pytestmark = pytest.mark.e2e  # every test here starts the fake Vertex server


@pytest.fixture
def server() -> Iterator[VertexServer]:
    with VertexServer(responder=gemini_responder, latency=0.02) as srv:
        yield srv


def wait_for(condition: Callable[[], bool], what: str, procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    """Poll `condition` until it holds; fail at once if a process it depends on ended."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"{what}: process {proc.pid} ended first (exit {proc.returncode})")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT_S:.0f} s")
        time.sleep(POLL_S)


def test_the_fake_server_holds_requests_counts_them_in_flight_and_per_window(server: VertexServer) -> None:
    llm = VertexLLM(
        VertexOptions(project_id="p", api_endpoint=server.base_url, access_token=TOKEN, concurrency=3),
        "gemini-test",
    )
    server.hold()
    replies: list[Any] = []
    worker = threading.Thread(
        target=lambda: replies.extend(
            llm.generate([ChatRequest.of([{"role": "user", "content": f"q{i}"}]) for i in range(6)])
        )
    )
    worker.start()
    wait_for(lambda: server.in_flight == 3, "three requests held")
    assert len(server.generate_requests()) == 3  # the client's bound: the others wait in the client
    server.release()
    worker.join(timeout=60)
    assert len(replies) == 6 and all(r.ok for r in replies)
    assert server.in_flight == 0 and server.max_in_flight == 3
    assert server.max_requests_in_window(60.0) == 6
    assert server.max_requests_in_window(1e-6) < 6


def start_study(
    name: str, tmp: Path, server: VertexServer, pg_url: str, pool_limit: int | None
) -> subprocess.Popen[bytes]:
    """`promptopt run` in a child process, configured only through the environment, as a user
    would: one project folder (prompt store) for both studies, one Postgres instance."""
    folder = tmp / name
    folder.mkdir()
    study = write_study(folder, name, max_iterations=1, minibatch_size=6)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DAGSTER_", "VERTEX_", "LLM_", "MLFLOW_", "PROMPTOPT_", "GCS_"))
    }
    env.update(
        PROMPTOPT_HOME=str(tmp / "project"),
        DAGSTER_PG_URL=pg_url,
        VERTEX_PROJECT_ID="test-project",
        VERTEX_API_ENDPOINT=server.base_url,
        VERTEX_ACCESS_TOKEN=TOKEN,
        VERTEX_CONCURRENCY=str(CLIENT_CONCURRENCY),
        VERTEX_TIMEOUT_S="600",  # requests held by the server must not time out
        VERTEX_BACKOFF_INITIAL_S="0.05",
        LLM_CACHE_ENABLED="false",  # every call reaches the server
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / f'mlflow-{name}.db'}",  # no SQLite writer contention
        NO_GCE_CHECK="true",
    )
    if pool_limit is not None:
        env["LLM_POOL_LIMIT"] = str(pool_limit)
    with (tmp / f"{name}.out").open("wb") as out, (tmp / f"{name}.err").open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "promptopt_dagster.cli", "run", str(study)],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("pool_limit", [1, None], ids=["pool_1", "no_pool"])
def test_two_studies_at_once_stay_within_one_quota_only_with_the_pool(
    pool_limit: int | None,
    server: VertexServer,
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    quota = (pool_limit or 0) * CLIENT_CONCURRENCY
    plain_url = postgres_server.dsn(database_name(postgres_db_url))  # postgresql://, as users write it
    server.hold()  # the first requests wait until the other study has reached its first LLM step
    procs = [start_study(name, tmp_path, server, plain_url, pool_limit) for name in ("alpha", "beta")]
    try:
        with postgres_instance(postgres_db_url, tmp_path / "observer") as observer:
            if pool_limit is None:
                # without the pool both processes send their client's worth at once
                wait_for(lambda: server.in_flight > CLIENT_CONCURRENCY, "both studies in flight", procs)
            else:

                def other_run_waits_for_the_pool() -> bool:
                    if server.in_flight > quota:
                        pytest.fail(f"{server.in_flight} requests in flight with a quota of {quota}")
                    info = observer.event_log_storage.get_concurrency_info(LLM_POOL)
                    return server.in_flight == quota and bool(info.pending_run_ids - info.active_run_ids)

                wait_for(other_run_waits_for_the_pool, "one study in flight, the other waiting", procs)
                info = observer.event_log_storage.get_concurrency_info(LLM_POOL)
                assert info.limit == pool_limit and len(info.active_run_ids) == 1
            server.release()
            for proc in procs:
                proc.wait(timeout=WAIT_S * 2)
            runs = observer.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))
    finally:
        server.release()
        for proc in procs:
            stop(proc)
    outputs = {
        name: (tmp_path / f"{name}.out").read_text() + (tmp_path / f"{name}.err").read_text()
        for name in ("alpha", "beta")
    }
    for proc, (name, text) in zip(procs, outputs.items(), strict=True):
        assert proc.returncode == 0, f"{name}:\n{text[-3000:]}"
        assert "test exact_match: seed" in text, text[-3000:]
    assert {run.tags.get("study") for run in runs} == {"alpha", "beta"}  # on the one Postgres instance
    seen = (
        f"max in flight {server.max_in_flight}, {len(server.generate_requests())} requests, "
        f"at most {server.max_requests_in_window(1.0)} a second"
    )
    if pool_limit is None:
        assert server.max_in_flight > CLIENT_CONCURRENCY, seen
    else:
        assert server.max_in_flight == quota, seen  # the quota is used, never exceeded
    assert TOKEN not in "".join(outputs.values())
