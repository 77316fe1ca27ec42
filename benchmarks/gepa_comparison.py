"""Our optimizer against GEPA (reflective evolution with a Pareto front), same model, same data,
same LLM-call budget, scored on the held-out test split that neither optimizer sees.

    pip install 'gepa==0.1.4'   # the benchmark's only extra dependency
    python benchmarks/gepa_comparison.py promptopt_dagster/examples/topic_codes.yaml

Ours runs first, through the real Dagster definitions and sensors (headless driver). GEPA then gets
a task-call budget (`max_metric_calls`) equal to ALL the calls we spent (task + optimizer), and
its reflection calls come on top: the comparison leans in GEPA's favour. Both use the embedded
model as task and reflection/optimizer model, GEPA's train set is our train split and its
validation set our validation split.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg

from promptopt_dagster.core.prompt_state import PromptState
from promptopt_dagster.core.scoring import evaluate_prompt, evaluator_for
from promptopt_dagster.core.study import load_study
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import drive
from promptopt_dagster.llm.base import ChatRequest, GenerationParams, Message
from promptopt_dagster.llm.local import LocalLLM
from promptopt_dagster.settings import Settings


class CountingModel:
    """GEPA's task and reflection LMs, on our local client, counting calls."""

    def __init__(self, llm: LocalLLM, params: GenerationParams) -> None:
        self.llm, self.params, self.calls = llm, params, 0

    def chat(self, messages: list[dict[str, str]]) -> str:
        self.calls += 1
        msgs = tuple(Message(role=m["role"], content=m["content"]) for m in messages if m["content"].strip())
        [reply] = self.llm.generate([ChatRequest(messages=msgs, params=self.params)])
        return reply.text

    def complete(self, prompt: str) -> str:
        return self.chat([{"role": "user", "content": prompt}])


def run_ours(study_path: str, home: Path) -> tuple[PromptState, int, float]:
    study = load_study(study_path)
    defs = build_definitions(Settings(PROMPTOPT_HOME=home))
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    store.register_study(study)
    start = time.perf_counter()
    with dg.instance_for_test() as instance:
        drive(defs, instance, study.name)
    records = store.records(study.name)
    return records[-1].champion, records[-1].total_calls, time.perf_counter() - start


def run_gepa(study_path: str, budget: int, model_dir: Path) -> tuple[PromptState, int, int, float]:
    import gepa
    from gepa.adapters.default_adapter.default_adapter import EvaluationResult

    study = load_study(study_path)
    data = load_study_data(study)
    evaluator = evaluator_for(study)
    seed = study.seed_prompt_state()
    llm = LocalLLM(cache_dir=model_dir)
    task = CountingModel(llm, GenerationParams(temperature=study.primary_model.temperature,
                                               max_tokens=study.primary_model.max_tokens, seed=study.seed))
    reflection = CountingModel(llm, GenerationParams(temperature=study.optimizer_model.temperature,
                                                     max_tokens=study.optimizer_model.max_tokens))

    def rows(split: str) -> list[dict[str, Any]]:
        out = []
        for row in data.splits[split].to_dict(orient="records"):
            user = seed.render(row)[-1].content
            out.append({"input": user, "additional_context": {}, "answer": str(row[study.reference_column])})
        return out

    def score(inst: dict[str, Any], response: str) -> EvaluationResult:
        value = evaluator.evaluate([response], [inst["answer"]]).aggregates[study.target_metric]
        feedback = "correct" if value >= 1.0 else f"incorrect: expected exactly '{inst['answer']}'"
        return EvaluationResult(score=value, feedback=feedback)

    start = time.perf_counter()
    result = gepa.optimize(
        seed_candidate={"system_prompt": seed.system_prompt or "You are a helpful assistant."},
        trainset=rows("train"),
        valset=rows("val"),
        task_lm=task.chat,
        evaluator=score,
        reflection_lm=reflection.complete,
        max_metric_calls=budget,
        seed=study.seed,
    )
    best = result.best_candidate["system_prompt"]
    prompt = PromptState(system_prompt=best, output_prompt=seed.output_prompt)
    return prompt, task.calls, reflection.calls, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("study", help="a study YAML, e.g. promptopt_dagster/examples/topic_codes.yaml")
    args = parser.parse_args()
    study = load_study(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        ours, our_calls, our_seconds = run_ours(args.study, home)
        gepa_prompt, gepa_task_calls, gepa_reflection_calls, gepa_seconds = run_gepa(
            args.study, our_calls, home / "cache" / "models"
        )
        data = load_study_data(study)
        evaluator = evaluator_for(study)
        llm = LocalLLM(cache_dir=home / "cache" / "models")
        metric = study.target_metric
        scores = {
            name: evaluate_prompt(llm, evaluator, data, prompt, "test")[0][metric]
            for name, prompt in (("seed", study.seed_prompt_state()), ("ours", ours), ("gepa", gepa_prompt))
        }
    n_test = len(data.splits["test"])
    print(f"study {study.name}: test {metric} on {n_test} held-out rows")
    print(f"{'':6s} {'test':>6s} {'LLM calls':>10s} {'wall s':>7s}")
    print(f"{'seed':6s} {scores['seed']:6.3f} {'-':>10s} {'-':>7s}")
    print(f"{'ours':6s} {scores['ours']:6.3f} {our_calls:10d} {our_seconds:7.0f}")
    gepa_calls = gepa_task_calls + gepa_reflection_calls
    print(f"{'gepa':6s} {scores['gepa']:6.3f} {gepa_calls:10d} {gepa_seconds:7.0f}"
          f"   ({gepa_task_calls} task + {gepa_reflection_calls} reflection)")
    print(f"ours final system prompt: {ours.system_prompt!r}")
    print(f"gepa final system prompt: {gepa_prompt.system_prompt!r}")


if __name__ == "__main__":
    main()
