"""Pytest plugin: one `dagster dev` and one finished study for the whole session, shared by
test_webserver.py and the browser tests (`dagster dev` takes tens of seconds to start on 2 cores);
and the browser: Debian's chromium driven by Playwright (`browser`, `page`), with `open_page` and
`shot` (a screenshot in test-artifacts/).
Use it with ``pytest_plugins = ["promptopt_dagster_tests.support.ui_fixtures"]``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from promptopt_dagster.partitions import evaluation_key
from promptopt_dagster_tests.support.dagster_dev import (
    ARTIFACTS,
    BAD_DATASET,
    FINISHED,
    NEW_DATASET,
    NO_COLUMNS_DATASET,
    STUDY,
    Backfilled,
    DagsterDev,
    StudyRun,
    start_study_config,
    study_finished,
    tick_text,
    wait_for,
)
from promptopt_dagster_tests.support.scripted import write_dataset
from promptopt_dagster_tests.support.server_process import free_port


@pytest.fixture(scope="session")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DagsterDev]:
    server = DagsterDev(root=tmp_path_factory.mktemp("dagster_dev"), port=free_port())
    try:
        server.start()
        yield server
    finally:
        code = server.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dagster_dev.log").write_text(server.log_tail(200_000))
        assert code is not None


@pytest.fixture(scope="session")
def finished_study(dagster_dev: DagsterDev) -> StudyRun:
    """A study launched through the start_study job (GraphQL), carried to its stop by the daemon's
    sensors, its report included."""
    write_dataset(dagster_dev.datasets / f"{STUDY}.csv", rows=36)
    run_id = dagster_dev.client.submit_job_execution("start_study", run_config=start_study_config())
    wait_for(
        lambda: study_finished(dagster_dev), 420, f"study {STUDY} to reach its stop and its report", every=2
    )
    return StudyRun(STUDY, run_id)


@pytest.fixture(scope="session")
def backfilled(dagster_dev: DagsterDev, finished_study: StudyRun) -> Backfilled:
    server = dagster_dev

    def study_versions() -> list[str] | None:
        versions = [v for v in server.partition_keys("prompt_version") if v.startswith(f"{STUDY}:")]
        return versions if len(versions) >= 2 else None  # the seed and the accepted prompt

    versions = wait_for(study_versions, 90, "the seed and the accepted prompt to become prompt versions")
    write_dataset(server.datasets / NEW_DATASET, rows=20)
    (server.datasets / BAD_DATASET).write_bytes(b"not parquet")
    wait_for(lambda: NEW_DATASET in server.partition_keys("dataset"), 90, "the dataset sensor to register it")
    report = wait_for(
        lambda: next(
            (t for t in map(tick_text, server.sensor_ticks("new_dataset_sensor", 25)) if BAD_DATASET in t),
            None,
        ),
        60,
        f"the new_dataset_sensor tick reporting {BAD_DATASET}",
    )
    keys = [str(evaluation_key(v, NEW_DATASET)) for v in versions]
    backfill_id = server.launch_backfill("prompt_evaluation", keys)
    # At the same time (one daemon pass for both): the seed over a dataset lacking its columns,
    # registered by hand as a user could in the UI (the sensor itself skips such a file); it ends
    # green, the seed recorded as not applicable to the file.
    (server.datasets / NO_COLUMNS_DATASET).write_text("question,answer\n1+1,2\n")
    server.add_dynamic_partition("dataset", NO_COLUMNS_DATASET)
    bad_id = server.launch_backfill(
        "prompt_evaluation", [str(evaluation_key(f"{STUDY}:{STUDY}-seed", NO_COLUMNS_DATASET))]
    )
    status = wait_for(
        lambda: (s := server.backfill_status(backfill_id)) in FINISHED and s, 300, "the backfill", every=2
    )
    bad_status = wait_for(
        lambda: (s := server.backfill_status(bad_id)) in FINISHED and s,
        120,
        f"the backfill over {NO_COLUMNS_DATASET}",
        every=2,
    )
    wanted = {(v, NEW_DATASET) for v in versions} | {(f"{STUDY}:{STUDY}-seed", NO_COLUMNS_DATASET)}

    def compared() -> list[dict[str, Any]] | None:
        for mat in server.materializations("evaluation_comparison", limit=5):
            table = mat["metadata"]["comparison"]
            if {(r["prompt_version"], r["dataset"]) for r in table} >= wanted:
                return table
        return None

    table = wait_for(compared, 120, "the comparison sensor to refresh the comparison", every=2)
    return Backfilled(NEW_DATASET, versions, backfill_id, status, table, bad_id, bad_status, report)


# --- the browser ---------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_page(page: Page, url: str) -> None:
    """Go to `url` and wave off the first-visit "Join the Dagster community" dialog if it shows."""
    page.goto(url)
    page.wait_for_load_state("networkidle")
    skip = page.get_by_role("button", name="Skip")
    if skip.count():
        skip.click()
        expect(skip).to_have_count(0)
