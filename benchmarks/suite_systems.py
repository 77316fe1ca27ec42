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
import logging
import math
import os
import socket
import tempfile
import time
import warnings
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
    }
    if last.total_calls > budget:
        result.notes.append(f"spent {last.total_calls} calls, over the {budget}-call budget")
    champion = last.champion
    result.prompt = prompt_dict(champion)
    result.test_score, result.test_calls, result.test_seconds = score_prompt(llm, task, champion)
    return result


# --- GEPA ---------------------------------------------------------------------------------------


def run_gepa(llm: LocalLLM, task: Task, budget: int) -> SystemResult:
    import gepa
    from gepa.adapters.default_adapter.default_adapter import EvaluationResult

    study, seed = task.study, task.study.seed_prompt_state()
    meter = Budget(llm, budget)
    task_params = GenerationParams(temperature=study.primary_model.temperature,
                                   max_tokens=study.primary_model.max_tokens, seed=study.seed)
    reflection_params = GenerationParams(temperature=study.optimizer_model.temperature,
                                         max_tokens=study.optimizer_model.max_tokens, seed=study.seed)

    def task_lm(messages: list[dict[str, str]]) -> str:
        return meter.chat(messages, task_params, "task")

    def reflection_lm(prompt: str) -> str:
        return meter.chat([{"role": "user", "content": prompt}], reflection_params, "reflection")

    def rows(split: str) -> list[dict[str, Any]]:
        out = []
        for row in task.data.splits[split].to_dict(orient="records"):
            user = seed.render(row)[-1].content
            out.append({"input": user, "additional_context": {}, "answer": str(row[study.reference_column])})
        return out

    def score(inst: dict[str, Any], response: str) -> EvaluationResult:
        value = task.evaluator.evaluate([response], [inst["answer"]]).aggregates[study.target_metric]
        feedback = "correct" if value >= 1.0 else f"incorrect: expected exactly '{inst['answer']}'"
        return EvaluationResult(score=value, feedback=feedback)

    result = SystemResult("gepa")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="suite-gepa-") as run_dir, quiet() as log:
        try:
            out = gepa.optimize(
                seed_candidate={"system_prompt": seed.system_prompt or "You are a helpful assistant."},
                trainset=rows("train"),
                valset=rows("val"),
                task_lm=task_lm,
                evaluator=score,
                reflection_lm=reflection_lm,
                max_metric_calls=budget,
                # GEPA counts only metric calls; this also stops it once task + reflection calls
                # reach the budget (calls past it inside an iteration are refused).
                stop_callbacks=[lambda _state: meter.exhausted()],
                run_dir=run_dir,
                seed=study.seed,
            )
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            result.extra["log_tail"] = log.getvalue()[-2000:]
            out = None
    result.seconds = time.perf_counter() - start
    result.calls, result.requests, result.refused = meter.calls, meter.requests, meter.refused
    result.task_calls = meter.by_role.get("task", 0)
    result.optimizer_calls = meter.by_role.get("reflection", 0)
    if out is None:
        return result
    best = out.best_candidate["system_prompt"]
    prompt = PromptState(system_prompt=best, output_prompt=seed.output_prompt, metadata={"source": "gepa"})
    result.prompt = prompt_dict(prompt)
    result.extra = {"candidates": len(out.candidates), "total_metric_calls": out.total_metric_calls}
    result.test_score, result.test_calls, result.test_seconds = score_prompt(llm, task, prompt)
    return result


# --- DSPy MIPROv2 -------------------------------------------------------------------------------

# How MIPROv2 "light" sizes itself (dspy 3.4.1, teleprompt/mipro_optimizer_v2.py): 6 few-shot
# candidate sets, 3 instruction candidates, 10 trials, each a full evaluation on val (val < 50).
LIGHT_SETS, LIGHT_INSTRUCTIONS, LIGHT_TRIALS, LIGHT_DEMOS = 6, 3, 10, 4


