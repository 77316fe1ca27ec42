"""The response cache on a shared PostgreSQL database (LLM_CACHE_URL) next to the SQLite file: the
same semantics on both, workers in other processes, concurrent stores of one key, outages, the
settings and resource wiring, and an iteration re-materialized by another process.

The PostgreSQL server is real (support/postgres.py); the LLM is the scripted fake."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from promptopt_dagster.definitions import build_definitions, build_resources
from promptopt_dagster.errors import StorageError
from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.cache import CachedLLM, ResponseTable, database_url, responses
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.resources import LLMResource
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.cache_worker import URL_ENV
from promptopt_dagster_tests.support.postgres import (
    PASSWORD,
    PostgresServer,
    database_name,
)
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)
from promptopt_dagster_tests.support.server_process import free_port

WORKER = "promptopt_dagster_tests.support.cache_worker"
WAIT_S = 30.0


def ask(text: str) -> ChatRequest:
    return ChatRequest.of([{"role": "user", "content": text}])


def shout(request: ChatRequest) -> str:
    return request.messages[-1].content.upper() + " !"


@pytest.fixture
def cache_db(postgres_server: PostgresServer) -> Iterator[str]:  # noqa: F811
    """An empty database of this test's own, as a plain ``postgresql://`` URL (what a user sets)."""
    url = postgres_server.create_database()
    name = database_name(url)
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.e2e)])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The two backends: a file path (the default) and a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(tmp_path / "cache" / "llm_responses.sqlite")
    return str(request.getfixturevalue("cache_db"))


def cache_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "promptopt_dagster.llm.cache"]


def rows_in(location: str) -> list[tuple[str, str]]:
    table = ResponseTable(location)
    try:
        with table.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(responses.c.key, responses.c.text))]
    finally:
        table.dispose()


# --- the same semantics on both backends -----------------------------------------------------------


def test_urls_name_a_driver_that_is_installed(tmp_path: Path) -> None:
    assert database_url("postgresql://u:p@h:5/db").drivername == "postgresql+psycopg2"
    assert database_url("postgres://u:p@h/db").drivername == "postgresql+psycopg2"
    assert database_url("postgresql+psycopg2://u:p@h/db").drivername == "postgresql+psycopg2"
    assert database_url(tmp_path / "c.sqlite").database == str(tmp_path / "c.sqlite")
    assert database_url(f"sqlite:///{tmp_path}/c.sqlite").get_backend_name() == "sqlite"
    with pytest.raises(StorageError, match="local file or a postgresql:// URL") as caught:
        database_url("mysql://user:hunter2@db/cache")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(StorageError, match="cannot open the LLM response cache") as caught:
        CachedLLM(ScriptedLLM(shout), "postgresql+nodriver://user:hunter2@db/cache")
    assert "hunter2" not in str(caught.value) and "user:***@db" in str(caught.value)


def test_a_cache_file_written_before_sqlalchemy_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "llm_responses.sqlite"
    key = ask("old").cache_key("fake", "scripted")
    with closing(sqlite3.connect(path)) as conn, conn:  # the schema the sqlite3 code created
        conn.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, backend TEXT NOT NULL, "
                     "model TEXT NOT NULL, text TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, "
                     "completion_tokens INTEGER NOT NULL, created_at REAL NOT NULL)")
        conn.execute("INSERT INTO responses VALUES (?, 'fake', 'scripted', 'kept', 3, 1, 1.5)", (key,))
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, path)
    [old, new] = llm.generate([ask("old"), ask("new")])
    assert (old.text, old.prompt_tokens, old.completion_tokens, old.cached) == ("kept", 3, 1, True)
    assert new.text == "NEW !" and inner.calls == 1
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("SELECT count(*) FROM responses").fetchone() == (2,)


def test_replies_are_reused_and_only_misses_reach_the_model(location: str) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, location)
    first = llm.generate([ask("b"), ask("d")])
    assert not any(r.cached for r in first) and inner.calls == 2
    replies = llm.generate([ask("a"), ask("b"), ask("c"), ask("d"), ask("a")])
    assert [r.text for r in replies] == ["A !", "B !", "C !", "D !", "A !"]
    assert [r.cached for r in replies] == [False, True, False, True, True]
    assert [r.messages[-1].content for r in inner.requests[2:]] == ["a", "c"]
    assert [(r.prompt_tokens, r.completion_tokens) for r in replies[1:2]] == [(1, 2)]
    assert (llm.stats.hits, llm.stats.misses, llm.stats.unavailable) == (3, 4, 0)

    fresh = ScriptedLLM(shout)  # another client on the same cache: everything is there
    again = CachedLLM(fresh, location).generate([ask(x) for x in "abcd"])
    assert fresh.calls == 0 and all(r.cached and r.seconds == 0 for r in again)
    other_model = ScriptedLLM(shout, model="another")  # the model is part of the key
    CachedLLM(other_model, location).generate([ask("a")])
    assert other_model.calls == 1
    assert len(rows_in(location)) == 5


