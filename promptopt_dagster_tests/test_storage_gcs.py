"""storage on gs:// against the real gcp-storage-emulator: reads, writes, listings, errors,
retries, and an outage in the middle of a Dagster run."""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from gcsfs.retry import HttpError

from promptopt_dagster import storage
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.errors import StorageError
from promptopt_dagster.io_managers import PromptoptIOManager
from promptopt_dagster_tests.support.gcs_emulator import (
    GcsEmulator,
    emulator_environment,
    gcs_emulator,  # noqa: F401
)

# With 3 attempts and waits of 0.05-0.2 s an unreachable store must fail well within this.
OUTAGE_DEADLINE_S = 5.0


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(storage.ENV_RETRY_ATTEMPTS, "3")
    monkeypatch.setenv(storage.ENV_RETRY_INITIAL_WAIT, "0.05")
    monkeypatch.setenv(storage.ENV_RETRY_MAX_WAIT, "0.2")


@pytest.fixture
def prefix(gcs_emulator: GcsEmulator) -> str:  # noqa: F811
    return gcs_emulator.uri("t", uuid.uuid4().hex[:8])


@pytest.mark.e2e
def test_write_read_list_exists(prefix: str) -> None:
    storage.write_text(f"{prefix}/a.json", '{"a": 1}')
    storage.write_bytes(f"{prefix}/sub/b.bin", b"\x00\x01")
    storage.write_text(f"{prefix}/sub/c.json", "[]")

    assert storage.read_text(f"{prefix}/a.json") == '{"a": 1}'
    assert storage.read_bytes(f"{prefix}/sub/b.bin") == b"\x00\x01"
    assert storage.exists(f"{prefix}/a.json")
    assert not storage.exists(f"{prefix}/nope.json")
    assert storage.list_files(prefix) == [f"{prefix}/a.json"]
    assert storage.list_files(prefix, "**/*.json") == [f"{prefix}/a.json", f"{prefix}/sub/c.json"]
    assert storage.list_files(f"{prefix}/empty") == []

    storage.delete(f"{prefix}/a.json")
    assert not storage.exists(f"{prefix}/a.json")


@pytest.mark.e2e
def test_prompt_state_round_trip_on_gcs(prefix: str) -> None:
    state = PromptState(system_prompt="Be exact.", output_prompt="Q: {question}\nA:")
    uri = state.save(f"{prefix}/prompts/{state.id}.json")
    assert PromptState.load(uri) == state


@pytest.mark.e2e
def test_missing_object_and_bucket_fail_at_once(prefix: str, gcs_emulator: GcsEmulator) -> None:  # noqa: F811
    started = time.monotonic()
    with pytest.raises(storage.MissingObjectError, match="does not exist") as missing:
        storage.read_text(f"{prefix}/missing.json")
    assert isinstance(missing.value, StorageError) and f"{prefix}/missing.json" in str(missing.value)

    with pytest.raises(StorageError, match=r"bucket gs://no-such-bucket does not exist.*create it"):
        storage.write_text("gs://no-such-bucket/x.json", "{}")
    with pytest.raises(StorageError, match="bucket gs://no-such-bucket does not exist"):
        storage.list_files("gs://no-such-bucket/runs")
    assert time.monotonic() - started < 2.0  # no retries for errors retrying cannot fix


def test_transient_http_errors_are_retried_then_reported() -> None:
    calls: list[int] = []

    def flaky(fs: object, path: str) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise HttpError({"code": 503 if len(calls) == 1 else 429, "message": "slow down"})
        return "ok"

    assert storage.with_retries("read", "gs://b/k", flaky) == "ok"
    assert len(calls) == 3

    def always_busy(fs: object, path: str) -> str:
        calls.append(1)
        raise HttpError({"code": 503, "message": "backend unavailable"})

    calls.clear()
    with pytest.raises(StorageError, match=r"storage unreachable: could not read gs://b/k after 3 attempt"):
        storage.with_retries("read", "gs://b/k", always_busy)
    assert len(calls) == 3

    def forbidden(fs: object, path: str) -> str:
        calls.append(1)
        raise HttpError({"code": 403, "message": "caller does not have storage.objects.get access"})

    calls.clear()
    with pytest.raises(StorageError, match="no permission to read gs://b/k: check the credentials"):
        storage.with_retries("read", "gs://b/k", forbidden)
    assert len(calls) == 1


