"""PromptState: one version of a prompt, with lineage, rendered per dataset row."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from promptopt_dagster.core.storage import read_text, write_text
from promptopt_dagster.llm.base import Message

# `{column}` placeholders. Anything else in braces (JSON examples, `{}`) is left as written,
# so prompts may contain braces without escaping.
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _now() -> datetime:
    return datetime.now(UTC)


class PromptState(BaseModel):
    system_prompt: str
    output_prompt: str
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    parent_id: str | None = None
    version: int = 1
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=_now)

    def placeholders(self) -> set[str]:
        return set(PLACEHOLDER.findall(self.output_prompt))

    def missing_columns(self, columns: set[str] | list[str]) -> list[str]:
        """Placeholders the template uses that are not among `columns`."""
        return sorted(self.placeholders() - set(columns))

    def render(self, row: Mapping[str, Any]) -> list[Message]:
        """Messages for one row: each `{name}` naming a key of `row` is filled in; other braces
        stay as written. Check `missing_columns` against the dataset before rendering."""

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            return str(row[name]) if name in row else match.group(0)

        messages = []
        if self.system_prompt.strip():
            messages.append(Message(role="system", content=self.system_prompt))
        messages.append(Message(role="user", content=PLACEHOLDER.sub(fill, self.output_prompt)))
        return messages

    def content_hash(self) -> str:
        """Identity of the texts alone: two versions with the same texts hash alike."""
        text = self.system_prompt + "\x00" + self.output_prompt
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def child(self, system_prompt: str, output_prompt: str, **metadata: Any) -> PromptState:
        """A derived version. Its id is a function of parent and texts, so proposing the same
        candidate again (re-materializing an iteration) gives the same id."""
        key = f"{self.id}\x00{system_prompt}\x00{output_prompt}"
        return PromptState(
            id=hashlib.sha256(key.encode()).hexdigest()[:12],
            system_prompt=system_prompt,
            output_prompt=output_prompt,
            parent_id=self.id,
            version=self.version + 1,
            metadata=metadata,
        )

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str) -> PromptState:
        return cls.model_validate_json(text)

    def save(self, uri: str) -> str:
        """Write JSON to a local path or a gs:// URI; returns the URI."""
        write_text(uri, self.to_json())
        return uri

    @classmethod
    def load(cls, uri: str) -> PromptState:
        return cls.from_json(read_text(uri))