def test_failed_replies_are_not_kept(location: str) -> None:
    state = {"fail": True}

    def flaky(request: ChatRequest) -> str:
        if state["fail"]:
            raise TimeoutError("backend busy")
        return "fine"

    inner = ScriptedLLM(flaky)
    llm = CachedLLM(inner, location)
    [failed] = llm.generate([ask("q")])
    assert not failed.ok and rows_in(location) == []
    state["fail"] = False
    [ok] = llm.generate([ask("q")])
    [hit] = llm.generate([ask("q")])
    assert ok.ok and not ok.cached and hit.cached and inner.calls == 2


def test_a_disabled_cache_touches_no_store(location: str, tmp_path: Path) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, location, enabled=False)
    llm.generate([ask("a")])
    llm.generate([ask("a")])
    assert inner.calls == 2
    assert not (tmp_path / "cache").exists()
    if location.startswith("postgresql"):
        with pytest.raises(StorageError, match="cannot read"):  # no table was created
            ResponseTable(location).lookup(["x"])


def _store_at_once(location: str, barrier: threading.Barrier, count: int) -> tuple[int, int]:
    """A worker that asks the same questions as the others at the same moment: (model calls,
    failed cache operations)."""
    inner = ScriptedLLM(lambda r: f"{r.messages[-1].content} by {os.getpid()}")
    llm = CachedLLM(inner, location)
    barrier.wait(timeout=WAIT_S)
    replies = llm.generate([ask(f"same {i}") for i in range(count)])
    assert all(r.ok for r in replies)
    return inner.calls, llm.stats.unavailable


@pytest.mark.e2e
def test_processes_storing_the_same_keys_at_once_all_succeed(location: str) -> None:
    CachedLLM(ScriptedLLM(shout), location)  # the table, created once
    workers = 4
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        barrier = manager.Barrier(workers)
        outcomes = list(pool.map(_store_at_once, [location] * workers, [barrier] * workers, [40] * workers))
    assert sum(calls for calls, _ in outcomes) >= 40  # every key asked at least once, by any worker
    assert [failed for _, failed in outcomes] == [0] * workers  # no store failed (nor degraded)
    stored = dict(rows_in(location))
    fresh = ScriptedLLM(shout)
    replies = CachedLLM(fresh, location).generate([ask(f"same {i}") for i in range(40)])
    keys = [ask(f"same {i}").cache_key("fake", "scripted") for i in range(40)]
    assert sorted(stored) == sorted(keys)
    assert fresh.calls == 0 and [r.text for r in replies] == [stored[k] for k in keys]


# --- PostgreSQL: concurrency, other processes, outages ---------------------------------------------


@pytest.mark.e2e
def test_a_store_waiting_on_another_workers_uncommitted_row_keeps_that_row(
    cache_db: str, postgres_server: PostgresServer  # noqa: F811
) -> None:
    """Deterministic version of the race: worker A has inserted key K and not committed; worker B
    stores K (it blocks on A's row lock); A commits; B must succeed and A's reply stays."""
    table = ResponseTable(cache_db)
    table.create()
    row = ("K", "fake", "scripted", "from A", 1, 2, time.time())
    names = [c.name for c in responses.columns]
    errors: list[BaseException] = []
    with table.engine.connect() as a:
        a.execute(sa.insert(responses).values(dict(zip(names, row, strict=True))))  # uncommitted

        def worker_b() -> None:
            try:
                ResponseTable(cache_db).put([("K", "fake", "scripted", "from B", 1, 2, time.time())])
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        b = threading.Thread(target=worker_b)
        b.start()
        deadline = time.monotonic() + WAIT_S
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        while postgres_server.execute(waiting, database_name(cache_db))[0][0] == 0:
            assert b.is_alive() and time.monotonic() < deadline, "worker B never waited on A's row"
            time.sleep(0.02)
        a.commit()
    b.join(WAIT_S)
    assert not b.is_alive() and errors == []
    assert rows_in(cache_db) == [("K", "from A")]


