"""Scale-out of N studies at once over Celery workers: wall time against the latency bound.

N scripted studies (`promptopt run` processes) start at once against the fake Vertex server with
a fixed latency L per call, with W `dagster-celery` workers, and against the same studies on the
in-process executor; the table compares wall time with R x L / Q (Q: requests allowed in flight).

    python benchmarks/scale_out.py                      # 8 studies, 1, 2 and 4 workers, L=100 ms
    python benchmarks/scale_out.py --studies 2 --workers 1,2 --latency-ms 100   # smoke run

Run with this checkout first on PYTHONPATH (``PYTHONPATH=$PWD .venv/bin/python ...``). Needs
redis-server and PostgreSQL binaries (``make redis``; ``make test`` installs postgresql).
Method and measured results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cpu_usage import CpuUsage  # noqa: E402

from promptopt_dagster import storage  # noqa: E402
from promptopt_dagster.instance_config import plan_instance_file  # noqa: E402
from promptopt_dagster.settings import Settings  # noqa: E402
from promptopt_dagster_tests.support.celery_workers import CeleryWorkers  # noqa: E402
from promptopt_dagster_tests.support.gcs_emulator import GcsEmulator, emulator_environment  # noqa: E402
from promptopt_dagster_tests.support.postgres import PostgresServer  # noqa: E402
from promptopt_dagster_tests.support.redis_server import RedisServer  # noqa: E402
from promptopt_dagster_tests.support.scripted import gemini_responder, write_study  # noqa: E402
from promptopt_dagster_tests.support.vertex_server import VertexServer  # noqa: E402

BUCKET = "promptopt-scale"
TOKEN = "scale-out-token"
RUN_TIMEOUT_S = 1800.0
# Prefixes of the variables this script sets for its children: the caller's are dropped.
OURS = ("DAGSTER_", "VERTEX_", "LLM_", "MLFLOW_", "PROMPTOPT_", "GCS_", "CELERY_")


@dataclass
class Round:
    """One configuration's measurement: `workers` 0 is the in-process baseline."""

    workers: int
    wall_s: float
    requests: int
    max_in_flight: int
    failed: list[str]
    cpu_s: dict[str, float]  # CPU seconds per process role within the round
    machine_busy_s: float  # every core, every process on the machine
    steps: StepTimes  # the round's steps, from its event log


@dataclass
class StepTimes:
    """Where a round's steps spent their time, from the event log (seconds, summed over steps)."""

    steps: int  # steps that succeeded
    running_s: float  # STEP_START to STEP_SUCCESS: the step's own work
    handoff_s: float  # the previous step's (or the run's) end to the Celery submission of this one
    waiting_s: float  # the submission to a worker's "Executing steps" event (queue, pick-up, plan)
    setup_s: float  # that event to STEP_START (inputs, resources) on the worker


def step_times(pg_url: str) -> StepTimes:
    """Each succeeded step's timeline in a round's database. Submission is the Celery executor's
    "Submitting celery task" event, pick-up the worker's "Executing steps ... in celery worker"
    (sent once the task has its instance and plan); with the in-process executor there are
    neither, and handoff, waiting and set-up are 0."""
    import sqlalchemy

    query = """
        select run_id, step_key, dagster_event_type, timestamp,
               (dagster_event_type = 'ENGINE_EVENT' and event like '%Submitting celery task%') as submit,
               (dagster_event_type = 'ENGINE_EVENT' and event like '%in celery worker%') as picked
        from event_logs
        where dagster_event_type in ('RUN_START', 'STEP_START', 'STEP_SUCCESS', 'ENGINE_EVENT')
        order by run_id, id
    """
    engine = sqlalchemy.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text(query)).all()
    finally:
        engine.dispose()
    times = StepTimes(0, 0.0, 0.0, 0.0, 0.0)
    last_end: dict[str, float] = {}  # run -> its latest RUN_START or STEP_SUCCESS
    submitted: dict[tuple[str, str], float] = {}
    picked_up: dict[tuple[str, str], float] = {}
    started: dict[tuple[str, str], float] = {}
    for run_id, step_key, kind, ts, submit, picked in rows:
        at = ts.timestamp()
        key = (run_id, step_key)
        if kind == "RUN_START":
            last_end[run_id] = at
        elif kind == "ENGINE_EVENT" and submit and step_key:
            submitted[key] = at
            times.handoff_s += max(0.0, at - last_end.get(run_id, at))
        elif kind == "ENGINE_EVENT" and picked and step_key:
            picked_up[key] = at
            if key in submitted:
                times.waiting_s += max(0.0, at - submitted[key])
        elif kind == "STEP_START":
            started[key] = at
            if key in picked_up:
                times.setup_s += max(0.0, at - picked_up[key])
        elif kind == "STEP_SUCCESS" and key in started:
            times.steps += 1
            times.running_s += at - started[key]
            last_end[run_id] = max(last_end.get(run_id, at), at)
    return times


