"""The Prompt Registry half of the live store: a prompt version is registered once, also when
processes register the same prompt at the same moment, and the champion alias points at one.

On a local store the creation lock (`connection.py`) makes registering atomic. On any store the
convergent rule of `store.py` then applies, with the smallest version number as the canonical
version: the store numbers versions in order, so a version nobody has seen yet always has a
larger number.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from promptopt_dagster.tracking.connection import StoreConnection, mlflow_global_uris
from promptopt_dagster.tracking.layout import CHAMPION_ALIAS, TAG_PROMPT_ID, TAG_STUDY, prompt_name

logger = logging.getLogger(__name__)

SEARCH_ATTEMPTS = 5


@dataclass(frozen=True)
class RegisteredPrompt:
    """A prompt version read back from the registry."""

    name: str
    version: int
    system_prompt: str
    output_prompt: str
    commit_message: str | None
    tags: dict[str, str]


def to_registered(pv: Any) -> RegisteredPrompt:
    """A registry `PromptVersion` (chat or text template) as system and output prompt."""
    template = pv.template
    if isinstance(template, str):
        system, output = "", template
    else:
        system = next((m["content"] for m in template if m.get("role") == "system"), "")
        output = next((m["content"] for m in template if m.get("role") == "user"), "")
    return RegisteredPrompt(
        name=pv.name,
        version=int(pv.version),
        system_prompt=system,
        output_prompt=output,
        commit_message=pv.commit_message,
        tags={k: v for k, v in (pv.tags or {}).items() if not k.startswith("mlflow.")},
    )


class PromptRegistry(StoreConnection):
    """The Prompt Registry operations of the live store (`store.LiveStore` has them all)."""

    def prompt_versions(self, name: str) -> list[Any]:
        """The registry versions of prompt `name`; empty if the prompt does not exist.

        While other processes register versions of the same prompt, MLflow's search sometimes
        returns a version without its tags and then refuses the whole answer ("registered as a
        model, not a prompt"); a moment later the same search succeeds, so it is repeated a few
        times before the error counts."""
        from mlflow.exceptions import MlflowException

        for attempt in range(SEARCH_ATTEMPTS):
            try:
                return self._prompt_versions_once(name)
            except MlflowException as exc:
                if attempt == SEARCH_ATTEMPTS - 1 or "registered as a model" not in str(exc):
                    raise
                time.sleep(0.05 * 2**attempt)  # another process's transaction, which no event announces
        raise AssertionError("unreachable")

    def _prompt_versions_once(self, name: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        out: list[Any] = []
        token: str | None = None
        while True:  # pages of 100, newest first
            try:
                page = self.client.search_prompt_versions(name, page_token=token)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return []
                raise
            out.extend(getattr(page, "prompt_versions", page))
            token = getattr(page, "token", None)
            if not token:
                return out

    def load_prompt(self, uri: str) -> RegisteredPrompt | None:
        pv = self.client.load_prompt(uri, allow_missing=True, cache_ttl_seconds=0)
        return None if pv is None else to_registered(pv)

    def register_prompt(
        self,
        study: str,
        system_prompt: str,
        output_prompt: str,
        commit_message: str | None,
        tags: dict[str, str],
        champion: bool,
        run_id: str | None = None,
    ) -> int:
        """A prompt version, registered once: a version with the same ``promptopt.prompt_id`` tag
        (without one: the same template) is reused. Atomic on local stores, convergent on
        servers (module docstring)."""
        name = prompt_name(study)
        template = [{"role": "system", "content": system_prompt}, {"role": "user", "content": output_prompt}]
        ident = tags.get(TAG_PROMPT_ID)
        with self.creating():
            found = self._find_versions(name, ident, template)
            if not found:
                found = self._register_and_converge(
                    name, ident, template, commit_message, {**tags, TAG_STUDY: study}
                )
            version = found[0]
        if champion:
            self.set_champion(study, version)
        if run_id:
            self._link_version(run_id, name, version)
        return version

    def _link_version(self, run_id: str, name: str, version: int, attempts: int = 5) -> None:
        """Link a prompt version to a run. MLflow links by rewriting the run's
        ``mlflow.linkedPrompts`` tag (read, then insert), so processes linking to one run at once
        can collide on the tag's primary key; the link is idempotent, so it is retried until the
        tag lists the version."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                # The registry store resolves the run through the *global* tracking URI.
                with mlflow_global_uris(self.tracking_uri, self.registry_uri):
                    self.client.link_prompt_version_to_run(run_id, f"prompts:/{name}/{version}")
                return
            except MlflowException:
                if self._is_linked(run_id, name, version):
                    return
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    def _is_linked(self, run_id: str, name: str, version: int) -> bool:
        linked = self.client.get_run(run_id).data.tags.get("mlflow.linkedPrompts", "[]")
        try:
            entries = json.loads(linked)
        except ValueError:
            return False
        return any(e.get("name") == name and str(e.get("version")) == str(version) for e in entries)

    def _find_versions(self, name: str, prompt_id: str | None, template: list[dict[str, str]]) -> list[int]:
        """The versions of `name` with PromptState id `prompt_id` (without an id: with
        `template`), smallest (canonical) first."""
        return sorted(
            int(v.version)
            for v in self.prompt_versions(name)
            if ((v.tags or {}).get(TAG_PROMPT_ID) == prompt_id if prompt_id else v.template == template)
        )

    def _register_and_converge(
        self,
        name: str,
        prompt_id: str | None,
        template: list[dict[str, str]],
        commit_message: str | None,
        tags: dict[str, str],
    ) -> list[int]:
        """Register a version, then delete every version of the same prompt but the canonical
        one (ours or another process's); returns [the canonical version].

        Deleting another process's duplicate is safe: a version is used only by a process that
        found it canonical, and every smaller version was visible then. MLflow can also fail
        after the version is stored (while other processes register versions of the same prompt,
        its answer sometimes lacks the version's tags), so the search afterwards, not the answer,
        tells which versions exist."""
        from mlflow.exceptions import MlflowException

        try:
            self._new_version(name, template, commit_message, tags)
        except MlflowException as exc:
            if not self._find_versions(name, prompt_id, template):
                raise
            logger.info("registering a version of %s failed after storing it (%s)", name, exc.error_code)
        canonical, *duplicates = self._find_versions(name, prompt_id, template)
        for version in duplicates:
            try:
                self.client.delete_prompt_version(name, str(version))
            except MlflowException:  # deleted meanwhile by the process that registered it
                continue
            logger.info(
                "deleted %s version %d: processes registered the same prompt at the same time, "
                "version %d is kept",
                name,
                version,
                canonical,
            )
        return [canonical]

    def _new_version(
        self, name: str, template: list[dict[str, str]], commit_message: str | None, tags: dict[str, str]
    ) -> None:
        """Register a version; the first version also creates the prompt, and when another
        process creates it at the same moment, MLflow refuses one creation: retried once."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.register_prompt(name, template, commit_message=commit_message, tags=tags)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            self.client.register_prompt(name, template, commit_message=commit_message, tags=tags)

    def set_champion(self, study: str, version: int) -> None:
        """Point the alias at `version`. The store inserts a new alias row, and when another
        process inserts it at the same moment it refuses one (a unique-key error); the retry
        then updates the existing row."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))
        except MlflowException:
            self.client.set_prompt_alias(prompt_name(study), CHAMPION_ALIAS, int(version))