def _run_worker(*args: str, url: str) -> dict[str, object]:
    env = {**os.environ, URL_ENV: url}
    done = subprocess.run([sys.executable, "-m", WORKER, *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.e2e
def test_a_second_process_answers_everything_from_the_shared_cache(cache_db: str) -> None:
    first = _run_worker("requests", "25", url=cache_db)
    assert first["calls"] == 25 and first["cached"] == 0
    second = _run_worker("requests", "25", url=cache_db)
    assert second["calls"] == 0 and second["cached"] == 25
    assert second["texts"] == first["texts"]  # the first process's replies (they name its pid)


@pytest.mark.e2e
def test_a_cache_that_cannot_be_opened_fails_at_once_without_the_password() -> None:
    url = f"postgresql://promptopt:{PASSWORD}@127.0.0.1:{free_port()}/promptopt"
    inner = ScriptedLLM(shout)
    with pytest.raises(StorageError) as caught:
        CachedLLM(inner, url)
    message = str(caught.value)
    assert PASSWORD not in message and "promptopt:***@127.0.0.1" in message
    assert "cannot open the LLM response cache" in message and "Connection refused" in message
    assert "Fix: check that the PostgreSQL server in LLM_CACHE_URL is running" in message
    assert inner.calls == 0  # nothing was paid for


@pytest.mark.e2e
def test_an_outage_after_opening_degrades_to_no_cache_with_one_warning(
    cache_db: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    inner = ScriptedLLM(shout)
    llm = CachedLLM(inner, cache_db)
    llm.generate([ask("before")])
    caplog.set_level(logging.WARNING, logger="promptopt_dagster.llm.cache")
    postgres_server.stop()
    try:
        down = llm.generate([ask("before"), ask("during")])
        assert [r.text for r in down] == ["BEFORE !", "DURING !"]  # the work is not lost
        assert not any(r.cached for r in down) and inner.calls == 3
        llm.generate([ask("during")])
        assert llm.stats.unavailable == 4  # two lookups and two stores failed
        warnings = cache_log(caplog)
        assert len(warnings) == 1, warnings  # once per outage, not at every call
        assert "cannot read the LLM response cache" in warnings[0]
        assert "goes on without the cache" in warnings[0] and "Fix:" in warnings[0]
        assert PASSWORD not in caplog.text and "***@127.0.0.1" in warnings[0]
    finally:
        postgres_server.start()
    [hit] = llm.generate([ask("before")])  # stored before the outage; pooled connections renewed
    assert hit.cached and inner.calls == 4
    assert cache_log(caplog)[-1] == "the LLM response cache is reachable again"
    [_, during] = llm.generate([ask("before"), ask("during")])
    assert not during.cached  # replies made during the outage were not kept: asked again
    [during_again] = llm.generate([ask("during")])
    assert during_again.cached and inner.calls == 5


# --- wiring: settings, resource, Dagster UI --------------------------------------------------------


@pytest.mark.e2e
def test_llm_cache_url_reaches_the_client_and_not_the_ui(
    cache_db: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dagster._core.remote_representation.external_data import RepositorySnap

    monkeypatch.setenv("LLM_CACHE_URL", cache_db)
    settings = Settings(PROMPTOPT_HOME=tmp_path)
    assert cache_db == settings.LLM_CACHE_URL
    assert PASSWORD not in repr(settings) and PASSWORD not in settings.model_dump_json()
    snapshot = dg.serialize_value(RepositorySnap.from_def(build_definitions(settings).get_repository_def()))
    assert "LLM_CACHE_URL" in snapshot and PASSWORD not in snapshot

    llm = build_resources(settings)["llm"]
    assert isinstance(llm, LLMResource)

    @dg.asset
    def cached_reply(llm: LLMResource) -> str:
        # The resource as Dagster resolves it, wrapped around the scripted model by hand: the
        # embedded model is not loaded in this test.
        client = CachedLLM(ScriptedLLM(shout), llm.response_cache_url or "")
        return client.generate([ask("via dagster")])[0].text

    assert dg.materialize([cached_reply], resources={"llm": llm}).success
    assert [text for _, text in rows_in(cache_db)] == ["VIA DAGSTER !"]
    assert not (tmp_path / "cache" / "llm_responses.sqlite").exists()


def test_without_llm_cache_url_the_cache_is_the_sqlite_file(tmp_path: Path) -> None:
    settings = Settings(PROMPTOPT_HOME=tmp_path)
    llm = build_resources(settings)["llm"]
    assert isinstance(llm, LLMResource) and llm.response_cache_url is None
    assert llm.response_cache_path == str(tmp_path / "cache" / "llm_responses.sqlite")


# --- a study: one iteration re-materialized by another process -------------------------------------


@pytest.mark.e2e
def test_another_process_rematerializes_an_iteration_with_zero_llm_calls(
    postgres_db_url: str, cache_db: str, tmp_path: Path  # noqa: F811
) -> None:
    """Two workers that share what a deployment shares (the Dagster instance and the response cache
    in PostgreSQL, the store folder standing in for GCS), each with its own process, resources and
    scripted model."""
    home = tmp_path / "home"
    home.mkdir()
    # both in processes of their own: each starts from a fresh interpreter, as a worker does
    first = _run_worker("start", str(home), str(tmp_path / "dagster_a"), postgres_db_url, url=cache_db)
    assert first["success"] and first["primary"] > 0 and first["optimizer"] > 0  # type: ignore[operator]
    assert len(rows_in(cache_db)) > 0
    assert not (home / "cache" / "llm_responses.sqlite").exists()  # the replies are in PostgreSQL

    other = _run_worker("iteration", str(home), str(tmp_path / "dagster_b"), postgres_db_url, url=cache_db)
    assert other == {"success": True, "primary": 0, "optimizer": 0, "llm_calls": 0}
