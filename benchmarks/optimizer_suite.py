"""The product's optimizer against a hand-written precise prompt, GEPA and DSPy MIPROv2, on the
benchmark suite (benchmarks/suite/), at the same LLM-call budget, on the embedded local model.

    .venv/bin/pip install -e '.[dev,bench]'          # gepa and dspy[optuna], pinned
    .venv/bin/python benchmarks/suite/make_suite.py   # (re)writes the suite's data and studies
    .venv/bin/python benchmarks/optimizer_suite.py [--tasks a,b] [--budget 350]
        [--systems seed,precise,fewshot4,ours,gepa,miprov2] [--out benchmarks/results/suite-<date>.json]
        [--reuse-peers FILE]

For each task every system sees the same rows, split by the product's own split function
(`load_study_data`): optimizers may use train and val, and each final prompt (or, for MIPROv2,
program) is scored once on the held-out test split with the study's target metric. Nothing is
chosen on test.

- seed     the study's vague seed prompt, no optimization;
- precise  the hand-written prompt of benchmarks/suite/precise_prompts.yaml, no optimization;
- fewshot4 no search: the seed's instructions and 4 training rows as demonstrations, as a DSPy
           program (`LabeledFewShot(k=4)`, the same ChatAdapter and model as miprov2); 0 calls
           before test, the floor an optimizer's budget has to beat;
- ours     the product through its real Dagster definitions and headless driver, in a temporary
           PROMPTOPT_HOME, with `budget_calls` = the budget (it enforces that itself);
- gepa     gepa 0.1.4, the embedded model as task and reflection LM, train = our train split,
           val = our val split; task + reflection calls together limited to the budget;
- miprov2  dspy 3.4.1 MIPROv2(auto="light") with DSPy's ChatAdapter and a dspy.BaseLM over the
           same embedded model, compiled on train/val; calls limited to the budget. The request
           is the seed's rendered output prompt and the starting instruction its system prompt,
           as for GEPA. Below the budget "light" needs, a scaled-down manual setting is used
           (recorded as `plan`).

"calls" are live model calls spent optimizing (repeated identical requests are answered from
memory, as the product's response cache does); test scoring is counted apart. `--reuse-peers`
takes the columns not being run from an earlier results file (same budget and same test rows
required), so the product's column can be re-run alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite_peers import run_fewshot, run_gepa, run_miprov2  # noqa: E402
from suite_systems import (  # noqa: E402
    NETWORK_ATTEMPTS,
    SUITE_DIR,
    SystemResult,
    Task,
    block_network,
    dumps,
    load_task,
    offline_environment,
    run_fixed,
    run_ours,
    score_at,
    task_names,
    versions,
)

SYSTEMS = ("seed", "precise", "fewshot4", "gepa", "miprov2", "ours")
REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    parser.add_argument("--budget", type=int, default=350, help="LLM calls per task and optimizer")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)}")
    parser.add_argument("--out", default=None,
                        help="results JSON (default benchmarks/results/suite-<date>.json)")
    parser.add_argument("--reuse-peers", default=None, metavar="FILE",
                        help="take the systems not run now from this earlier results JSON")
    parser.add_argument("--model-cache", default=None,
                        help="folder for the joined packaged model (default: the library's default)")
    parser.add_argument("--model-path", default=os.environ.get("LOCAL_MODEL_PATH"),
                        help="a GGUF file instead of the packaged model")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads for scoring and the third-party optimizers (default: all "
                             "cores; 1 is faster when other processes share the cores)")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    names = task_names()
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or names
    missing = sorted(set(args.tasks) - set(names))
    if missing:
        parser.error(f"unknown tasks {missing}; the suite has: {', '.join(names)}")
    if args.budget < 1:
        parser.error("--budget must be at least 1")
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / f"suite-{dt.date.today().isoformat()}.json")
    return args


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "promptopt_dagster"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes in promptopt_dagster/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_peers(path: str | None, budget: int) -> dict[str, Any]:
    if not path:
        return {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("budget") != budget:
        raise SystemExit(f"--reuse-peers {path} was run with budget {data.get('budget')}, not {budget}")
    return data.get("tasks", {})


def run_system(system: str, llm: Any, task: Task, budget: int, cache_root: Path) -> SystemResult:
    try:
        if system in ("seed", "precise"):
            return run_fixed(llm, task, system)
        if system == "ours":
            return run_ours(llm, task, budget)
        if system == "fewshot4":
            return run_fewshot(llm, task, cache_root)
        if system == "gepa":
            return run_gepa(llm, task, budget)
        return run_miprov2(llm, task, budget, cache_root)
    except Exception as exc:  # one system failing must not lose the others' results
        result = SystemResult(system, error=f"{type(exc).__name__}: {exc}")
        result.extra["traceback"] = traceback.format_exc()[-3000:]
        return result


def fmt_score(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    if entry.get("error"):
        return "error"
    score = entry.get("test_score")
    text = "-" if score is None else f"{score:.2f}"
    return text + ("*" if entry.get("reused") else "")


def ours_at_peer_calls(res: dict[str, Any], peer: str) -> str:
    """The product's test score had its budget ended at the calls `peer` spent: the champion it
    held then (its `trajectory`), scored on test after the study."""
    peer_calls = (res.get(peer) or {}).get("calls")
    trajectory = ((res.get("ours") or {}).get("extra") or {}).get("trajectory")
    if not peer_calls or not trajectory:
        return "-"
    score = score_at(trajectory, peer_calls)
    return "-" if score is None else f"{score:.2f} @{peer_calls}"


def table_rows(tasks: dict[str, Any], systems: list[str]) -> tuple[list[str], list[list[str]]]:
    optimizers = [s for s in ("gepa", "miprov2", "ours") if s in systems]
    peers = [s for s in optimizers if s != "ours"] if "ours" in systems else []
    header = ["task", "metric", "test n", *[s for s in SYSTEMS if s in systems],
              *[f"calls {s}" for s in optimizers],
              *[f"ours at {p} calls" for p in peers], "wall s"]
    rows = []
    means: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    for name, info in tasks.items():
        res = info["systems"]
        row = [name, info["metric"], str(info["splits"]["test"])]
        for s in SYSTEMS:
            if s in systems:
                row.append(fmt_score(res.get(s)))
                if res.get(s) and res[s].get("test_score") is not None:
                    means[s].append(res[s]["test_score"])
        for s in optimizers:
            entry = res.get(s) or {}
            calls = entry.get("calls")
            refused = entry.get("refused") or 0
            row.append("-" if calls is None else f"{calls}" + (f" (+{refused} refused)" if refused else ""))
        row += [ours_at_peer_calls(res, p) for p in peers]
        wall = sum((e.get("seconds") or 0) + (e.get("test_seconds") or 0) for e in res.values()
                   if not e.get("reused"))
        row.append(f"{wall:.0f}")
        rows.append(row)
    mean_row = ["mean", "", ""]
    for s in SYSTEMS:
        if s in systems:
            vals = means[s]
            mean_row.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
    mean_row += [""] * (len(header) - len(mean_row))
    rows.append(mean_row)
    return header, rows


def print_table(tasks: dict[str, Any], systems: list[str], budget: int) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(tasks, systems)
    table = Table(title=f"test score per task (budget {budget} LLM calls per optimizer and task)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i < 2 else "right")
    for i, row in enumerate(rows):
        table.add_row(*row, end_section=(i == len(rows) - 2))
    Console(width=200).print(table)
    if any(e.get("reused") for info in tasks.values() for e in info["systems"].values()):
        print("* reused from --reuse-peers")
    for name, info in tasks.items():
        for system, entry in info["systems"].items():
            if entry.get("error"):
                print(f"{name} / {system}: {entry['error']}")
            for note in entry.get("notes") or []:
                print(f"{name} / {system}: {note}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    block_network()
    peers = load_peers(args.reuse_peers, args.budget)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    from promptopt_dagster.llm.local import DEFAULT_CACHE_DIR, LocalLLM

    llm = LocalLLM(model_path=args.model_path, cache_dir=args.model_cache or DEFAULT_CACHE_DIR,
                   threads=args.threads)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv[1:],
        "budget": args.budget,
        "systems": args.systems,
        "git_commit": git_commit(),
        "versions": versions(),
        "python": platform.python_version(),
        "model": str(llm.model_file.name),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "llama_threads": llm.threads,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "suite": str(SUITE_DIR.relative_to(REPO)),
        "reused_from": args.reuse_peers,
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="suite-cache-") as tmp:
        cache_root = Path(tmp)
        offline_environment(cache_root)
        for name in args.tasks:
            task = load_task(name)
            info: dict[str, Any] = {
                "kind": task.kind,
                "metric": task.metric,
                "rows": sum(task.split_sizes().values()),
                "splits": task.split_sizes(),
                "test_ids_sha": task.test_ids_sha(),
                "systems": {},
            }
            peer = peers.get(name)
            if peer and peer.get("test_ids_sha") != info["test_ids_sha"]:
                print(f"{name}: the test rows differ from {args.reuse_peers}; nothing reused for this task")
                peer = None
            for system in SYSTEMS:
                if system in args.systems:
                    print(f"[{time.perf_counter() - started:7.0f}s] {name}: {system} ...", flush=True)
                    result = run_system(system, llm, task, args.budget, cache_root)
                    info["systems"][system] = result.to_dict()
                    score = "error" if result.error else f"{result.test_score:.3f}"
                    print(f"[{time.perf_counter() - started:7.0f}s] {name}: {system} test {task.metric} "
                          f"{score}, {result.calls} calls, {result.seconds + result.test_seconds:.0f} s",
                          flush=True)
                elif peer and system in peer.get("systems", {}):
                    info["systems"][system] = {**peer["systems"][system], "reused": True}
            report["tasks"][name] = info
            report["wall_seconds"] = time.perf_counter() - started
            report["network_attempts"] = list(NETWORK_ATTEMPTS)
            out_path.write_text(dumps(report), encoding="utf-8")  # after every task: nothing lost
    shown = sorted({s for info in report["tasks"].values() for s in info["systems"]} | set(args.systems),
                   key=SYSTEMS.index)
    print_table(report["tasks"], shown, args.budget)
    if NETWORK_ATTEMPTS:
        print(f"blocked network attempts: {NETWORK_ATTEMPTS}")
    print(f"results: {out_path} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
