"""Prompt Registry versions of an iteration: the seed (iteration 0) and every accepted prompt,
a commit message saying what changed (``iteration 2: add_examples (+4 demos), val 0.61 → 0.83``,
then the optimizer's rationale), scores as version tags (rounded, `score_text`), alias
``champion`` on the best version so far. Each is registered once: found again by its
PromptState id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.optimizer.parts import PromptParts
from promptopt_dagster.tracking.client import MlflowTracker
from promptopt_dagster.tracking.layout import TAG_PROMPT_ID, score_text
from promptopt_dagster.tracking.run_log import IterationValues


@dataclass
class PromptVersionLog:
    """A prompt to register (once: found again by its PromptState id)."""

    prompt: PromptState
    commit_message: str
    tags: dict[str, Any]
    champion: bool
    candidate_id: str | None = None  # link the version to this candidate's run (else the parent)


def describe_change(before: PromptState, after: PromptState) -> str:
    """What `after` changes in `before`, from the parts they were composed of, e.g.
    ``+4 demos, format rule added``; empty when the parts are the same."""
    a, b = PromptParts.of(before), PromptParts.of(after)
    changes: list[str] = []
    demos = len(b.demo_ids) - len(a.demo_ids)
    if demos:
        changes.append(f"{demos:+d} demo{'' if abs(demos) == 1 else 's'}")
    elif set(a.demo_ids) != set(b.demo_ids):
        changes.append("other demos")
    if a.format_rule != b.format_rule:
        changes.append(
            "format rule " + ("added" if not a.format_rule else "removed" if not b.format_rule else "changed")
        )
    if a.instruction != b.instruction:
        changes.append("instruction rewritten")
    if a.output_prompt != b.output_prompt:
        changes.append("output prompt changed")
    if a.answer_parser != b.answer_parser:
        changes.append(f"answer parser {b.answer_parser}")
    return ", ".join(changes)


def commit_message(
    iteration: int, strategy: str, change: str, val_before: float, val_after: float, rationale: str
) -> str:
    """``iteration 2: add_examples (+4 demos), val 0.61 → 0.83``, then the rationale."""
    what = f"{strategy} ({change})" if change else strategy
    head = f"iteration {iteration}: {what}, val {score_text(val_before)} → {score_text(val_after)}"
    return f"{head}\n\n{rationale.strip()}" if rationale.strip() else head


def prompt_version_logs(v: IterationValues) -> list[PromptVersionLog]:
    """The versions the iteration adds: the seed at iteration 0, the accepted candidate if any."""
    record, incumbent, iteration = v.record, v.incumbent, v.record.iteration
    best = record.champion_val_score >= record.best_val_score - 1e-9
    prompts: list[PromptVersionLog] = []
    if iteration == 0:
        prompts.append(
            PromptVersionLog(
                prompt=incumbent,
                commit_message=f"seed prompt, val {score_text(record.incumbent_val_score)}",
                tags={
                    TAG_PROMPT_ID: incumbent.id,
                    "iteration": iteration,
                    "val_score": score_text(record.incumbent_val_score),
                    "train_score": score_text(record.incumbent_train_score),
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
                commit_message=commit_message(
                    iteration,
                    winner.strategy,
                    describe_change(incumbent, winner.prompt),
                    record.incumbent_val_score,
                    record.champion_val_score,
                    winner.rationale,
                ),
                tags={
                    TAG_PROMPT_ID: winner.prompt.id,
                    "parent_id": winner.prompt.parent_id or "",
                    "iteration": iteration,
                    "strategy": winner.strategy,
                    "val_score": score_text(record.champion_val_score),
                    "train_score": score_text(score.train_score if score else None),
                    "incumbent_val_score": score_text(record.incumbent_val_score),
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
