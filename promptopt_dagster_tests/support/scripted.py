"""A scripted sentiment task for fast Dagster tests: the fake primary model answers with the
bare label only when its system prompt states the label set, and chats otherwise, so the
optimizer's format-rule candidate is the one that helps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from promptopt_dagster.core.study import ModelConfig, StudyConfig, load_study
from promptopt_dagster.llm.base import ChatRequest, LLMClient
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.fake import ScriptedLLM
from promptopt_dagster.resources import LLMResource
from promptopt_dagster.settings import Settings

GOOD = ["great", "excellent", "lovely", "superb", "fantastic", "wonderful"]
BAD = ["awful", "broken", "terrible", "useless", "horrible", "poor"]
ITEMS = ["phone", "kettle", "lamp", "chair", "camera", "bag"]


def write_dataset(path: Path, rows: int = 48) -> Path:
    data = []
    for i in range(rows):
        positive = i % 2 == 0
        word = (GOOD if positive else BAD)[i % 6]
        data.append(
            {
                "id": f"r{i:03d}",
                "review": f"The {ITEMS[i % 6]} is {word} (#{i}).",
                "label": "positive" if positive else "negative",
            }
        )
    pd.DataFrame(data).to_csv(path, index=False)
    return path


def write_study(folder: Path, name: str = "scripted", **overrides: object) -> Path:
    write_dataset(folder / f"{name}.csv")
    fields = {
        "name": name,
        "dataset": f"{name}.csv",
        "input_columns": ["review"],
        "reference_column": "label",
        "id_column": "id",
        "seed_prompt": {"output_prompt": "{review}"},
        "target_threshold": 1.01,
        "patience": 1,
        "max_iterations": 2,
        "candidates_per_iteration": 3,
        "minibatch_size": 6,
        "metrics": ["f1"],
    }
    fields.update(overrides)
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(fields))
    return path


def primary_responder(request: ChatRequest) -> str:
    system = request.messages[0].content if request.messages[0].role == "system" else ""
    user = request.messages[-1].content
    label = "positive" if any(w in user for w in GOOD) else "negative"
    if "one of:" in system:
        return label
    return f"Well, I would say this review sounds {label} to me!"


def optimizer_responder(request: ChatRequest) -> str:
    return json.dumps(
        {
            "candidates": [
                {"system_prompt": "Classify the sentiment of the review.", "rationale": "state the task"}
            ]
        }
    )


# Dagster builds a fresh resource object per run, so the scripted clients live here, keyed by
# the resource's cache (its URL, else its file), where tests can count their calls and swap their
# responders.
_CLIENTS: dict[tuple[str, str], ScriptedLLM] = {}


class ScriptedLLMResource(LLMResource):
    """The real LLMResource wiring (response cache included) around scripted clients."""

    def inner(self, role: str) -> ScriptedLLM:
        key = (str(self.response_cache_url or self.response_cache_path), role)
        if key not in _CLIENTS:
            responder = primary_responder if role == "primary" else optimizer_responder
            _CLIENTS[key] = ScriptedLLM(responder, model=f"scripted-{role}")
        return _CLIENTS[key]

    def client(self, model: ModelConfig, role: Literal["primary", "optimizer"]) -> LLMClient:
        inner = self.inner(role)
        location = self.response_cache_url or self.response_cache_path
        if location and self.cache_enabled:
            return CachedLLM(inner, location)
        return inner


def scripted_llm_resource(settings: Settings) -> ScriptedLLMResource:
    """The scripted stand-in for the "llm" resource `build_resources(settings)` makes: the same
    model cache folder, response cache file or URL, and cache switch."""
    return ScriptedLLMResource(
        model_cache_dir=str(settings.cache_dir / "models"),
        response_cache_path=str(settings.cache_dir / "llm_responses.sqlite"),
        response_cache_url=settings.LLM_CACHE_URL,
        cache_enabled=settings.LLM_CACHE_ENABLED,
    )


def scripted_study(folder: Path, **overrides: object) -> StudyConfig:
    return load_study(write_study(folder, **overrides))


def gemini_responder(body: dict[str, Any]) -> str:
    """For the fake Vertex server (support/vertex_server.py): the bare label when the system
    prompt names the label set, prose otherwise; proposals as JSON when JSON is asked (the
    optimizer)."""
    from promptopt_dagster_tests.support.vertex_requests import system_text, user_text, wants_json

    if wants_json(body):
        return json.dumps({"candidates": [{"system_prompt": "Classify the sentiment.", "rationale": "task"}]})
    label = "positive" if any(w in user_text(body) for w in GOOD) else "negative"
    return label if "one of:" in system_text(body) else f"Well, I would say it is {label}."