@dataclass(frozen=True)
class Servers:
    """The servers every round shares: `run_rounds` starts them once for all rounds."""

    pg: PostgresServer
    redis: RedisServer
    vertex: VertexServer


def child_env(base: dict[str, str], **values: str) -> dict[str, str]:
    """The caller's environment without our variables, plus `values`."""
    env = {k: v for k, v in base.items() if not k.startswith(OURS)}
    env.update(values)
    return env


def round_environment(
    workers: int, args: argparse.Namespace, root: Path, bucket: str, servers: Servers
) -> dict[str, str]:
    """A round's environment under `root`: a fresh database with Dagster's tables (no run of an
    earlier round is seen), DAGSTER_HOME with the instance file the CLI would write (written
    before the workers start, since they load the instance from it too), assets under the
    round's prefix of `bucket`, the Vertex client pointed at the fake Vertex server, Celery on
    Redis when `workers` > 0."""
    label = f"w{workers}"
    home = root / "dagster"
    home.mkdir(parents=True)
    pg_url = servers.pg.create_database(template=servers.pg.dagster_template())
    env = child_env(
        dict(os.environ),
        PROMPTOPT_HOME=str(root / "project"),
        DAGSTER_HOME=str(home),
        DAGSTER_PG_URL=pg_url,
        LLM_POOL_LIMIT=str(args.pool_limit),
        DAGSTER_EXECUTOR="celery" if workers else "in_process",
        GCS_BUCKET_NAME=bucket,
        GCS_PREFIX=label,
        VERTEX_PROJECT_ID="scale-project",
        VERTEX_API_ENDPOINT=servers.vertex.base_url,
        VERTEX_ACCESS_TOKEN=TOKEN,
        VERTEX_CONCURRENCY=str(args.vertex_concurrency),
        VERTEX_TIMEOUT_S="600",
        LLM_CACHE_ENABLED="false",  # every call reaches the server
        NO_GCE_CHECK="true",
        PYTHONUNBUFFERED="1",
    )
    if workers:
        env.update(CELERY_BROKER_URL=servers.redis.url(0), CELERY_BACKEND_URL=servers.redis.url(1))
    settings = Settings(DAGSTER_PG_URL=pg_url, LLM_POOL_LIMIT=args.pool_limit)
    text = plan_instance_file(None, settings).text
    assert text is not None
    (home / "dagster.yaml").write_text(text)
    return env


