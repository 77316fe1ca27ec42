"""The Dagster instance the CLI prepares (instance_config.py, cli._prepare_home): SQLite by
default, PostgreSQL with DAGSTER_PG_URL (the URL in the environment, never in the file), the "llm"
pool's limit from LLM_POOL_LIMIT, and a dagster.yaml the user wrote left alone."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest
import requests
import yaml
from dagster._core.instance.config import PoolGranularity
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage

from promptopt_dagster import cli
from promptopt_dagster.compute_logs import ThreadedComputeLogManager
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.errors import SettingsError
from promptopt_dagster.instance_config import (
    LLM_POOL,
    MARKER,
    InstanceFile,
    compute_logs,
    instance_config,
    plan_instance_file,
    postgres_url,
    render,
    sqlite_storage,
)
from promptopt_dagster.settings import Settings, get_settings
from promptopt_dagster.sqlite_storage import CachedEngineSqliteStorage
from promptopt_dagster_tests.support.postgres import PASSWORD, PostgresServer, database_name
from promptopt_dagster_tests.support.postgres_fixtures import (
    postgres_db_url,  # noqa: F401
    postgres_server,  # noqa: F401
)
from promptopt_dagster_tests.support.server_process import HOST, ServerProcess, free_port, http_ready

SECRET = "s3cret-pw-9f2"


def settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(PROMPTOPT_HOME=tmp_path / "home", **values)  # type: ignore[arg-type]


# --- the URL --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("postgresql://u:p@db:5432/dagster", "postgresql+psycopg2://u:p@db:5432/dagster"),
        ("postgres://u:p@db/dagster", "postgresql+psycopg2://u:p@db/dagster"),
        ("PostgreSQL://u@db/dagster?sslmode=require", "postgresql+psycopg2://u@db/dagster?sslmode=require"),
        ("postgresql+psycopg2://u:p@db/d", "postgresql+psycopg2://u:p@db/d"),
        ("  postgresql://u:p@db/d\n", "postgresql+psycopg2://u:p@db/d"),
    ],
)
def test_plain_postgres_urls_name_the_installed_driver(raw: str, expected: str) -> None:
    assert postgres_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"postgresql+psycopg://u:{SECRET}@db/d", "names the driver 'psycopg', which is not installed"),
        (f"mysql://u:{SECRET}@db/d", "not mysql://"),
        (f"u:{SECRET}@db/d", "is not a URL"),
        ("postgresql://", "is not a URL"),
    ],
)
def test_a_bad_url_is_refused_with_the_fix_and_without_the_password(raw: str, expected: str) -> None:
    with pytest.raises(SettingsError) as caught:
        postgres_url(raw)
    message = str(caught.value)
    assert expected in message and "Fix:" in message and "DAGSTER_PG_URL" in message
    assert SECRET not in message


# --- what the file holds ----------------------------------------------------------------------------


def load(config: dict, home: Path) -> dg.DagsterInstance:
    """The instance of `home` with `config`, as Dagster loads it (with DAGSTER_HOME set)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(render(config))
    with mock.patch.dict(os.environ, {"DAGSTER_HOME": str(home)}):
        return dg.DagsterInstance.from_config(str(home))


def test_the_embedded_default_is_sqlite_with_no_pool_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = instance_config(settings(tmp_path))
    expected = {"storage": sqlite_storage(), "compute_logs": compute_logs(), "telemetry": {"enabled": False}}
    assert config == expected
    with load(config, tmp_path / "dagster") as instance:
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))  # what a child process has
        assert isinstance(instance.get_ref().storage, CachedEngineSqliteStorage)
        assert isinstance(instance.event_log_storage, SqliteEventLogStorage)
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert instance.get_concurrency_config().pool_config.default_pool_limit is None
        assert isinstance(instance.compute_log_manager, ThreadedComputeLogManager)


def test_llm_pool_limit_becomes_the_default_pool_limit_at_op_granularity(tmp_path: Path) -> None:
    config = instance_config(settings(tmp_path, LLM_POOL_LIMIT=3))
    assert config["concurrency"] == {"pools": {"default_limit": 3, "granularity": "op"}}
    with load(config, tmp_path / "dagster") as instance:  # Dagster accepts it as it is
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 3
        assert pools.pool_granularity == PoolGranularity.OP


