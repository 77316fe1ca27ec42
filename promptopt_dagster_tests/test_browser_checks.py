"""The Dagster UI pages issue 10 made tell the truth at a glance, in a real headless browser: the
asset checks of an iteration, the study report's summary of how the study stopped, the candidate
scores table, and a prompt version shown as not applicable in the comparison. Screenshots go to
test-artifacts/ next to those of test_browser.py."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from promptopt_dagster.assets.checks import DECISION_CHECKS
from promptopt_dagster_tests.support.dagster_dev import ARTIFACTS, Backfilled, DagsterDev, StudyRun
from promptopt_dagster_tests.support.ui_fixtures import open_page, shot

pytestmark = pytest.mark.e2e

pytest_plugins = ["promptopt_dagster_tests.support.ui_fixtures"]



def test_checks_tab_lists_the_iteration_checks(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    open_page(page, f"{dagster_dev.url}/assets/iteration_decision?view=checks")
    for spec in DECISION_CHECKS:
        expect(page.get_by_text(spec.name, exact=True).first).to_be_visible()
    shot(page, "checks_iteration_decision")
    open_page(page, f"{dagster_dev.url}/assets/baseline_predictions?view=checks")
    # The list shortens the long name; the selected check shows its latest verdict and partition.
    expect(page.get_by_text(re.compile(r"predictions cover every expected row")).first).to_be_visible()
    expect(page.get_by_text("Passed", exact=True).first).to_be_visible()
    shot(page, "checks_baseline_predictions")


def test_study_report_says_how_the_study_stopped(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    [report] = [
        m["metadata"]
        for m in dagster_dev.materializations("study_report")
        if m["partition"] == finished_study.name
    ]
    assert report["summary"].startswith(f"study {finished_study.name} stopped:")
    open_page(page, f"{dagster_dev.url}/assets/study_report")
    expect(page.get_by_text("summary", exact=True).first).to_be_visible()
    expect(page.get_by_text(report["summary"], exact=True).first).to_be_visible()
    shot(page, "study_report_page")
    # The final prompt, wrapped to the width of the metadata panel.
    page.get_by_text("final_prompt", exact=True).first.scroll_into_view_if_needed()
    page.screenshot(path=str(ARTIFACTS / "study_report_final_prompt.png"))


def test_candidate_scores_are_a_table_with_the_candidate_ids(
    page: Page, dagster_dev: DagsterDev, finished_study: StudyRun
) -> None:
    latest = dagster_dev.materializations("candidate_metrics", limit=1)[0]
    open_page(page, f"{dagster_dev.url}/assets/candidate_metrics")
    expect(page.get_by_text("scores", exact=True).first).to_be_visible()
    first_id = latest["metadata"]["scores"][0]["candidate_id"]
    expect(page.get_by_text(first_id, exact=True).first).to_be_visible()
    shot(page, "candidate_metrics_page")


def test_comparison_shows_a_prompt_version_as_not_applicable(
    page: Page, dagster_dev: DagsterDev, backfilled: Backfilled
) -> None:
    open_page(page, f"{dagster_dev.url}/assets/evaluation_comparison")
    status = "not applicable: lacks review, label"
    expect(page.get_by_text(status, exact=True).first).to_be_visible()
    shot(page, "comparison_not_applicable")
