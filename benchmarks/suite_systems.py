"""The systems that benchmarks/optimizer_suite.py measures, one function each, on one task.

Every system gets the same rows (the product's own split), the same embedded model and the same
LLM-call budget, and its final prompt (or program) is scored on the held-out test split with the
study's metric. Nothing here looks at the test split before that final scoring.

Call accounting is the same for every system: a "call" is one live model invocation. Repeated
identical requests (same messages, same generation parameters) are answered from memory and not
counted, exactly as the product's own response cache does; `requests` counts them all. Once a
system has spent its budget, further live calls are refused (an empty reply, counted in
`refused`), so no system can spend more than the budget, except the product, which enforces its
own `budget_calls` and is reported as it ran.

The approach for `ours` and `gepa` is the one of benchmarks/gepa_comparison.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from promptopt_dagster.core.metrics import EvaluatorService
from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.scoring import evaluate_prompt, evaluator_for
from promptopt_dagster.core.study import StudyConfig, load_study
from promptopt_dagster.core.study_data import StudyData, load_study_data
from promptopt_dagster.llm.base import ChatRequest, GenerationParams, Message
from promptopt_dagster.llm.local import LocalLLM

SUITE_DIR = Path(__file__).resolve().parent / "suite"


# --- tasks --------------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    study: StudyConfig
    data: StudyData
    evaluator: EvaluatorService
    precise: PromptState

    @property
    def metric(self) -> str:
        return self.study.target_metric

    def split_sizes(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.data.splits.items()}

    def test_ids_sha(self) -> str:
        """Identity of the test rows, so results computed elsewhere can be checked before reuse."""
        ids = sorted(self.data.splits["test"]["row_id"].astype(str))
        return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def task_names(suite_dir: Path = SUITE_DIR) -> list[str]:
    precise = yaml.safe_load((suite_dir / "precise_prompts.yaml").read_text(encoding="utf-8"))
    return list(precise)


def load_task(name: str, suite_dir: Path = SUITE_DIR) -> Task:
    path = suite_dir / f"{name}.yaml"
    study = load_study(path)
    precise = yaml.safe_load((suite_dir / "precise_prompts.yaml").read_text(encoding="utf-8"))[name]
    prompt = PromptState(
        id=f"{name}-precise",
        system_prompt=precise["system_prompt"],
        output_prompt=precise["output_prompt"],
        version=0,
        metadata={"source": "hand-written"},
    )
    data = load_study_data(study)
    return Task(name, precise.get("kind", ""), path, study, data, evaluator_for(study), prompt)


# --- results ------------------------------------------------------------------------------------


@dataclass
class SystemResult:
    system: str
    test_score: float | None = None
    calls: int = 0  # live model calls spent optimizing (task + reflection/proposal)
    requests: int = 0  # all requests, including those answered from memory
    refused: int = 0  # live calls refused because the budget was spent
    task_calls: int = 0
    optimizer_calls: int = 0
    test_calls: int = 0  # calls spent scoring the final prompt on test (not part of the budget)
    seconds: float = 0.0  # optimization wall time
    test_seconds: float = 0.0
    prompt: dict[str, Any] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def prompt_dict(prompt: PromptState) -> dict[str, Any]:
    return {"system_prompt": prompt.system_prompt, "output_prompt": prompt.output_prompt,
            "metadata": prompt.metadata}


def score_prompt(
    llm: LocalLLM, task: Task, prompt: PromptState, split: str = "test"
) -> tuple[float, int, float]:
    """The product's own evaluate path: the study's metric on a whole split. Returns score, calls
    and seconds."""
    start = time.perf_counter()
    aggregates, usage = evaluate_prompt(llm, task.evaluator, task.data, prompt, split)
    return float(aggregates[task.metric]), usage.calls, time.perf_counter() - start


# --- call counting ------------------------------------------------------------------------------


class Budget:
    """Counts live calls for one system and refuses them once `limit` is spent."""

    def __init__(self, llm: LocalLLM, limit: int | None) -> None:
        self.llm, self.limit = llm, limit
        self.calls = self.requests = self.refused = 0
        self.by_role: dict[str, int] = {}
        self._memo: dict[str, str] = {}

    def exhausted(self) -> bool:
        return self.limit is not None and self.calls >= self.limit

    def chat(self, messages: list[dict[str, Any]], params: GenerationParams, role: str) -> str:
        self.requests += 1
        msgs = tuple(Message(role=m["role"], content=_text(m["content"])) for m in messages
                     if _text(m["content"]).strip())
        request = ChatRequest(messages=msgs, params=params)
        key = request.cache_key("local", self.llm.model)
        if key in self._memo:
            return self._memo[key]
        if self.exhausted():
            self.refused += 1
            return ""
        self.calls += 1
        self.by_role[role] = self.by_role.get(role, 0) + 1
        [reply] = self.llm.generate([request])
        text = reply.text if reply.error is None else ""
        self._memo[key] = text
        return text

    def record(self, result: SystemResult, optimizer_role: str, started: float) -> None:
        """Copy what this meter counted into `result`: calls by role, refusals, wall time."""
        result.seconds = time.perf_counter() - started
        result.calls, result.requests, result.refused = self.calls, self.requests, self.refused
        result.task_calls = self.by_role.get("task", 0)
        result.optimizer_calls = self.by_role.get(optimizer_role, 0)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


# --- no network ---------------------------------------------------------------------------------

NETWORK_ATTEMPTS: list[str] = []


def _local(host: Any) -> bool:
    return isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1", ""))


def block_network() -> None:
    """Refuse every socket connection and name look-up that leaves this machine, and record it.
    The embedded model's server listens on 127.0.0.1 and stays reachable."""
    if getattr(socket.socket.connect, "_suite_guard", False):
        return
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if self.family == getattr(socket, "AF_UNIX", None) or _local(address[0] if isinstance(address, tuple)
                                                                     else address):
            return connect(self, address)
        NETWORK_ATTEMPTS.append(f"connect {address}")
        raise OSError(f"the benchmark blocks network access ({address})")

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else host
        if name is None or _local(name):
            return getaddrinfo(host, *args, **kwargs)
        NETWORK_ATTEMPTS.append(f"resolve {name}")
        raise socket.gaierror(f"the benchmark blocks network access ({name})")

    guarded_connect._suite_guard = True  # type: ignore[attr-defined]
    socket.socket.connect = guarded_connect  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]


