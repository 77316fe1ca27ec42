"""Orchestration overhead of one iteration: Dagster wall time minus time inside LLM calls,
next to the same work run as a plain Python loop over the same core functions.

The Dagster side is what `promptopt run` does for an iteration: a tick of new_study_sensor (which
adds the iteration's partition and requests its run), then the iteration job executed in process
with the console log quiet (driver.execute), on a fresh SQLite instance. Both sides time the
iteration only: instance creation, study registration and imports are outside the clock.

The LLM is the scripted fake with a fixed latency per call (default 0 ms), so what remains is
the cost of orchestration: Dagster's event log, the IO manager's Parquet/JSON files and the
per-asset study loading, against a loop that keeps everything in memory. On a loaded machine
both sides slow down; compare the two in one run.

    python benchmarks/orchestration_overhead.py [--repeats 3] [--latency-ms 0] [--profile OUT]
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg

from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.iteration import decide, screen_and_confirm
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.proposal import propose_candidates
from promptopt_dagster.core.scoring import candidate_scores, evaluator_for, score_predictions
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.driver import execute
from promptopt_dagster.sensors import new_study_sensor
from promptopt_dagster_tests.support import scripted
from promptopt_dagster_tests.support.pipeline import make_pipeline

DAGSTER = "dagster iteration job"


def with_latency(responder, seconds: float):  # type: ignore[no-untyped-def]
    def answer(request):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        return responder(request)

    return answer


def plain_loop(folder: Path, latency: float) -> tuple[float, float]:
    """One iteration as straight Python; returns (wall seconds, seconds inside LLM calls)."""
    from promptopt_dagster.llm.fake import ScriptedLLM

    study = scripted.scripted_study(folder)
    store = PromptStore(str(folder / "store"))
    store.register_study(study)
    primary = ScriptedLLM(with_latency(scripted.primary_responder, latency))
    optimizer = ScriptedLLM(with_latency(scripted.optimizer_responder, latency))
    start = time.perf_counter()
    data = load_study_data(study)
    evaluator = evaluator_for(study)
    incumbent = store.champion_before(study, 0)
    base = run_prompt(primary, incumbent, data.iteration_rows(0), study.primary_model, study)
    scored, agg = score_predictions(evaluator, base, study.target_metric, ["split"])
    proposal = propose_candidates(optimizer, data, incumbent, scored, [], 0)
    cand = screen_and_confirm(
        primary, evaluator, data, proposal.candidates, agg["train"][study.target_metric], 0
    )
    _, cagg = score_predictions(evaluator, cand, study.target_metric, ["candidate_id", "split"])
    scores = candidate_scores(proposal.candidates, cagg, study.target_metric)
    usage = usage_of(base) + usage_of(cand) + proposal.usage
    store.save_record(decide(study, 0, incumbent, agg, proposal.candidates, scores, [], usage))
    return time.perf_counter() - start, usage.seconds


def dagster_iteration(
    folder: Path, latency: float, profiler: cProfile.Profile | None = None
) -> tuple[float, float]:
    """One iteration as `promptopt run` runs it; returns (wall seconds, seconds inside LLM calls)."""
    with dg.instance_for_test() as instance:
        p = make_pipeline(folder, instance, cache_enabled=False)
        p.store.register_study(p.study)
        for role, responder in (
            ("primary", scripted.primary_responder),
            ("optimizer", scripted.optimizer_responder),
        ):
            p.llm.inner(role).responder = with_latency(responder, latency)
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        context = dg.build_sensor_context(
            instance=instance, resources={"prompt_store": p.defs.resources["prompt_store"]}
        )
        tick: dg.SensorResult = new_study_sensor(context)  # type: ignore[assignment]
        for req in tick.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
        [run] = tick.run_requests or []
        execute(p.defs, instance, run.job_name or "iteration_job", str(run.partition_key), dict(run.tags))
        wall = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        record = p.store.load_record(p.study.name, 0)
        assert record is not None and record.accepted
        return wall, record.llm_seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--profile", help="write a cProfile of the Dagster iterations (not the first) here")
    args = parser.parse_args()
    latency = args.latency_ms / 1000
    rows: dict[str, list[tuple[float, float]]] = {"plain python loop": [], DAGSTER: []}
    for run in (plain_loop, dagster_iteration):  # warm-up: lazy imports and first-use caches
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), latency)
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rows["plain python loop"].append(plain_loop(Path(tmp), latency))
        with tempfile.TemporaryDirectory() as tmp:
            rows[DAGSTER].append(dagster_iteration(Path(tmp), latency, profiler))
    if profiler is not None:
        profiler.dump_stats(args.profile)
    print(
        f"one iteration of the scripted study, {args.repeats} repeats, "
        f"LLM latency {args.latency_ms:g} ms/call"
    )
    print(f"{'':22s} {'wall s (median)':>16s} {'in LLM s':>10s} {'overhead s':>11s}")
    overheads = {}
    for name, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        llm = statistics.median(s[1] for s in samples)
        overheads[name] = wall - llm
        print(f"{name:22s} {wall:16.3f} {llm:10.3f} {wall - llm:11.3f}")
    extra = overheads[DAGSTER] - overheads["plain python loop"]
    print(f"Dagster adds {extra:.3f} s per iteration over the plain loop")


if __name__ == "__main__":
    main()
