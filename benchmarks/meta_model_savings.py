"""LLM calls per accepted improvement, with and without the meta-model, on the shipped studies.

    .venv/bin/python benchmarks/meta_model_savings.py [--history arithmetic topic_codes tiny_sentiment]
        [--eval sentiment] [--max-iterations 3] [--home /tmp/bench]

1. History: the `--history` studies run through the whole Dagster graph (sensors, driver, the
   meta_model asset retrained after every iteration) on the embedded model.
2. The `--eval` study then runs twice from scratch under two names, with the response cache off
   so every call is paid: once with the meta-model never trusted (META_MODEL_MIN_SPEARMAN=2, the
   default optimizer path), once with it forced on (threshold -1: it is used whatever its CV
   quality; the figure printed says whether the 0.3 default bar would have let it in).

Prints, for both runs: LLM calls, accepted improvements, calls per accepted improvement, best
validation score. The embedded model makes ~2-3 calls/s: the defaults take about 10-15 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dagster as dg

from promptopt_dagster.assets.meta_model import meta_model
from promptopt_dagster.core.meta_model import load_from_store
from promptopt_dagster.core.study import load_study
from promptopt_dagster.definitions import build_definitions
from promptopt_dagster.driver import drive
from promptopt_dagster.examples import EXAMPLES_DIR
from promptopt_dagster.partitions import study_iteration_key
from promptopt_dagster.settings import Settings


def run_study(settings: Settings, instance: dg.DagsterInstance, example: str, name: str, max_it: int) -> dict:
    study = load_study(EXAMPLES_DIR / f"{example}.yaml")
    study = study.model_copy(update={"name": name, "max_iterations": min(study.max_iterations, max_it)})
    defs = build_definitions(settings)
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    store.register_study(study)
    start = time.perf_counter()
    drive(defs, instance, name)
    records = store.records(name)
    accepted = sum(r.accepted for r in records)
    calls = sum(r.calls for r in records)
    return {
        "study": name,
        "iterations": len(records),
        "llm_calls": calls,
        "accepted": accepted,
        "calls_per_accepted": calls / accepted if accepted else None,
        "seed_val": records[0].incumbent_val_score,
        "best_val": records[-1].best_val_score,
        "screened": sum(len(r.candidates) for r in records),
        "seconds": round(time.perf_counter() - start, 1),
    }


def refit(settings: Settings, instance: dg.DagsterInstance, study: str) -> None:
    """Retrain the meta_model asset under `settings`: whether the optimizer trusts the model is
    decided when it is trained, so the policy change must be followed by a refit."""
    defs = build_definitions(settings)
    dg.materialize(
        [meta_model],
        partition_key=str(study_iteration_key(study, 0)),
        instance=instance,
        resources={
            k: v for k, v in defs.resources.items() if k in ("prompt_store", "mlflow", "meta_model_policy")
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--history", nargs="+", default=["arithmetic", "topic_codes", "tiny_sentiment"])
    parser.add_argument("--eval", default="sentiment")
    parser.add_argument("--max-iterations", type=int, default=3, help="cap for the history studies")
    parser.add_argument("--eval-iterations", type=int, default=3, help="cap for the two --eval runs")
    parser.add_argument("--home", type=Path, default=None)
    args = parser.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="meta-model-bench-"))
    print(f"PROMPTOPT_HOME={home}")
    base = {"PROMPTOPT_HOME": home, "MLFLOW_TRACKING_URI": None}
    results = []
    with dg.instance_for_test() as instance:
        history_settings = Settings(**base, META_MODEL_MIN_SPEARMAN=2.0)
        for example in args.history:
            results.append(
                run_study(history_settings, instance, example, f"h_{example}", args.max_iterations)
            )
            print("history:", json.dumps(results[-1]), flush=True)
        loaded = load_from_store(history_settings.storage_root)
        cv = loaded[1]["cv_result"] if loaded else {}
        print("meta-model after the history:", json.dumps(cv), flush=True)
        plain = run_study(
            Settings(**base, META_MODEL_MIN_SPEARMAN=2.0, LLM_CACHE_ENABLED=False),
            instance,
            args.eval,
            f"{args.eval}_plain",
            args.eval_iterations,
        )
        print("without meta-model:", json.dumps(plain), flush=True)
        ranked_settings = Settings(**base, META_MODEL_MIN_SPEARMAN=-1.0, LLM_CACHE_ENABLED=False)
        refit(ranked_settings, instance, f"h_{args.history[-1]}")
        ranked = run_study(
            ranked_settings,
            instance,
            args.eval,
            f"{args.eval}_ranked",
            args.eval_iterations,
        )
        print("with meta-model:   ", json.dumps(ranked), flush=True)
    bar = Settings().META_MODEL_MIN_SPEARMAN
    spearman = cv.get("spearman")
    print(
        f"\n{args.eval}: LLM calls per accepted improvement: without {plain['calls_per_accepted']}, "
        f"with {ranked['calls_per_accepted']} (calls {plain['llm_calls']} vs {ranked['llm_calls']}; "
        f"best val {plain['best_val']:.3f} vs {ranked['best_val']:.3f}). History CV spearman "
        f"{spearman} ({'clears' if spearman is not None and spearman >= bar else 'below'} the {bar} bar)."
    )


if __name__ == "__main__":
    main()
