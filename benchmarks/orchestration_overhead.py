"""Orchestration overhead of one iteration: Dagster wall time minus time inside LLM calls,
next to the same work run as a plain Python loop over the same core functions.

The Dagster side is what `promptopt run` does for an iteration: a tick of new_study_sensor (which
adds the iteration's partition and requests its run), then the iteration job executed in process
with the console log quiet (driver.execute), on a fresh DAGSTER_HOME with the dagster.yaml the
CLI writes (SQLite, engines reused per file: promptopt_dagster/sqlite_storage.py); a second row
runs it on Dagster's default SQLite storage. Both sides time the
iteration only: instance creation, study registration and imports are outside the clock.

The LLM is the scripted fake with a fixed latency per call (default 0 ms), so what remains is
the cost of orchestration: Dagster's event log, the IO manager's Parquet/JSON files and the
per-asset study loading, against a loop that keeps everything in memory. On a loaded machine
both sides slow down; compare the two in one run.

A third row is Dagster's own floor: a bare job of as many pass-through assets as the iteration
job has, chained, on the same dynamic partitions and the same kind of instance, with Dagster's
filesystem IO manager. What the iteration costs above that row is the product's own overhead;
the floor is what any Dagster job of that shape costs on this machine.

With --postgres the iteration also runs on a Dagster instance in a real PostgreSQL server
(test support's PostgresServer: password authentication over TCP on 127.0.0.1), once with
dagster-postgres' own storage, which connects once per query, and once with the pooled storage
the CLI configures (promptopt_dagster/pg_storage.py).

    python benchmarks/orchestration_overhead.py [--repeats 3] [--latency-ms 0] [--profile OUT] [--postgres]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import dagster as dg
import yaml

from promptopt_dagster.core.inference import run_prompt, usage_of
from promptopt_dagster.core.iteration import decide, screen_and_confirm
from promptopt_dagster.core.prompt_store import PromptStore
from promptopt_dagster.core.proposal import propose_candidates
from promptopt_dagster.core.scoring import candidate_scores, evaluator_for, score_predictions
from promptopt_dagster.core.study_data import load_study_data
from promptopt_dagster.driver import QUIET_LOGS, execute
from promptopt_dagster.instance_config import plan_instance_file
from promptopt_dagster.jobs import ITERATION_JOB
from promptopt_dagster.sensors import new_study_sensor
from promptopt_dagster.settings import Settings
from promptopt_dagster_tests.support import scripted
from promptopt_dagster_tests.support.pipeline import make_pipeline
from promptopt_dagster_tests.support.postgres import PostgresServer, postgres_instance

DAGSTER = "dagster iteration job"
FLOOR = "bare dagster job"
SQLITE_DEFAULT = "  on Dagster's default SQLite"
PG_UNPOOLED = "  on postgres, dagster-postgres"
PG_POOLED = "  on postgres, pooled"

InstanceFactory = Callable[[Path], contextlib.AbstractContextManager[dg.DagsterInstance]]


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


@contextlib.contextmanager
def home_instance(folder: Path, dagster_yaml: str) -> Iterator[dg.DagsterInstance]:
    """The instance of a fresh DAGSTER_HOME under `folder` holding `dagster_yaml`, opened as
    Dagster does (with DAGSTER_HOME set)."""
    home = folder / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(dagster_yaml)
    with (
        mock.patch.dict(os.environ, {"DAGSTER_HOME": str(home)}),
        dg.DagsterInstance.from_config(str(home)) as instance,
    ):
        yield instance


def cli_instance(folder: Path) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
    """The instance `promptopt run` opens: the dagster.yaml the CLI writes (SQLite, pooled)."""
    text = plan_instance_file(None, Settings(DAGSTER_PG_URL=None, LLM_POOL_LIMIT=None)).text
    assert text is not None
    return home_instance(folder, text)


def default_sqlite_instance(folder: Path) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
    """DAGSTER_HOME without a storage entry: Dagster's own SQLite storage."""
    return home_instance(folder, "telemetry:\n  enabled: false\n")


def dagster_iteration(
    folder: Path,
    latency: float,
    profiler: cProfile.Profile | None = None,
    open_instance: InstanceFactory = cli_instance,
) -> tuple[float, float]:
    """One iteration as `promptopt run` runs it; returns (wall seconds, seconds inside LLM calls)."""
    with open_instance(folder) as instance:
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


def iteration_asset_count() -> int:
    """How many assets one iteration materializes (the iteration job's selection)."""
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        job = make_pipeline(Path(tmp), instance, cache_enabled=False).defs.resolve_job_def(ITERATION_JOB)
        return len(job.asset_layer.executable_asset_keys)


def bare_job(n_assets: int, io_dir: Path) -> tuple[dg.Definitions, dg.DynamicPartitionsDefinition]:
    """`n_assets` chained assets that pass an integer on, on one dynamic partitions definition."""
    partitions = dg.DynamicPartitionsDefinition(name="bare")
    assets = []
    for i in range(n_assets):
        ins = {"previous": dg.AssetIn(f"bare_{i - 1}")} if i else {}

        @dg.asset(name=f"bare_{i}", ins=ins, partitions_def=partitions)
        def step(**inputs: int) -> int:
            return inputs.get("previous", 0) + 1

        assets.append(step)
    job = dg.define_asset_job("bare_job", selection=dg.AssetSelection.all(), partitions_def=partitions)
    io_manager = dg.FilesystemIOManager(base_dir=str(io_dir))
    return dg.Definitions(assets=assets, jobs=[job], resources={"io_manager": io_manager}), partitions


