"""What every iteration asset needs: its study and iteration, from the partition key."""

from dataclasses import dataclass

import dagster as dg

from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.core.study_data import StudyData, load_study_data
from promptopt_dagster.partitions import parse_key
from promptopt_dagster.resources import PromptStoreResource

GROUP = "iteration"


@dataclass
class Scope:
    study: StudyConfig
    iteration: int

    def data(self) -> StudyData:
        return load_study_data(self.study)


def scope_of(context: dg.AssetExecutionContext, prompt_store: PromptStoreResource) -> Scope:
    name, iteration = parse_key(context.partition_key)
    return Scope(study=prompt_store.store.load_study(name), iteration=iteration)


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