def run_round(workers: int, args: argparse.Namespace, tmp: Path, servers: Servers) -> Round:
    """N `promptopt run` processes at once on a fresh database and DAGSTER_HOME; with `workers`
    > 0 their steps run on that many Celery workers started for this round."""
    label = f"w{workers}"
    root = tmp / label
    env = round_environment(workers, args, root, BUCKET, servers)
    pg_url = env["DAGSTER_PG_URL"]

    studies = []
    for i in range(args.studies):
        name = f"scale_{label}_{i}"
        folder = root / name
        folder.mkdir()
        dataset = f"gs://{BUCKET}/{label}/data/{name}.csv"
        path = write_study(folder, name, dataset=dataset, max_iterations=args.iterations, minibatch_size=6)
        storage.write_bytes(dataset, (folder / f"{name}.csv").read_bytes())
        studies.append((name, path))

    pool = CeleryWorkers(workers, env, prefix=f"scale-{label}", cwd=root) if workers else None
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        if pool:
            pool.start()
            env = pool.env  # the same PATH and PYTHONPATH as the workers
        servers.vertex.clear()
        with CpuUsage(own_role="benchmark + fake Vertex server") as cpu:
            started = time.monotonic()
            for name, path in studies:
                with (root / f"{name}.log").open("wb") as log:
                    procs.append(
                        (
                            name,
                            subprocess.Popen(
                                [sys.executable, "-m", "promptopt_dagster.cli", "run", str(path)],
                                cwd=root,
                                env=env,
                                stdout=log,
                                stderr=subprocess.STDOUT,
                                start_new_session=True,
                            ),
                        )
                    )
            failed = []
            for name, proc in procs:
                if proc.wait(timeout=RUN_TIMEOUT_S) != 0:
                    failed.append(name)
            wall = time.monotonic() - started
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if pool:
            pool.close()
    for name in failed:
        print(f"--- {label} {name} failed; its log ends:\n{(root / f'{name}.log').read_text()[-3000:]}")
    return Round(
        workers,
        wall,
        len(servers.vertex.generate_requests()),
        servers.vertex.max_in_flight,
        failed,
        cpu.by_role(),
        cpu.machine_busy_s,
        step_times(pg_url),
    )


class Timed(Protocol):
    """What `run_rounds` reads of a round: its wall time, printed as each round ends."""

    wall_s: float


R = TypeVar("R", bound=Timed)
RunRound = Callable[[int, argparse.Namespace, Path, Servers], R]


def run_rounds(
    counts: list[int], args: argparse.Namespace, bucket: str, tmp: Path, run_round: RunRound[R]
) -> list[R]:
    """`run_round` for the in-process baseline (unless --no-baseline), then for each of `counts`
    Celery workers, on servers started once for every round and stopped by pid (each helper's
    close) however we leave."""
    rounds: list[R] = []
    with (
        PostgresServer() as pg,
        RedisServer() as redis,
        GcsEmulator(bucket=bucket) as emulator,
        emulator_environment(emulator),  # this process and its children reach the emulator
        VertexServer(responder=gemini_responder, latency=args.latency_ms / 1000.0) as vertex,
    ):
        servers = Servers(pg, redis, vertex)
        for workers in ([] if args.no_baseline else [0]) + counts:
            what = f"{workers} celery worker(s)" if workers else "in_process"
            print(f"round: {what} ...", flush=True)
            rounds.append(run_round(workers, args, tmp, servers))
            print(f"  {rounds[-1].wall_s:.1f} s", flush=True)
    return rounds


def executor_name(workers: int) -> str:
    """A round's row label: 0 workers is the in-process baseline."""
    return f"celery x{workers}" if workers else "in_process"


def print_head(head: str) -> None:
    """A table's column titles, underlined."""
    print(head)
    print("-" * len(head))


def print_table(rounds: list[Round], args: argparse.Namespace) -> None:
    quota = args.pool_limit * args.vertex_concurrency
    latency = args.latency_ms / 1000.0
    celery = [r for r in rounds if r.workers]
    first = min(celery, key=lambda r: r.workers) if celery else None
    print(
        f"\n{args.studies} studies at once, latency {args.latency_ms:.0f} ms, "
        f"quota {args.pool_limit} x {args.vertex_concurrency} = {quota} in flight"
    )
    head = (
        f"{'executor':<18}{'wall s':>8}{'requests':>10}{'bound s':>9}{'wall/bound':>12}"
        f"{'speed-up':>10}{'linear':>8}{'max in flight':>15}{'ok':>5}"
    )
    print_head(head)
    for r in rounds:
        bound = r.requests * latency / quota
        name = executor_name(r.workers)
        speed = linear = "-"
        if r.workers and first:
            s = first.wall_s / r.wall_s
            speed, linear = f"{s:.2f}", f"{s / (r.workers / first.workers):.2f}"
        ok = "yes" if not r.failed and r.max_in_flight <= quota else "NO"
        ratio = f"{r.wall_s / bound:.1f}" if bound else "-"
        print(
            f"{name:<18}{r.wall_s:>8.1f}{r.requests:>10}{bound:>9.2f}{ratio:>12}"
            f"{speed:>10}{linear:>8}{f'{r.max_in_flight} / {quota}':>15}{ok:>5}"
        )


