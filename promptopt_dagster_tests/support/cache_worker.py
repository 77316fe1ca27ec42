"""Workers in their own processes on a shared response cache (LLM_CACHE_URL from the environment),
each with its own scripted inner LLM, so a test can count the calls that reached "the model".

    python -m promptopt_dagster_tests.support.cache_worker requests N
        N scripted requests through CachedLLM; prints {"calls", "cached", "texts"} as JSON.
    python -m promptopt_dagster_tests.support.cache_worker iteration HOME DAGSTER_HOME INSTANCE_URL
        the scripted pipeline of support/pipeline.py on PROMPTOPT_HOME=HOME and a Postgres Dagster
        instance at INSTANCE_URL, iteration 0 materialized again; prints the inner clients' calls
        and the decision's llm_calls as JSON. `start` instead of `iteration`: the study is
        registered and started by its sensor first (its first run).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from promptopt_dagster.llm.base import ChatRequest
from promptopt_dagster.llm.cache import CachedLLM
from promptopt_dagster.llm.fake import ScriptedLLM

URL_ENV = "LLM_CACHE_URL"


def question(i: int) -> ChatRequest:
    return ChatRequest.of([{"role": "user", "content": f"shared question {i}"}])


def answer(request: ChatRequest) -> str:
    return f"answer to {request.messages[-1].content} from pid {os.getpid()}"


def requests(count: int) -> dict[str, object]:
    inner = ScriptedLLM(answer)
    replies = CachedLLM(inner, os.environ[URL_ENV]).generate([question(i) for i in range(count)])
    texts = [r.text for r in replies]
    return {"calls": inner.calls, "cached": sum(r.cached for r in replies), "texts": texts}


def iteration(home: Path, dagster_home: Path, instance_url: str, start: bool = False) -> dict[str, object]:
    from promptopt_dagster.sensors import new_study_sensor
    from promptopt_dagster_tests.support.pipeline import make_pipeline, materialize_iteration, tick
    from promptopt_dagster_tests.support.postgres import postgres_instance

    with postgres_instance(instance_url, dagster_home) as instance:
        p = make_pipeline(home, instance, cache_url=os.environ[URL_ENV])
        if start:  # the study's first run: registered, started by its sensor
            p.store.register_study(p.study)
            tick(p, new_study_sensor)
        result = materialize_iteration(p, 0)
        [decision] = result.asset_materializations_for_node("iteration_decision")
        return {
            "success": result.success,
            "primary": p.llm.inner("primary").calls,
            "optimizer": p.llm.inner("optimizer").calls,
            "llm_calls": int(decision.metadata["llm_calls"].value),  # type: ignore[arg-type]
        }


def main(argv: list[str]) -> int:
    if argv[0] == "requests":
        out = requests(int(argv[1]))
    elif argv[0] in ("iteration", "start"):
        out = iteration(Path(argv[1]), Path(argv[2]), argv[3], start=argv[0] == "start")
    else:
        raise SystemExit(f"unknown command {argv[0]!r}: use 'requests', 'start' or 'iteration'")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
