"""The prompt store: registered studies, every prompt version and each iteration's decision.

Iteration N+1 starts from the champion that iteration N wrote here; Dagster forbids that link
as an asset dependency (it would be a cycle), so it goes through this store instead.

Layout under the root (a local folder or gs://bucket/prefix):
    studies/<study>/study.yaml              the registered study
    studies/<study>/iterations/0003.json    IterationRecord of iteration 3
    prompts/<study>/<prompt id>.json        every prompt version, with parent_id lineage
"""

from __future__ import annotations

import hashlib
import uuid

from promptopt_dagster.core.errors import StudyConfigError
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.storage import as_path, delete, exists, join, list_files, read_text, write_text
from promptopt_dagster.core.study import StudyConfig, dump_study, parse_study


def iteration_key(iteration: int) -> str:
    """Zero-padded so partition keys sort in iteration order."""
    return f"{iteration:04d}"


class PromptStore:
    def __init__(self, root: str) -> None:
        self.root = str(root)

    def _study_dir(self, study: str) -> str:
        return join(self.root, "studies", study)

    # studies
    def register_study(self, study: StudyConfig) -> bool:
        """Store the study. Returns False when the same study is already registered; a different
        study under the same name is refused, so a finished study is never silently redone."""
        path = join(self._study_dir(study.name), "study.yaml")
        text = dump_study(study)
        if exists(path):
            if read_text(path) == text:
                return False
            raise StudyConfigError(
                f"a different study named {study.name!r} is already registered in {self.root}; "
                "rename the study (its `name:` field) or remove the old one with "
                f"`promptopt forget {study.name}`"
            )
        write_text(path, text)
        write_text(join(self._study_dir(study.name), "registration"), uuid.uuid4().hex[:8])
        self.save_prompt(study.name, study.seed_prompt_state())
        return True

    def registration_id(self, name: str) -> str:
        """Changes when a study is forgotten and registered again, so run keys of the old one
        don't block the new one."""
        return read_text(join(self._study_dir(name), "registration")).strip()

    def load_study(self, name: str) -> StudyConfig:
        path = join(self._study_dir(name), "study.yaml")
        if not exists(path):
            raise StudyConfigError(f"study {name!r} is not registered in {self.root}")
        return parse_study(read_text(path), source=path)

    def studies(self) -> list[str]:
        files = list_files(join(self.root, "studies"), "*/study.yaml")
        return sorted(as_path(f).parent.name for f in files)

    def forget_study(self, name: str) -> None:
        for sub in (self._study_dir(name), join(self.root, "prompts", name)):
            for f in list_files(sub, "**/*"):
                delete(f)

    # prompts
    def save_prompt(self, study: str, prompt: PromptState) -> str:
        return prompt.save(join(self.root, "prompts", study, f"{prompt.id}.json"))

    def load_prompt(self, study: str, prompt_id: str) -> PromptState:
        return PromptState.load(join(self.root, "prompts", study, f"{prompt_id}.json"))

    # iterations
    def save_record(self, record: IterationRecord) -> str:
        self.save_prompt(record.study, record.champion)
        path = join(self._study_dir(record.study), "iterations", f"{iteration_key(record.iteration)}.json")
        write_text(path, record.model_dump_json(indent=2))
        return path

    def load_record(self, study: str, iteration: int) -> IterationRecord | None:
        path = join(self._study_dir(study), "iterations", f"{iteration_key(iteration)}.json")
        return IterationRecord.model_validate_json(read_text(path)) if exists(path) else None

    def records(self, study: str) -> list[IterationRecord]:
        files = list_files(join(self._study_dir(study), "iterations"), "*.json")
        return [IterationRecord.model_validate_json(read_text(f)) for f in files]

    def records_before(self, study: str, iteration: int) -> list[IterationRecord]:
        """Records of iterations 0..iteration-1; re-running iteration N ignores its old record."""
        return [r for r in self.records(study) if r.iteration < iteration]

    def champion_before(self, study: StudyConfig, iteration: int) -> PromptState:
        """The prompt iteration `iteration` starts from: the seed, or the previous champion."""
        if iteration == 0:
            return study.seed_prompt_state()
        previous = self.load_record(study.name, iteration - 1)
        if previous is None:
            raise StudyConfigError(
                f"iteration {iteration} of study {study.name!r} needs iteration {iteration - 1} "
                "to be materialized first"
            )
        return previous.champion


def study_fingerprint(study: StudyConfig) -> str:
    return hashlib.sha256(dump_study(study).encode()).hexdigest()[:12]