def test_messages_never_show_credentials() -> None:
    def refused(fs: object, path: str) -> str:
        raise ConnectionRefusedError("connect to https://user:s3cret@example.com/x refused")

    with pytest.raises(StorageError) as excinfo:
        storage.with_retries("read", "https://user:s3cret@example.com/x", refused)
    assert "s3cret" not in str(excinfo.value) and "example.com/x" in str(excinfo.value)


# --- outage ---------------------------------------------------------------------------------


@pytest.fixture
def own_emulator(tmp_path: Path) -> Iterator[GcsEmulator]:
    """An emulator this test may stop; on-disk data so what an outage left behind stays visible."""
    with GcsEmulator(bucket="outage", data_dir=tmp_path / "gcs") as emulator, emulator_environment(emulator):
        yield emulator


def _fails_fast(action: object) -> StorageError:
    started = time.monotonic()
    with pytest.raises(StorageError, match="storage unreachable") as excinfo:
        action()  # type: ignore[operator]
    assert time.monotonic() - started < OUTAGE_DEADLINE_S
    return excinfo.value


@pytest.mark.e2e
def test_outage_fails_fast_and_recovers(own_emulator: GcsEmulator) -> None:
    kept = own_emulator.uri("kept.json")
    storage.write_text(kept, "before")
    own_emulator.stop()

    error = _fails_fast(lambda: storage.read_text(kept))
    assert own_emulator.endpoint in str(error) and "after 3 attempt(s)" in str(error)
    _fails_fast(lambda: storage.write_text(own_emulator.uri("new.json"), "during"))
    _fails_fast(lambda: storage.exists(kept))  # an outage is not "absent"
    _fails_fast(lambda: storage.list_files(own_emulator.uri()))

    own_emulator.start()
    assert storage.read_text(kept) == "before"
    assert not storage.exists(own_emulator.uri("new.json"))
    storage.write_text(own_emulator.uri("new.json"), "after")
    assert storage.read_text(own_emulator.uri("new.json")) == "after"


@pytest.mark.e2e
def test_materialization_during_outage_fails_cleanly(own_emulator: GcsEmulator) -> None:
    """`first` is stored, then the store goes away while `second` runs: the run fails within the
    retry budget, `second` leaves no object, and after recovery the same run succeeds."""

    outage = {"on": True}

    @dg.asset
    def first() -> dict[str, int]:
        return {"n": 1}

    @dg.asset
    def second(first: dict[str, int]) -> dict[str, int]:
        if outage["on"]:
            own_emulator.stop()
        return {"n": first["n"] + 1}

    base = own_emulator.uri("runs")
    io_manager = PromptoptIOManager(base_uri=base)
    with dg.DagsterInstance.ephemeral() as instance:
        started = time.monotonic()
        result = dg.materialize(
            [first, second], resources={"io_manager": io_manager}, instance=instance, raise_on_error=False
        )
        assert time.monotonic() - started < 10 * OUTAGE_DEADLINE_S
        assert not result.success
        failure = result.failure_data_for_node("second")
        assert failure is not None and "storage unreachable" in str(failure.error)

        own_emulator.start()
        assert storage.list_files(base) == [f"{base}/first.json"]

        outage["on"] = False
        result = dg.materialize([first, second], resources={"io_manager": io_manager}, instance=instance)
        assert result.success
        assert storage.read_text(f"{base}/second.json").replace(" ", "").replace("\n", "") == '{"n":2}'
