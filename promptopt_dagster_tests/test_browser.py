"""The Dagster UI in a real headless browser (Debian's chromium, driven by Playwright): the asset
graph, an iteration's asset page with its scores, and the study x iteration partition grid.
Screenshots go to test-artifacts/ (gitignored) for a human to look at."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster_tests.support.dagster_dev import (
    LOCATION,
    REPOSITORY,
    Backfilled,
    DagsterDev,
    StudyRun,
)
from promptopt_dagster_tests.support.ui_fixtures import open_page, shot

pytestmark = pytest.mark.e2e

pytest_plugins = ["promptopt_dagster_tests.support.ui_fixtures"]

def group_url(server: DagsterDev, group: str) -> str:
    return f"{server.url}/locations/{REPOSITORY}@{LOCATION}/asset-groups/{group}"


def test_asset_graph_shows_the_iteration_and_backfill_assets(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    open_page(page, group_url(dagster_dev, "iteration"))
    # Zoomed out to fit, the graph shortens long names ("basel..._predictions"): check the short ones.
    for name in (
        "current_prompt",
        "baseline_metrics",
        "candidate_prompts",
        "candidate_metrics",
        "iteration_decision",
    ):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    shot(page, "asset_graph_iteration")
    open_page(page, group_url(dagster_dev, "backfill"))
    for name in ("prompt_evaluation", "evaluation_comparison"):
        expect(page.get_by_text(name, exact=True).first).to_be_visible()
    shot(page, "asset_graph_backfill")


def test_iteration_asset_page_shows_the_scores(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    latest = dagster_dev.materializations("iteration_decision", limit=1)[0]
    open_page(page, f"{dagster_dev.url}/assets/iteration_decision")
    for label in ("val_score", "best_val_score", "stop_reason", "champion"):
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    expect(page.get_by_text(latest["metadata"]["stop_message"], exact=True).first).to_be_visible()
    shot(page, "iteration_asset_page")


def test_partition_list_shows_each_iteration_that_ran_with_its_scores(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    key = study_iteration_key(finished_study.name, 0)
    first = next(m for m in dagster_dev.materializations("iteration_decision") if m["partition"] == key)
    open_page(page, f"{dagster_dev.url}/assets/iteration_decision?view=partitions")
    expect(page.get_by_text(study_iteration_key(finished_study.name, 1), exact=True).first).to_be_visible()
    expect(page.get_by_text("Missing (0)", exact=True).first).to_be_visible()  # only iterations that ran
    shot(page, "partition_grid")
    page.get_by_text(key, exact=True).first.click()
    expect(page.get_by_text("incumbent_val_score", exact=True).first).to_be_visible()
    expect(
        page.get_by_text(f"{first['metadata']['incumbent_val_score']:g}", exact=True).first
    ).to_be_visible()
    shot(page, "partition_iteration_0")


def test_comparison_asset_shows_prompt_version_by_dataset_scores(
    page: Page, dagster_dev: DagsterDev, backfilled: Backfilled
) -> None:
    open_page(page, f"{dagster_dev.url}/assets/evaluation_comparison")
    for label in ("comparison", "by_prompt_version", "evaluations"):
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    # The table metadata renders inline: one row per prompt version x dataset x metric.
    expect(page.get_by_text(backfilled.dataset, exact=True).first).to_be_visible()
    for version in backfilled.versions:
        expect(page.get_by_text(version, exact=True).first).to_be_visible()
    expect(page.get_by_text("exact_match", exact=True).first).to_be_visible()
    shot(page, "comparison_asset_page")
