"""The prompt store: registered studies, every prompt version and each iteration's decision.

Iteration N+1 starts from the champion that iteration N wrote here; Dagster forbids that link
as an asset dependency (it would be a cycle), so it goes through this store instead.

Layout under the root (a local folder or gs://bucket/prefix):
    studies/<study>/study.yaml              the registered study (written last)
    studies/<study>/registration            an id that changes when the study is registered anew
    studies/<study>/forgotten               present while the study's removal is under way
    studies/<study>/iterations/0003.json    IterationRecord of iteration 3
    prompts/<study>/<prompt id>.json        every prompt version, with parent_id lineage
"""

from __future__ import annotations

import uuid

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.records import IterationRecord
from promptopt_dagster.core.study import StudyConfig, check_study_name, dump_study, parse_study
from promptopt_dagster.errors import StudyConfigError
from promptopt_dagster.storage import (
    as_path,
    delete,
    exists,
    join,
    list_files,
    prune_empty_folders,
    read_text,
    write_text,
)

FORGOTTEN = "forgotten"  # marks a study whose removal has begun


def iteration_key(iteration: int) -> str:
    """Zero-padded so partition keys sort in iteration order."""
    return f"{iteration:04d}"


class PromptStore:
    def __init__(self, root: str) -> None:
        self.root = str(root)

    def _study_dir(self, study: str) -> str:
        return join(self.root, "studies", check_study_name(study))

    def _prompts_dir(self, study: str) -> str:
        return join(self.root, "prompts", check_study_name(study))

    def _tombstone(self, study: str) -> str:
        return join(self._study_dir(study), FORGOTTEN)

    # studies
    def register_study(self, study: StudyConfig) -> bool:
        """Store the study. Returns False when the same study is already registered; a different
        study under the same name is refused, so a finished study is never silently redone.
        A forget that was cut short is finished first."""
        if exists(self._tombstone(study.name)):
            self._purge(study.name)
        path = join(self._study_dir(study.name), "study.yaml")
        text = dump_study(study)
        if exists(path):
            if read_text(path) == text:
                return False
            raise StudyConfigError(
                f"a different study named {study.name!r} is already registered in {self.root}; "
                "rename the study (its `name:` field), or start it over with "
                f"`promptopt run STUDY.yaml --fresh` (which forgets the old one)"
            )
        self.save_prompt(study.name, study.seed_prompt_state())
        write_text(join(self._study_dir(study.name), "registration"), uuid.uuid4().hex[:8])
        write_text(path, text)  # last: a study is registered once its file is there
        return True

    def registration_id(self, name: str) -> str:
        """Changes when a study is forgotten and registered again, so run keys and
        materializations of the old one are not taken for the new one's."""
        return read_text(join(self._study_dir(name), "registration")).strip()

    def is_registered(self, name: str) -> bool:
        return exists(join(self._study_dir(name), "study.yaml")) and not exists(self._tombstone(name))

    def load_study(self, name: str) -> StudyConfig:
        if not self.is_registered(name):
            raise StudyConfigError(f"study {name!r} is not registered in {self.root}{self._known()}")
        path = join(self._study_dir(name), "study.yaml")
        return parse_study(read_text(path), source=path)

    def _known(self) -> str:
        names = self.studies()
        return f" (registered: {', '.join(names)})" if names else " (no study is registered)"

    def studies(self) -> list[str]:
        """Registered studies; one being forgotten is not among them."""
        root = join(self.root, "studies")
        registered = {as_path(f).parent.name for f in list_files(root, "*/study.yaml")}
        forgotten = {as_path(f).parent.name for f in list_files(root, f"*/{FORGOTTEN}")}
        return sorted(registered - forgotten)

    def begin_forget(self, name: str) -> str:
        """Mark `name` forgotten: from here on it reads as not registered, and `finish_forget`
        (or registering it again) removes its files. Returns the registration id forgotten.
        Unknown names are an error; nothing is changed then."""
        if not self.is_registered(name):
            if exists(self._tombstone(name)):
                return read_text(self._tombstone(name)).strip()
            raise StudyConfigError(f"no study named {name!r} in {self.root}{self._known()}")
        registration = self.registration_id(name)
        write_text(self._tombstone(name), registration)
        return registration

    def finish_forget(self, name: str) -> None:
        """Remove the files of a study marked forgotten (its prompts, records and study file);
        the mark goes last, so a cut-short removal is finished by the next forget or register."""
        if not exists(self._tombstone(name)):
            raise StudyConfigError(f"study {name!r} is not being forgotten; call begin_forget first")
        self._purge(name)

    def _purge(self, name: str) -> None:
        tombstone = self._tombstone(name)
        for sub in (self._prompts_dir(name), self._study_dir(name)):
            for f in list_files(sub, "**/*"):
                if as_path(f).name != FORGOTTEN:
                    delete(f)
        delete(tombstone)
        for sub in (self._prompts_dir(name), self._study_dir(name)):
            prune_empty_folders(sub)

    # prompts
    def save_prompt(self, study: str, prompt: PromptState) -> str:
        return prompt.save(join(self._prompts_dir(study), f"{prompt.id}.json"))

    def load_prompt(self, study: str, prompt_id: str) -> PromptState:
        return PromptState.load(join(self._prompts_dir(study), f"{prompt_id}.json"))

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

