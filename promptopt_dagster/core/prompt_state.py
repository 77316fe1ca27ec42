"""PromptState: one version of a prompt, with lineage, rendered per dataset row."""

from __future__ import annotations

import hashlib
import re
import string
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from promptopt_dagster.core.answers import AnswerParser, parse_answer
from promptopt_dagster.llm.base import Message
from promptopt_dagster.storage import read_text, write_text

# The one template rule, as in Python's `str.format`: in the output prompt `{column}` is filled
# with the row's value, and `{{` / `}}` stand for literal braces. The system prompt is plain text,
# sent as written. So `template.format(**row)` renders an output prompt the same way anywhere
# (here, from the MLflow Prompt Registry, in a production caller).
_FORMATTER = string.Formatter()
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A `{column}` placeholder as it appears in text (a system prompt, a line an LLM wrote).
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}")
BRACE_RULE = (
    "in an output prompt, {column} is filled from the row and literal braces are written "
    "doubled: {{ and }} (as in Python's str.format)"
)


def template_error(template: str) -> str | None:
    """Why `template` breaks the rule, or None when it follows it."""
    try:
        pieces = list(_FORMATTER.parse(template))
    except ValueError as exc:
        return f"{exc}; {BRACE_RULE}"
    for _, field, spec, conversion in pieces:
        if field is None:
            continue
        if not IDENTIFIER.fullmatch(field) or spec or conversion:
            suffix = (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            return f"{'{' + field + suffix + '}'!r} is not a {{column}} placeholder; {BRACE_RULE}"
    return None


def template_fields(template: str) -> list[str]:
    """The columns a valid template uses, in order of first use ([] for an invalid one)."""
    if template_error(template) is not None:
        return []
    fields = [field for _, field, _, _ in _FORMATTER.parse(template) if field is not None]
    return list(dict.fromkeys(fields))


def fill_template(template: str, row: Mapping[str, Any]) -> str:
    """`template` with each {column} replaced by str(row[column]) and {{ }} by { }: the same
    result as `template.format(**row)` for a valid template."""
    problem = template_error(template)
    if problem is not None:
        raise ValueError(problem)
    out = []
    for literal, field, _, _ in _FORMATTER.parse(template):
        out.append(literal)
        if field is not None:
            if field not in row:
                raise KeyError(f"the row has no column {field!r} that the template uses")
            out.append(str(row[field]))
    return "".join(out)


def _now() -> datetime:
    return datetime.now(UTC)


class PromptState(BaseModel):
    system_prompt: str
    output_prompt: str
    # how a reply becomes the answer (core.answers.parse_answer); part of the prompt
    answer_parser: AnswerParser = "raw"
    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    parent_id: str | None = None
    version: int = 1
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=_now)

    def placeholders(self) -> set[str]:
        return set(template_fields(self.output_prompt))

    def template_error(self) -> str | None:
        """Why the output prompt is not a valid template, or None."""
        return template_error(self.output_prompt)

    def missing_columns(self, columns: set[str] | list[str]) -> list[str]:
        """Placeholders the template uses that are not among `columns`."""
        return sorted(self.placeholders() - set(columns))

    def render(self, row: Mapping[str, Any]) -> list[Message]:
        """Messages for one row: the system prompt as written, the output prompt filled by
        `fill_template`. Check `missing_columns` against the dataset before rendering."""
        messages = []
        if self.system_prompt.strip():
            messages.append(Message(role="system", content=self.system_prompt))
        messages.append(Message(role="user", content=fill_template(self.output_prompt, row)))
        return messages

    def content_hash(self) -> str:
        """Identity of the texts alone: two versions with the same texts hash alike."""
        text = self.system_prompt + "\x00" + self.output_prompt
        if self.answer_parser != "raw":
            text += "\x00" + self.answer_parser
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def parse(self, reply: str) -> str:
        """The answer in a model's reply to this prompt."""
        return parse_answer(reply, self.answer_parser)

    def child(
        self, system_prompt: str, output_prompt: str, answer_parser: AnswerParser = "raw", **metadata: Any
    ) -> PromptState:
        """A derived version. Its id is a function of parent, texts and parser, so proposing the
        same candidate again (re-materializing an iteration) gives the same id."""
        key = f"{self.id}\x00{system_prompt}\x00{output_prompt}"
        if answer_parser != "raw":
            key += f"\x00{answer_parser}"
        return PromptState(
            id=hashlib.sha256(key.encode()).hexdigest()[:12],
            system_prompt=system_prompt,
            output_prompt=output_prompt,
            answer_parser=answer_parser,
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


def messages_for_row(
    prompt: PromptState | Sequence[Mapping[str, str]] | Any, row: Mapping[str, Any]
) -> list[dict[str, str]]:
    """Ready chat messages (`[{"role": ..., "content": ...}]`) for one row, from a PromptState, a
    chat template as the MLflow Prompt Registry returns it (`prompt.template`: a system and a
    user message), or a loaded MLflow prompt itself. Production callers use this to send a
    registered prompt exactly as the optimizer measured it, and read the answer out of the reply
    with `core.answers.parse_answer(reply, parser)`, the parser being `PromptState.answer_parser`
    or the registered version's `answer_parser` tag."""
    if isinstance(prompt, PromptState):
        return [m.model_dump() for m in prompt.render(row)]
    # The registry keeps the parser in the version's tags; parse replies with core.answers.
    template = getattr(prompt, "template", prompt)
    if isinstance(template, str):
        template = [{"role": "user", "content": template}]
    system = next((m["content"] for m in template if m.get("role") == "system"), "")
    user = next((m["content"] for m in template if m.get("role") == "user"), None)
    if user is None:
        raise ValueError("the template has no user message to fill")
    state = PromptState(system_prompt=system, output_prompt=user)
    return [m.model_dump() for m in state.render(row)]
