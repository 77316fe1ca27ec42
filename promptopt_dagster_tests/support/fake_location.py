"""A test-only Dagster code location: the product's definitions, from the same settings, with the
scripted LLMs of support/scripted.py in place of the real backends, so `dagster dev` in tests
runs whole studies in seconds and never loads a model. Product code is untouched."""

from __future__ import annotations

import dagster as dg

from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support.scripted import scripted_llm_resource
from promptopt_dagster_tests.support.scripted_cli import block_primary_calls_from_environment


def build_fake_definitions(settings: Settings | None = None) -> dg.Definitions:
    settings = settings or Settings()
    real = build_definitions(settings)
    llm = scripted_llm_resource(settings)
    return dg.Definitions(
        assets=real.assets,
        asset_checks=real.asset_checks,
        jobs=real.jobs,
        sensors=real.sensors,
        schedules=real.schedules,
        resources={**(real.resources or {}), "llm": llm},
        executor=real.executor,
    )


defs = build_fake_definitions()


def defs_from_environment() -> dg.Definitions:
    """The definitions from the settings in the environment now: a pointer Dagster calls in each
    process that loads the location (a Celery worker, the process orchestrating a run), where
    `defs` holds what the environment was when the module was first imported. A test can stop
    the scripted primary model mid-call there (support/scripted_cli.py's BLOCKED_ENV)."""
    block_primary_calls_from_environment()
    return build_fake_definitions()


def product_defs_from_environment() -> dg.Definitions:
    """The product's own definitions (real LLM backends) from the settings in the environment
    now, for tests whose workers reach a fake server rather than a scripted model."""
    return build_definitions(Settings())