def mipro_light_estimate(n_train: int, n_val: int) -> int:
    """Upper estimate of MIPROv2(auto='light') live calls: bootstrapping (4 runs over at most the
    train rows), proposing (data summary, program summary, instructions), and 11 full evaluations
    on val."""
    bootstrap = (LIGHT_SETS - 2) * n_train
    propose = math.ceil(n_train / 10) + 1 + 2 + LIGHT_INSTRUCTIONS
    return bootstrap + propose + (LIGHT_TRIALS + 1) * n_val


def mipro_plan(budget: int, n_train: int, n_val: int) -> dict[str, Any]:
    """auto='light' when its estimate fits the budget; else a scaled-down manual setting (fewer
    candidates and trials, 2 demos) sized to fit, for smoke runs with small budgets."""
    if mipro_light_estimate(n_train, n_val) <= budget:
        return {"auto": "light"}
    candidates, demos = 3, 2
    bootstrap = min(n_train, 4 * demos)  # one bootstrap run (sets -3..-1), stops at `demos` successes
    propose = math.ceil(n_train / 10) + 1 + 2 + candidates
    left = max(budget - bootstrap - propose, 3)
    trials = 2 if left >= 9 else 1
    val_rows = max(3, min(n_val, left // (trials + 1)))
    return {"auto": None, "num_candidates": candidates, "num_trials": trials, "max_bootstrapped_demos": demos,
            "max_labeled_demos": demos, "val_rows": val_rows}


def _dspy_lm_class(dspy: Any) -> type:
    class LocalDSPyLM(dspy.BaseLM):
        """DSPy's view of the embedded model: OpenAI-shaped replies from the shared LocalLLM,
        every call counted by a Budget."""

        def __init__(self, meter: Budget, role: str, temperature: float, max_tokens: int, seed: int) -> None:
            super().__init__(model="local/qwen2.5-coder-0.5b-instruct", model_type="chat",
                             temperature=temperature, max_tokens=max_tokens, cache=False, num_retries=0)
            self.meter, self.role, self.seed = meter, role, seed

        def forward(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                    **kwargs: Any) -> Any:
            from types import SimpleNamespace

            merged = {**self.kwargs, **kwargs}
            messages = messages or [{"role": "user", "content": prompt or ""}]
            # DSPy asks for fresh samples with a rollout_id (and a temperature above 0).
            rollout = merged.get("rollout_id")
            seed = self.seed if rollout is None else self.seed + 1 + int(
                hashlib.sha1(str(rollout).encode()).hexdigest()[:6], 16)
            params = GenerationParams(temperature=float(merged.get("temperature") or 0.0),
                                      max_tokens=int(merged.get("max_tokens") or 256), seed=seed)
            text = self.meter.chat(messages, params, self.role)
            message = SimpleNamespace(content=text, role="assistant", tool_calls=None)
            choice = SimpleNamespace(message=message, finish_reason="stop", index=0)
            return SimpleNamespace(choices=[choice], model=self.model, usage={}, _hidden_params={})

    return LocalDSPyLM


def run_miprov2(llm: LocalLLM, task: Task, budget: int, cache_root: Path) -> SystemResult:
    offline_environment(cache_root)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import dspy
    from dspy.teleprompt import MIPROv2

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    for name in ("dspy", "optuna", "LiteLLM", "litellm", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)

    study, seed = task.study, task.study.seed_prompt_state()
    meter = Budget(llm, budget)
    lm_class = _dspy_lm_class(dspy)
    # ChatAdapter frames the answer in `[[ ## answer ## ]]` ... `[[ ## completed ## ]]`: allow for
    # those marker tokens on top of the study's answer length.
    answer_tokens = study.primary_model.max_tokens + 24
    task_lm = lm_class(meter, "task", study.primary_model.temperature, answer_tokens, study.seed)
    prompt_lm = lm_class(meter, "proposal", study.optimizer_model.temperature,
                         study.optimizer_model.max_tokens, study.seed)
    instructions = seed.system_prompt.strip() or "Answer the request."
    signature = dspy.Signature({"request": dspy.InputField(), "answer": dspy.OutputField()}, instructions)

    class Program(dspy.Module):
        def __init__(self) -> None:
            super().__init__()
            self.predict = dspy.Predict(signature)

        def forward(self, request: str) -> Any:
            return self.predict(request=request)

    def examples(split: str) -> list[Any]:
        out = []
        for row in task.data.splits[split].to_dict(orient="records"):
            request = seed.render(row)[-1].content
            example = dspy.Example(request=request, answer=str(row[study.reference_column]))
            out.append(example.with_inputs("request"))
        return out

    def answer_of(pred: Any) -> str:
        value = getattr(pred, "answer", "") if pred is not None else ""
        return "" if value is None else str(value)

    def metric(example: Any, pred: Any, trace: Any = None) -> float:
        return task.evaluator.evaluate([answer_of(pred)], [example.answer]).aggregates[study.target_metric]

    plan = mipro_plan(budget, len(task.data.splits["train"]), len(task.data.splits["val"]))
    result = SystemResult("miprov2", extra={"plan": plan, "light_estimate": mipro_light_estimate(
        len(task.data.splits["train"]), len(task.data.splits["val"]))})
    trainset, valset = examples("train"), examples("val")
    if plan.get("val_rows"):
        valset = valset[: plan["val_rows"]]
    start = time.perf_counter()
    compiled = None
    with dspy.context(lm=task_lm, adapter=dspy.ChatAdapter()), quiet() as log:
        try:
            if plan["auto"]:
                optimizer = MIPROv2(metric=metric, prompt_model=prompt_lm, task_model=task_lm, auto="light",
                                    num_threads=1, max_errors=10**6, seed=study.seed, verbose=False)
                compiled = optimizer.compile(Program(), trainset=trainset, valset=valset)
            else:
                optimizer = MIPROv2(metric=metric, prompt_model=prompt_lm, task_model=task_lm, auto=None,
                                    num_candidates=plan["num_candidates"], num_threads=1, max_errors=10**6,
                                    seed=study.seed, verbose=False)
                compiled = optimizer.compile(
                    Program(), trainset=trainset, valset=valset, num_trials=plan["num_trials"],
                    max_bootstrapped_demos=plan["max_bootstrapped_demos"],
                    max_labeled_demos=plan["max_labeled_demos"], minibatch=False,
                )
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            result.extra["log_tail"] = log.getvalue()[-2000:]
    result.seconds = time.perf_counter() - start
    result.calls, result.requests, result.refused = meter.calls, meter.requests, meter.refused
    result.task_calls = meter.by_role.get("task", 0)
    result.optimizer_calls = meter.by_role.get("proposal", 0)
    if compiled is None:
        return result

    predictor = compiled.predictors()[0]
    result.prompt = {
        "instructions": predictor.signature.instructions,
        "demos": [{k: d.get(k) for k in ("request", "answer")} for d in predictor.demos],
        "adapter": "ChatAdapter",
    }
    # Test: the compiled program on every test row, our metric on its parsed answer. These calls
    # are not part of the budget (no refusals) and are counted apart.
    test_meter = Budget(llm, None)
    test_lm = lm_class(test_meter, "test", study.primary_model.temperature, answer_tokens, study.seed)
    preds, refs, failures = [], [], 0
    start = time.perf_counter()
    with dspy.context(lm=test_lm, adapter=dspy.ChatAdapter()), quiet():
        for example in examples("test"):
            try:
                preds.append(answer_of(compiled(request=example.request)))
            except Exception:  # the answer could not be parsed: an empty answer
                failures += 1
                preds.append("")
            refs.append(example.answer)
    result.test_seconds = time.perf_counter() - start
    result.test_calls = test_meter.calls
    result.test_score = float(task.evaluator.evaluate(preds, refs).aggregates[study.target_metric])
    result.extra["test_parse_failures"] = failures
    result.extra["test_predictions"] = preds[:5]
    return result


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
