"""Prompt Registry versions of an iteration: the seed (iteration 0) and every accepted prompt,
the rationale as commit message, scores as version tags, alias ``champion`` on the best version
so far. Each is registered once: found again by its PromptState id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.tracking.client import MlflowTracker
from promptopt_dagster.tracking.layout import TAG_PROMPT_ID
from promptopt_dagster.tracking.run_log import IterationValues


@dataclass
class PromptVersionLog:
    """A prompt to register (once: found again by its PromptState id)."""

    prompt: PromptState
    commit_message: str
    tags: dict[str, Any]
    champion: bool
    candidate_id: str | None = None  # link the version to this candidate's run (else the parent)


def prompt_version_logs(v: IterationValues) -> list[PromptVersionLog]:
    """The versions the iteration adds: the seed at iteration 0, the accepted candidate if any."""
    record, incumbent, iteration = v.record, v.incumbent, v.record.iteration
    best = record.champion_val_score >= record.best_val_score - 1e-9
    prompts: list[PromptVersionLog] = []
    if iteration == 0:
        prompts.append(
            PromptVersionLog(
                prompt=incumbent,
                commit_message="seed prompt",
                tags={
                    TAG_PROMPT_ID: incumbent.id,
                    "iteration": iteration,
                    "val_score": record.incumbent_val_score,
                    "train_score": record.incumbent_train_score,
                    "strategy": "seed",
                    "answer_parser": incumbent.answer_parser,
                },
                champion=best and not record.accepted,
            )
        )
    if record.accepted and record.accepted_id:
        winner = next(c for c in v.candidates if c.prompt.id == record.accepted_id)
        score = {s.candidate_id: s for s in record.candidates}.get(record.accepted_id)
        prompts.append(
            PromptVersionLog(
                prompt=winner.prompt,
                commit_message=winner.rationale or winner.strategy,
                tags={
                    TAG_PROMPT_ID: winner.prompt.id,
                    "parent_id": winner.prompt.parent_id or "",
                    "iteration": iteration,
                    "strategy": winner.strategy,
                    "val_score": record.champion_val_score,
                    "train_score": score.train_score if score else "",
                    "incumbent_val_score": record.incumbent_val_score,
                    # apply core.answers.parse_answer(reply, this) to the model's reply
                    "answer_parser": winner.prompt.answer_parser,
                },
                champion=best,
                candidate_id=winner.prompt.id,
            )
        )
    return prompts


def register_versions(
    tracker: MlflowTracker,
    study: str,
    items: list[PromptVersionLog],
    candidate_runs: dict[str, str],
    parent_run_id: str,
) -> dict[str, int | None]:
    """Register each prompt not yet in the registry (moving the alias when it is the champion);
    returns PromptState id -> version (None: queued in the outbox)."""
    versions: dict[str, int | None] = {}
    for item in items:
        existing = tracker.prompt_version_of(study, item.prompt.id)
        if existing is not None:
            if item.champion:
                tracker.set_champion(study, existing)
            versions[item.prompt.id] = existing
            continue
        versions[item.prompt.id] = tracker.register_prompt(
            study,
            item.prompt.system_prompt,
            item.prompt.output_prompt,
            commit_message=item.commit_message,
            tags=item.tags,
            champion=item.champion,
            run_id=candidate_runs.get(item.candidate_id or "", parent_run_id),
        )
    return versions