def test_llm_pool_limit_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LLM_POOL_LIMIT"):
        settings(tmp_path, LLM_POOL_LIMIT=0)


def test_postgres_storage_names_the_variable_never_the_url(tmp_path: Path) -> None:
    text = render(instance_config(settings(tmp_path, DAGSTER_PG_URL=f"postgresql://u:{SECRET}@db/d")))
    assert SECRET not in text and "db/d" not in text
    storage = yaml.safe_load(text)["storage"]["custom"]
    assert (storage["module"], storage["class"]) == ("promptopt_dagster.pg_storage", "PooledPostgresStorage")
    assert storage["config"] == {"postgres_url": {"env": "DAGSTER_PG_URL"}}
    assert f"u:{SECRET}" not in repr(settings(tmp_path, DAGSTER_PG_URL=f"postgresql://u:{SECRET}@db/d"))


def test_every_llm_calling_asset_is_in_the_llm_pool_and_no_other_step_is() -> None:
    defs = build_definitions(Settings())
    pools = {
        op.name: op.pool
        for job in ("iteration_job", "report_job", "evaluation_job")
        for op in defs.resolve_job_def(job).graph.iterate_op_defs()
    }
    llm_steps = {
        "baseline_predictions",
        "candidate_prompts",
        "candidate_predictions",
        "study_report",
        "evaluate_evaluation_shard",
    }
    assert {"plan_evaluation_shards", "merge_evaluation_shards"} <= set(pools)
    assert {name for name, pool in pools.items() if pool == LLM_POOL} == llm_steps
    assert {pool for name, pool in pools.items() if name not in llm_steps} == {None}


@dg.asset(pool=LLM_POOL)
def pooled_step() -> int:
    return 1