PRODUCT_ROLES = ("drivers (promptopt run)", "celery workers", "run workers")


def print_cpu(rounds: list[Round]) -> None:
    """Where the CPU went in each round: seconds per role, per succeeded step, and how busy the
    machine's cores were (busy / (cores x wall); near 1.0 the round was CPU-bound)."""
    cores = os.cpu_count() or 1
    roles = list(dict.fromkeys(role for r in rounds for role in r.cpu_s))
    print(f"\nCPU seconds within each round, by process role ({cores} cores)")
    head = f"{'executor':<18}{'steps':>7}" + "".join(f"{role[:16]:>18}" for role in roles)
    head += f"{'ours s/step':>13}{'machine busy':>14}"
    print_head(head)
    for r in rounds:
        name = executor_name(r.workers)
        ours = sum(v for k, v in r.cpu_s.items() if k in PRODUCT_ROLES)
        per_step = f"{ours / r.steps.steps:.2f}" if r.steps.steps else "-"
        busy = r.machine_busy_s / (cores * r.wall_s) if r.wall_s else 0.0
        print(
            f"{name:<18}{r.steps.steps:>7}"
            + "".join(f"{r.cpu_s.get(role, 0.0):>18.1f}" for role in roles)
            + f"{per_step:>13}{busy:>14.2f}"
        )


def print_steps(rounds: list[Round]) -> None:
    """Where the steps' time went: handed off (the executor noticing the previous step's end and
    submitting the next), waiting (for a worker, its pick-up and the task's instance and plan),
    set-up (on the worker, before the step starts), running; and how busy the workers were
    ((set-up + running) / (workers x wall), a lower bound: the task's own start is in waiting)."""
    print("\nStep timelines (seconds per step, mean over the round's succeeded steps)")
    head = (
        f"{'executor':<18}{'steps':>7}{'handoff':>10}{'waiting':>10}{'set-up':>10}{'running':>10}"
        f"{'workers busy':>14}"
    )
    print_head(head)
    for r in rounds:
        t = r.steps
        if not t.steps:
            continue
        name = executor_name(r.workers)
        busy = f"{(t.setup_s + t.running_s) / (r.workers * r.wall_s):.2f}" if r.workers else "-"
        means = [x / t.steps for x in (t.handoff_s, t.waiting_s, t.setup_s, t.running_s)]
        print(f"{name:<18}{t.steps:>7}" + "".join(f"{m:>10.2f}" for m in means) + f"{busy:>14}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="studies started at once")
    parser.add_argument("--workers", default="1,2,4", help="Celery worker counts, comma-separated")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="fake server's latency per call")
    parser.add_argument("--pool-limit", type=int, default=2, help="LLM_POOL_LIMIT")
    parser.add_argument("--vertex-concurrency", type=int, default=4, help="VERTEX_CONCURRENCY")
    parser.add_argument("--iterations", type=int, default=1, help="max_iterations of each study")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process round")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",") if w.strip()]

    with tempfile.TemporaryDirectory(prefix="promptopt-scale-") as tmp_dir:
        rounds = run_rounds(counts, args, BUCKET, Path(tmp_dir), run_round)
    print_table(rounds, args)
    print_cpu(rounds)
    print_steps(rounds)
    quota = args.pool_limit * args.vertex_concurrency
    return 0 if all(not r.failed and r.max_in_flight <= quota for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