def bare_dagster_job(folder: Path, n_assets: int) -> tuple[float, float]:
    """Dagster's floor for a job of the iteration's shape, on the same kind of instance as the
    iteration row; returns (wall seconds, 0.0)."""
    defs, partitions = bare_job(n_assets, folder / "io")
    with cli_instance(folder) as instance:
        start = time.perf_counter()
        instance.add_dynamic_partitions(str(partitions.name), ["bare:0000"])
        result = defs.resolve_job_def("bare_job").execute_in_process(
            instance=instance, partition_key="bare:0000", run_config=QUIET_LOGS
        )
        wall = time.perf_counter() - start
        assert result.success
        return wall, 0.0


def postgres_instances(pg: PostgresServer) -> dict[str, InstanceFactory]:
    """Instances on a fresh database each: dagster-postgres' storage, and the pooled one."""

    def unpooled(folder: Path) -> contextlib.AbstractContextManager[dg.DagsterInstance]:
        url = pg.create_database(template=pg.dagster_template())
        config = {"storage": {"postgres": {"postgres_url": url}}, "telemetry": {"enabled": False}}
        return home_instance(folder, yaml.safe_dump(config))

    @contextlib.contextmanager
    def pooled(folder: Path) -> Iterator[dg.DagsterInstance]:
        url = pg.create_database(template=pg.dagster_template())
        with postgres_instance(url, folder / "dagster_home") as instance:
            yield instance

    return {PG_UNPOOLED: unpooled, PG_POOLED: pooled}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--profile", help="write a cProfile of the Dagster iterations (not the first) here")
    parser.add_argument("--postgres", action="store_true", help="also run on PostgreSQL, unpooled and pooled")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(PostgresServer()) if args.postgres else None
        measure(args, postgres_instances(pg) if pg else {})


def measure(args: argparse.Namespace, on_postgres: dict[str, InstanceFactory]) -> None:
    latency = args.latency_ms / 1000
    n_assets = iteration_asset_count()
    rows: dict[str, list[tuple[float, float]]] = {"plain python loop": [], DAGSTER: [], FLOOR: []}
    others: dict[str, InstanceFactory] = {SQLITE_DEFAULT: default_sqlite_instance, **on_postgres}
    rows.update({name: [] for name in others})
    for run in (plain_loop, dagster_iteration):  # warm-up: lazy imports and first-use caches
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), latency)
    with tempfile.TemporaryDirectory() as tmp:
        bare_dagster_job(Path(tmp), n_assets)
    profiler = cProfile.Profile() if args.profile else None
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rows["plain python loop"].append(plain_loop(Path(tmp), latency))
        with tempfile.TemporaryDirectory() as tmp:
            rows[DAGSTER].append(dagster_iteration(Path(tmp), latency, profiler))
        with tempfile.TemporaryDirectory() as tmp:
            rows[FLOOR].append(bare_dagster_job(Path(tmp), n_assets))
        for name, factory in others.items():
            with tempfile.TemporaryDirectory() as tmp:
                rows[name].append(dagster_iteration(Path(tmp), latency, open_instance=factory))
    if profiler is not None:
        profiler.dump_stats(args.profile)
    print(
        f"one iteration of the scripted study, {args.repeats} repeats, "
        f"LLM latency {args.latency_ms:g} ms/call"
    )
    print(f"{'':32s} {'wall s (median)':>16s} {'in LLM s':>10s} {'overhead s':>11s}")
    overheads = {}
    for name, samples in rows.items():
        wall = statistics.median(s[0] for s in samples)
        llm = statistics.median(s[1] for s in samples)
        overheads[name] = wall - llm
        print(f"{name:32s} {wall:16.3f} {llm:10.3f} {wall - llm:11.3f}")
    extra = overheads[DAGSTER] - overheads["plain python loop"]
    print(f"Dagster adds {extra:.3f} s per iteration over the plain loop")
    print(
        f"the bare job ({n_assets} pass-through assets) costs {overheads[FLOOR]:.3f} s: the iteration "
        f"costs {overheads[DAGSTER] - overheads[FLOOR]:.3f} s above Dagster's floor"
    )
    print(
        f"the CLI's SQLite storage saves {overheads[SQLITE_DEFAULT] - overheads[DAGSTER]:.3f} s "
        "per iteration against Dagster's default SQLite storage"
    )
    if on_postgres:
        print(
            f"on PostgreSQL the pooled storage saves {overheads[PG_UNPOOLED] - overheads[PG_POOLED]:.3f} s "
            f"per iteration ({overheads[PG_UNPOOLED] / overheads[PG_POOLED]:.1f}x less overhead)"
        )


if __name__ == "__main__":
    main()
