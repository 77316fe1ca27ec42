"""What the iteration assets share: the study and iteration of their partition, and metadata."""

from typing import NamedTuple

import dagster as dg

from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.partitions import parse_key
from promptopt_dagster.resources import PromptStoreResource

GROUP = "iteration"


class StudyIteration(NamedTuple):
    """The study (its registered config) and the iteration an asset's partition key names."""

    study: StudyConfig
    iteration: int


def study_iteration(context: dg.AssetExecutionContext, prompt_store: PromptStoreResource) -> StudyIteration:
    name, iteration = parse_key(context.partition_key)
    return StudyIteration(prompt_store.store.load_study(name), iteration)


def prompt_markdown(system_prompt: str, output_prompt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(
        f"**System prompt**\n\n```\n{system_prompt or '(none)'}\n```\n\n"
        f"**Output prompt**\n\n```\n{output_prompt}\n```"
    )


def usage_metadata(usage: dict[str, float]) -> dict[str, dg.MetadataValue]:
    return {
        f"llm_{k}" if not k.startswith("llm_") else k: dg.MetadataValue.float(float(v))
        if isinstance(v, float)
        else dg.MetadataValue.int(int(v))
        for k, v in usage.items()
    }