def offline_environment(cache_root: Path) -> None:
    """Environment for the third-party optimizers: no hub, no remote metadata, caches in `cache_root`."""
    cache_root.mkdir(parents=True, exist_ok=True)
    os.environ.update({
        "DSPY_CACHEDIR": str(cache_root / "dspy"),
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DO_NOT_TRACK": "1",
        "WANDB_MODE": "disabled",
    })


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Keep the optimizers' progress bars and log lines out of the table; returned for errors."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


# --- seed and precise ---------------------------------------------------------------------------


def run_fixed(llm: LocalLLM, task: Task, system: str) -> SystemResult:
    prompt = task.study.seed_prompt_state() if system == "seed" else task.precise
    score, calls, seconds = score_prompt(llm, task, prompt)
    return SystemResult(system, test_score=score, test_calls=calls, test_seconds=seconds,
                        prompt=prompt_dict(prompt))


# --- ours: the product, through its Dagster definitions and headless driver ----------------------


def run_ours(llm: LocalLLM, task: Task, budget: int) -> SystemResult:
    import dagster as dg

    from promptopt_dagster.definitions import build_definitions
    from promptopt_dagster.driver import drive
    from promptopt_dagster.settings import Settings

    study = task.study.model_copy(update={"budget_calls": budget})
    result = SystemResult("ours")
    with tempfile.TemporaryDirectory(prefix="suite-ours-") as tmp:
        home = Path(tmp)
        settings = Settings(PROMPTOPT_HOME=home, LOCAL_MODEL_PATH=str(llm.model_file), LLM_BACKEND="local",
                            LLM_CACHE_ENABLED=True, MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
        defs = build_definitions(settings)
        store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
        store.register_study(study)
        start = time.perf_counter()
        with dg.instance_for_test() as instance:
            drive(defs, instance, study.name)
        result.seconds = time.perf_counter() - start
        records = store.records(study.name)
    if not records:
        raise RuntimeError("the product finished without any iteration record")
    last = records[-1]
    result.calls = result.requests = int(last.total_calls)
    result.extra = {
        "iterations": len(records),
        "stop_reason": last.stop_reason,
        "best_val_score": last.best_val_score,
        "accepted": [r.iteration for r in records if r.accepted],
        "strategies": [[c.strategy for c in r.candidates] for r in records],
        "iteration_details": [iteration_detail(r) for r in records],
    }
    if last.total_calls > budget:
        result.notes.append(f"spent {last.total_calls} calls, over the {budget}-call budget")
    champion = last.champion
    result.prompt = prompt_dict(champion)
    result.test_score, result.test_calls, result.test_seconds = score_prompt(llm, task, champion)
    result.extra["trajectory"] = champion_trajectory(llm, task, records)
    return result


def iteration_detail(record: Any) -> dict[str, Any]:
    """Where an iteration's calls went: the incumbent's scores, and each candidate's strategy,
    minibatch rows screened, minibatch and validation scores (train and val only, never test)."""
    return {
        "iteration": record.iteration,
        "calls": int(record.calls),
        "incumbent": [round(record.incumbent_train_score, 3), round(record.incumbent_val_score, 3)],
        "candidates": [
            [c.strategy, c.screened_rows, round(c.train_score, 3),
             None if c.val_score is None else round(c.val_score, 3)]
            for c in record.candidates
        ],
        "accepted": record.accepted,
    }


def champion_trajectory(llm: LocalLLM, task: Task, records: list[Any]) -> list[dict[str, Any]]:
    """The test score of each champion the study held, with the calls spent when it was chosen
    (the seed's at 0): what the study would have returned had its budget ended there. Scored
    after the study, so no decision saw them; the calls are test calls, outside the budget."""
    seed = task.study.seed_prompt_state()
    points = [{"iteration": None, "calls": 0, "test_score": score_prompt(llm, task, seed)[0]}]
    held = seed.content_hash()
    for record in records:
        if record.champion.content_hash() != held:
            held = record.champion.content_hash()
            score = score_prompt(llm, task, record.champion)[0]
            calls = int(record.total_calls)
            points.append({"iteration": record.iteration, "calls": calls, "test_score": score})
    return points


def score_at(trajectory: list[dict[str, Any]], calls: int) -> float | None:
    """The test score of the champion held once `calls` calls were spent."""
    reached = [point for point in trajectory if point["calls"] <= calls]
    return reached[-1]["test_score"] if reached else None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("promptopt_dagster", "dagster", "xllamacpp", "gepa", "dspy", "optuna", "evaluate", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str)
