"""Shared fixtures: a scripted pipeline on an ephemeral Dagster instance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from promptopt_dagster_tests.support.pipeline import Pipeline, make_pipeline


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    with dg.instance_for_test() as instance:
        yield make_pipeline(tmp_path, instance)