def test_a_changed_limit_reaches_the_pool_and_a_limit_set_by_hand_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster copies default_limit to the pool when a step claims a slot; the CLI's rewritten
    file therefore changes the limit of an existing instance, unless someone set it by hand."""
    home = tmp_path / "dagster"
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # as for every run the CLI starts

    def run_with(limit: int) -> int | None:
        with load(instance_config(settings(tmp_path, LLM_POOL_LIMIT=limit)), home) as instance:
            assert dg.materialize([pooled_step], instance=instance).success
            return instance.event_log_storage.get_concurrency_info(LLM_POOL).limit

    assert run_with(1) == 1
    assert run_with(3) == 3
    with load(instance_config(settings(tmp_path, LLM_POOL_LIMIT=3)), home) as instance:
        instance.event_log_storage.set_concurrency_slots(LLM_POOL, 5)  # `dagster instance concurrency set`
    assert run_with(2) == 5


# --- who owns the file ------------------------------------------------------------------------------


def test_a_generated_file_follows_the_settings_and_a_users_file_is_never_rewritten(tmp_path: Path) -> None:
    plain, pooled = settings(tmp_path), settings(tmp_path, LLM_POOL_LIMIT=2)
    first = plan_instance_file(None, plain).text
    assert first is not None and first.startswith(MARKER)
    assert plan_instance_file(first, plain).text is None  # unchanged: not rewritten
    second = plan_instance_file(first, pooled).text
    assert second is not None and yaml.safe_load(second)["concurrency"]["pools"]["default_limit"] == 2
    # what earlier versions wrote, without a marker, is upgraded
    assert plan_instance_file("telemetry:\n  enabled: false\n", pooled).text == second
    # the user's own file stays; a setting it ignores is said
    users = "storage:\n  sqlite:\n    base_dir: /srv/dagster\n"
    assert plan_instance_file(users, plain) == InstanceFile(None, None)
    kept = plan_instance_file(users, pooled)
    assert kept.text is None and kept.note is not None and "LLM_POOL_LIMIT is not applied" in kept.note


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PROMPTOPT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("DAGSTER_PG_URL", raising=False)
    monkeypatch.delenv("LLM_POOL_LIMIT", raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_the_cli_rewrites_its_own_file_and_keeps_the_users(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = home / "dagster" / "dagster.yaml"
    assert cli.main(["list"]) == 0
    assert "concurrency" not in yaml.safe_load(config.read_text())
    monkeypatch.setenv("LLM_POOL_LIMIT", "2")
    get_settings.cache_clear()
    assert cli.main(["list"]) == 0
    assert yaml.safe_load(config.read_text())["concurrency"]["pools"]["default_limit"] == 2
    with dg.DagsterInstance.get() as instance:
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 2
    capsys.readouterr()

    users = "# mine\ntelemetry:\n  enabled: false\n"
    config.write_text(users)
    assert cli.main(["list"]) == 0
    assert config.read_text() == users
    assert "LLM_POOL_LIMIT is not applied" in capsys.readouterr().err


def test_the_cli_refuses_a_bad_url_before_writing_anything(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DAGSTER_PG_URL", f"mysql://u:{SECRET}@db/d")
    get_settings.cache_clear()
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert "error: DAGSTER_PG_URL must be a PostgreSQL URL" in err and SECRET not in err
    assert "Traceback" not in err
    assert not (home / "dagster" / "dagster.yaml").exists()


@pytest.mark.e2e
def test_the_cli_puts_the_instance_on_postgres_from_a_plain_url(
    home: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
) -> None:
    plain = postgres_server.dsn(database_name(postgres_db_url))  # postgresql://, as a user writes it
    assert plain.startswith("postgresql://")
    monkeypatch.setenv("DAGSTER_PG_URL", plain)
    get_settings.cache_clear()
    assert cli.main(["list"]) == 0
    text = (home / "dagster" / "dagster.yaml").read_text()
    assert PASSWORD not in text
    assert os.environ["DAGSTER_PG_URL"] == postgres_db_url  # what Dagster and `dagster dev` read
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
        instance.add_dynamic_partitions("study", ["on-postgres"])
    rows = postgres_server.execute(
        "SELECT partition FROM dynamic_partitions WHERE partitions_def_name = 'study'",
        database=database_name(postgres_db_url),
    )
    assert rows == [("on-postgres",)]
    for path in home.rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.e2e
def test_promptopt_ui_runs_the_webserver_and_the_daemon_on_postgres(
    tmp_path: Path,
    postgres_server: PostgresServer,  # noqa: F811
    postgres_db_url: str,  # noqa: F811
) -> None:
    """`promptopt ui` hands the normalized URL to `dagster dev`, whose webserver and daemon (its
    children) open the instance from the generated file."""
    database = database_name(postgres_db_url)
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "PROMPTOPT_", "MLFLOW_", "LLM_"))
    }
    env.update(
        PROMPTOPT_HOME=str(tmp_path / "home"),
        DAGSTER_PG_URL=postgres_server.dsn(database),  # postgresql://, as a user writes it
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",  # set: no MLflow UI is started
        NO_GCE_CHECK="true",
    )
    ui = ServerProcess("promptopt ui", log_path=tmp_path / "ui.log")
    try:
        ui.start(
            [sys.executable, "-m", "promptopt_dagster.cli", "ui", "--port", str(port)],
            ready=http_ready(f"http://{HOST}:{port}/server_info"),
            timeout=300,
            env=env,
            cwd=tmp_path,
        )
        reply = requests.post(
            f"http://{HOST}:{port}/graphql", json={"query": "{ instance { info } }"}, timeout=60
        ).json()
        info = reply["data"]["instance"]["info"]
        assert "PostgresRunStorage" in info and "PostgresEventLogStorage" in info, info
        assert PASSWORD not in info
        # the daemon, a grandchild of promptopt, reports its heartbeats to the same database
        ui.wait_ready(
            lambda: postgres_server.execute("SELECT count(*) FROM daemon_heartbeats", database=database)[0][
                0
            ],
            timeout=180,
        )
    finally:
        # promptopt ui stops its `dagster dev` (own session) on SIGTERM within 15 s: wait longer
        ui.stop(timeout=60)
        ui.close()
    assert ui.returncode == 0, ui.log_text()[-3000:]
    assert PASSWORD not in (tmp_path / "home" / "dagster" / "dagster.yaml").read_text()
