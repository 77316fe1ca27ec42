"""Step 0: the prompt an iteration starts from (the seed, or the previous champion)."""

import dagster as dg

from promptopt_dagster.assets.common import iteration_asset, study_iteration
from promptopt_dagster.assets.metadata import prompt_markdown
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.resources import PromptStoreResource


@iteration_asset(kinds={"python"})
def current_prompt(context: dg.AssetExecutionContext, prompt_store: PromptStoreResource) -> PromptState:
    """The incumbent prompt, loaded through the prompt store: iteration N+1 cannot depend on
    iteration N as an asset (Dagster forbids the cycle), so lineage is kept by parent_id."""
    study, iteration = study_iteration(context, prompt_store)
    prompt = prompt_store.store.champion_before(study, iteration)
    context.add_output_metadata(
        {
            "prompt": prompt_markdown(prompt.system_prompt, prompt.output_prompt),
            "prompt_id": prompt.id,
            "parent_id": prompt.parent_id or "",
            "version": prompt.version,
            "chars": len(prompt.system_prompt) + len(prompt.output_prompt),
        }
    )
    return prompt
