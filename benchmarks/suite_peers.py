"""The third-party optimizers benchmarks/optimizer_suite.py runs beside the product: GEPA and
DSPy MIPROv2, each over the same embedded model, rows and call budget (see suite_systems.py for
the shared rules: the split, call counting, test scoring)."""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from suite_systems import Budget, SystemResult, Task, offline_environment, prompt_dict, quiet, score_prompt

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.llm.base import GenerationParams
from promptopt_dagster.llm.local import LocalLLM

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
    meter.record(result, "reflection", start)
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


class _DspyTask:
    """One task as a DSPy program: a `request -> answer` signature whose instructions are the
    seed's system prompt, examples whose request is the seed's rendered user turn, and the
    task's own metric on the parsed answer. MIPROv2 and the few-shot baseline share it."""

    def __init__(self, llm: LocalLLM, task: Task, cache_root: Path) -> None:
        offline_environment(cache_root)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        import dspy

        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
        for name in ("dspy", "optuna", "LiteLLM", "litellm", "httpx"):
            logging.getLogger(name).setLevel(logging.ERROR)
        self.dspy, self.llm, self.task = dspy, llm, task
        self.study, self.seed = task.study, task.study.seed_prompt_state()
        self.lm_class = _dspy_lm_class(dspy)
        # ChatAdapter frames the answer in `[[ ## answer ## ]]` ... `[[ ## completed ## ]]`:
        # allow for those marker tokens on top of the study's answer length.
        self.answer_tokens = self.study.primary_model.max_tokens + 24
        instructions = self.seed.system_prompt.strip() or "Answer the request."
        signature = dspy.Signature({"request": dspy.InputField(), "answer": dspy.OutputField()}, instructions)

        class Program(dspy.Module):
            def __init__(self) -> None:
                super().__init__()
                self.predict = dspy.Predict(signature)

            def forward(self, request: str) -> Any:
                return self.predict(request=request)

        self.program_class = Program

    def task_lm(self, meter: Budget, role: str = "task") -> Any:
        return self.lm_class(meter, role, self.study.primary_model.temperature, self.answer_tokens,
                             self.study.seed)

    def examples(self, split: str) -> list[Any]:
        out = []
        for row in self.task.data.splits[split].to_dict(orient="records"):
            request = self.seed.render(row)[-1].content
            example = self.dspy.Example(request=request, answer=str(row[self.study.reference_column]))
            out.append(example.with_inputs("request"))
        return out

    @staticmethod
    def answer_of(pred: Any) -> str:
        value = getattr(pred, "answer", "") if pred is not None else ""
        return "" if value is None else str(value)

    def metric(self, example: Any, pred: Any, trace: Any = None) -> float:
        scores = self.task.evaluator.evaluate([self.answer_of(pred)], [example.answer]).aggregates
        return scores[self.study.target_metric]

    def score_on_test(self, compiled: Any, result: SystemResult) -> SystemResult:
        """The compiled program on every test row, the task's metric on its parsed answers. These
        calls are not part of the budget (no refusals) and are counted apart."""
        predictor = compiled.predictors()[0]
        result.prompt = {
            "instructions": predictor.signature.instructions,
            "demos": [{k: d.get(k) for k in ("request", "answer")} for d in predictor.demos],
            "adapter": "ChatAdapter",
        }
        test_meter = Budget(self.llm, None)
        preds, refs, failures = [], [], 0
        start = time.perf_counter()
        with self.dspy.context(lm=self.task_lm(test_meter, "test"), adapter=self.dspy.ChatAdapter()), quiet():
            for example in self.examples("test"):
                try:
                    preds.append(self.answer_of(compiled(request=example.request)))
                except Exception:  # the answer could not be parsed: an empty answer
                    failures += 1
                    preds.append("")
                refs.append(example.answer)
        result.test_seconds = time.perf_counter() - start
        result.test_calls = test_meter.calls
        aggregates = self.task.evaluator.evaluate(preds, refs).aggregates
        result.test_score = float(aggregates[self.study.target_metric])
        result.extra["test_parse_failures"] = failures
        result.extra["test_predictions"] = preds[:5]
        return result


def run_miprov2(llm: LocalLLM, task: Task, budget: int, cache_root: Path) -> SystemResult:
    from dspy.teleprompt import MIPROv2

    program = _DspyTask(llm, task, cache_root)
    dspy, study = program.dspy, task.study
    meter = Budget(llm, budget)
    task_lm = program.task_lm(meter)
    prompt_lm = program.lm_class(meter, "proposal", study.optimizer_model.temperature,
                                 study.optimizer_model.max_tokens, study.seed)
    plan = mipro_plan(budget, len(task.data.splits["train"]), len(task.data.splits["val"]))
    result = SystemResult("miprov2", extra={"plan": plan, "light_estimate": mipro_light_estimate(
        len(task.data.splits["train"]), len(task.data.splits["val"]))})
    trainset, valset = program.examples("train"), program.examples("val")
    if plan.get("val_rows"):
        valset = valset[: plan["val_rows"]]
    start = time.perf_counter()
    compiled = None
    with dspy.context(lm=task_lm, adapter=dspy.ChatAdapter()), quiet() as log:
        try:
            if plan["auto"]:
                optimizer = MIPROv2(metric=program.metric, prompt_model=prompt_lm, task_model=task_lm,
                                    auto="light", num_threads=1, max_errors=10**6, seed=study.seed,
                                    verbose=False)
                compiled = optimizer.compile(program.program_class(), trainset=trainset, valset=valset)
            else:
                optimizer = MIPROv2(metric=program.metric, prompt_model=prompt_lm, task_model=task_lm,
                                    auto=None, num_candidates=plan["num_candidates"], num_threads=1,
                                    max_errors=10**6, seed=study.seed, verbose=False)
                compiled = optimizer.compile(
                    program.program_class(), trainset=trainset, valset=valset, num_trials=plan["num_trials"],
                    max_bootstrapped_demos=plan["max_bootstrapped_demos"],
                    max_labeled_demos=plan["max_labeled_demos"], minibatch=False,
                )
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            result.extra["log_tail"] = log.getvalue()[-2000:]
    meter.record(result, "proposal", start)
    if compiled is None:
        return result
    return program.score_on_test(compiled, result)


FEWSHOT_K = 4


def run_fewshot(llm: LocalLLM, task: Task, cache_root: Path) -> SystemResult:
    """No search: the seed's instructions with FEWSHOT_K training rows as demonstrations (DSPy's
    `LabeledFewShot`, which samples them with a fixed seed). It spends no calls before test: the
    floor any optimizer's budget has to beat."""
    from dspy.teleprompt import LabeledFewShot

    program = _DspyTask(llm, task, cache_root)
    result = SystemResult("fewshot4", extra={"k": FEWSHOT_K})
    trainset = program.examples("train")
    compiled = LabeledFewShot(k=FEWSHOT_K).compile(program.program_class(), trainset=trainset)
    return program.score_on_test(compiled, result)
