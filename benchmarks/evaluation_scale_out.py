"""One big evaluation over Celery workers: rows per second with 1, 2, 4 workers against the same
evaluation in one process, and each worker's peak memory.

A study's seed prompt is evaluated over a generated dataset of R rows in shards of S rows (one
step each) against the fake Vertex server, with a fixed latency L per call.

    python benchmarks/evaluation_scale_out.py                 # 100,000 rows, 1, 2 and 4 workers
    python benchmarks/evaluation_scale_out.py --rows 20000 --shard-rows 2500 --latency-ms 20

Run with this checkout first on PYTHONPATH (``PYTHONPATH=$PWD .venv/bin/python ...``). Needs
redis-server and PostgreSQL binaries (``make redis``; ``make test`` installs postgresql).
Method and measured results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_out import Servers, executor_name, print_head, round_environment, run_rounds  # noqa: E402

from promptopt_dagster import storage  # noqa: E402
from promptopt_dagster.settings import Settings  # noqa: E402
from promptopt_dagster_tests.support.celery_workers import CeleryWorkers  # noqa: E402
from promptopt_dagster_tests.support.scripted import write_dataset, write_study  # noqa: E402

BUCKET = "promptopt-eval-scale"
STUDY = "evalscale"
DATASET = "big.csv"
RUN_TIMEOUT_S = 7200.0


@dataclass
class Round:
    """One configuration's measurement: `workers` 0 is the in-process baseline."""

    workers: int
    wall_s: float
    rows: int
    requests: int
    max_in_flight: int
    peak_mb: float
    ok: bool


def peak_rss_mb(pgid: int) -> float:
    """The largest VmHWM among the live processes of process group `pgid`."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ProcessLookupError, ValueError):
            continue
    return peak / 1024


def orchestrate() -> int:
    """In the round's child process (the environment is the round's): register the study, add
    the evaluation's partition keys, run evaluation_job for it, print the rows it scored."""
    import dagster as dg

    from promptopt_dagster.core.study import load_study
    from promptopt_dagster.definitions import build_definitions
    from promptopt_dagster.driver import execute
    from promptopt_dagster.partitions import evaluation_key

    defs = build_definitions(Settings())
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    store.register_study(load_study(os.environ["EVAL_SCALE_STUDY"]))
    version = f"{STUDY}:{STUDY}-seed"
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("prompt_version", [version])
        instance.add_dynamic_partitions("dataset", [DATASET])
        key = str(evaluation_key(version, DATASET))
        execute(defs, instance, "evaluation_job", key, {})
        [event] = instance.get_latest_materialization_events([dg.AssetKey("prompt_evaluation")]).values()
        meta = event.asset_materialization.metadata  # type: ignore[union-attr]
        print(f"rows={meta['rows'].value} shards={meta['shards'].value} failed={meta['failed_rows'].value}")
        if os.environ.get("EVAL_SCALE_SELF_PEAK"):  # every shard ran in this process
            print(f"peak_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
    return 0


def run_round(workers: int, args: argparse.Namespace, tmp: Path, servers: Servers) -> Round:
    label = f"w{workers}"
    root = tmp / label
    env = round_environment(workers, args, root, BUCKET, servers)
    env.update(EVALUATION_SHARD_ROWS=str(args.shard_rows), EVALUATION_CHUNK_ROWS=str(args.chunk_rows))
    if not workers:
        env["EVAL_SCALE_SELF_PEAK"] = "1"

    folder = root / "study"
    folder.mkdir()
    study = write_study(folder, STUDY, dataset=f"gs://{BUCKET}/{label}/data/{STUDY}.csv")
    storage.write_bytes(f"gs://{BUCKET}/{label}/data/{STUDY}.csv", (folder / f"{STUDY}.csv").read_bytes())
    storage.write_bytes(f"gs://{BUCKET}/{label}/datasets/{DATASET}", args.dataset.read_bytes())
    env["EVAL_SCALE_STUDY"] = str(study)

    pool = CeleryWorkers(workers, env, prefix=f"evalscale-{label}", cwd=root) if workers else None
    peak = 0.0
    try:
        if pool:
            pool.start()
            env = pool.env
        servers.vertex.clear()
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, __file__, "--orchestrate"],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        wall = time.monotonic() - started
        if pool:
            peak = max(peak_rss_mb(pid) for pid in pool.pids)
    finally:
        if pool:
            pool.close()
    out = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    if proc.returncode != 0:
        print(f"--- {label} failed; its output ends:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    peak = peak or float(out.get("peak_mb", 0.0))
    rows = int(out.get("rows", 0))
    return Round(
        workers,
        wall,
        rows,
        len(servers.vertex.generate_requests()),
        servers.vertex.max_in_flight,
        peak,
        proc.returncode == 0 and rows == args.rows and out.get("failed") == "0",
    )


def print_table(rounds: list[Round], args: argparse.Namespace) -> None:
    quota = args.pool_limit * args.vertex_concurrency
    bound = quota / (args.latency_ms / 1000.0)
    celery = [r for r in rounds if r.workers]
    first = min(celery, key=lambda r: r.workers) if celery else None
    print(
        f"\n{args.rows} rows in shards of {args.shard_rows}, latency {args.latency_ms:.0f} ms, "
        f"quota {args.pool_limit} x {args.vertex_concurrency} = {quota} in flight "
        f"(at most {bound:.0f} rows/s)"
    )
    head = (
        f"{'executor':<14}{'wall s':>8}{'rows/s':>8}{'speed-up':>10}{'linear':>8}"
        f"{'requests':>10}{'max in flight':>15}{'peak MB':>9}{'ok':>5}"
    )
    print_head(head)
    for r in rounds:
        name = executor_name(r.workers)
        speed = linear = "-"
        if r.workers and first:
            s = first.wall_s / r.wall_s
            speed, linear = f"{s:.2f}", f"{s / (r.workers / first.workers):.2f}"
        ok = "yes" if r.ok and r.max_in_flight <= quota else "NO"
        print(
            f"{name:<14}{r.wall_s:>8.1f}{r.rows / r.wall_s:>8.1f}{speed:>10}{linear:>8}"
            f"{r.requests:>10}{f'{r.max_in_flight} / {quota}':>15}{r.peak_mb:>9.0f}{ok:>5}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the evaluated dataset")
    parser.add_argument("--shard-rows", type=int, default=10_000, help="EVALUATION_SHARD_ROWS")
    parser.add_argument("--chunk-rows", type=int, default=1000, help="EVALUATION_CHUNK_ROWS")
    parser.add_argument("--workers", default="1,2,4", help="Celery worker counts, comma-separated")
    parser.add_argument("--latency-ms", type=float, default=100.0, help="fake server's latency per call")
    parser.add_argument("--pool-limit", type=int, default=4, help="LLM_POOL_LIMIT")
    parser.add_argument("--vertex-concurrency", type=int, default=4, help="VERTEX_CONCURRENCY")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-process round")
    parser.add_argument("--orchestrate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.orchestrate:
        return orchestrate()
    counts = [int(w) for w in args.workers.split(",") if w.strip()]

    with tempfile.TemporaryDirectory(prefix="promptopt-evalscale-") as tmp_dir:
        tmp = Path(tmp_dir)
        args.dataset = write_dataset(tmp / DATASET, rows=args.rows)
        rounds = run_rounds(counts, args, BUCKET, tmp, run_round)
    print_table(rounds, args)
    quota = args.pool_limit * args.vertex_concurrency
    return 0 if all(r.ok and r.max_in_flight <= quota for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
