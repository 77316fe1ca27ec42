"""Peak memory of evaluating a prompt over a large dataset: chunked streaming (core/sharded_evaluation.py)
against loading the whole table at once, in the same run.

Each way runs in its own child process (peak RSS only grows within a process), on the same
generated CSV, with a scripted rule-based fake LLM (100k real calls are out of reach here):

    .venv/bin/python benchmarks/backfill_memory.py               # 100,000 rows
    .venv/bin/python benchmarks/backfill_memory.py --rows 20000 --chunk-rows 500
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from promptopt_dagster.core import evaluation_catalog, sharded_evaluation
from promptopt_dagster.core.dataset import load_dataset
from promptopt_dagster.core.inference import run_prompt
from promptopt_dagster.core.scoring import evaluator_for, score_predictions
from promptopt_dagster.core.study import StudyConfig
from promptopt_dagster.llm.base import ChatRequest, ChatResponse
from promptopt_dagster.llm.fake import ScriptedLLM

GOOD = ["great", "excellent", "lovely", "superb", "fantastic", "wonderful"]
BAD = ["awful", "broken", "terrible", "useless", "horrible", "poor"]


def make_csv(path: Path, rows: int) -> Path:
    """Reviews of ~120 characters each, half positive."""
    filler = "It arrived on a Tuesday, was packed in a box, and I used it for a few weeks around the house."
    frame = pd.DataFrame(
        {
            "id": [f"r{i:07d}" for i in range(rows)],
            "review": [
                f"The item {i} is {(GOOD if i % 2 == 0 else BAD)[i % 6]}. {filler}" for i in range(rows)
            ],
            "label": ["positive" if i % 2 == 0 else "negative" for i in range(rows)],
        }
    )
    frame.to_csv(path, index=False)
    path.with_suffix(".yaml").write_text("id_column: id\n")  # the sidecar: ids from the file
    return path


def responder(request: ChatRequest) -> str:
    """Rule-based fake: the bare label when the system prompt lists the labels, chatter otherwise."""
    user = request.messages[-1].content
    label = "positive" if any(w in user for w in GOOD) else "negative"
    return label if "one of:" in request.messages[0].content else f"I think it is {label}."


class StreamingFake(ScriptedLLM):
    """The scripted fake without its request log: ScriptedLLM keeps every request for tests to
    inspect, which would itself hold 100k requests in memory and hide what is measured here."""

    def generate(self, requests: Sequence[ChatRequest]) -> list[ChatResponse]:
        self.calls += len(requests)
        return [self._one(r) for r in requests]


def study(dataset: str) -> StudyConfig:
    return StudyConfig(
        name="bench",
        dataset=dataset,
        input_columns=["review"],
        reference_column="label",
        id_column="id",
        seed_prompt={"system_prompt": "Answer with one of: positive, negative.", "output_prompt": "{review}"},
        metrics=["f1"],
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_child(mode: str, csv_path: Path, out_dir: Path, chunk_rows: int) -> dict[str, float | int | str]:
    s = study(str(csv_path))
    evaluator = evaluator_for(s)  # imports `evaluate` and loads the metrics: part of the baseline
    prompt = s.seed_prompt_state()
    llm = StreamingFake(responder)
    baseline = peak_rss_mb()
    start = time.perf_counter()
    if mode == "chunked":
        info = evaluation_catalog.inspect_dataset(csv_path.name, str(csv_path))
        evaluation = sharded_evaluation.Evaluation("bench:seed", s, prompt, info, str(out_dir))
        summary = sharded_evaluation.evaluate_dataset(llm, evaluator, evaluation, chunk_rows=chunk_rows)
        rows, score = summary.rows, summary.scores["exact_match"]
    else:
        rows_frame = load_dataset(str(csv_path), s.input_columns, s.reference_column, s.id_column)
        preds = run_prompt(llm, prompt, rows_frame.assign(split="eval"), s.primary_model, s)
        scored, agg = score_predictions(evaluator, preds, s.target_metric, ["split"])
        scored.drop(columns=["split"]).to_parquet(out_dir / "predictions.parquet")
        rows, score = len(scored), agg["eval"]["exact_match"]
    return {
        "mode": mode,
        "rows": rows,
        "exact_match": round(score, 4),
        "seconds": round(time.perf_counter() - start, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_above_baseline_mb": round(peak_rss_mb() - baseline, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chunk-rows", type=int, default=sharded_evaluation.DEFAULT_CHUNK_ROWS)
    parser.add_argument("--child", choices=["chunked", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--csv", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.csv, args.out, args.chunk_rows)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = make_csv(Path(tmp) / "large.csv", args.rows)
        size_mb = csv_path.stat().st_size / 1e6
        print(f"{args.rows} rows, {size_mb:.1f} MB of CSV, chunks of {args.chunk_rows} rows")
        results = []
        for mode in ("chunked", "whole"):
            out = Path(tmp) / mode
            out.mkdir()
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--csv",
                str(csv_path),
                "--out",
                str(out),
                "--chunk-rows",
                str(args.chunk_rows),
            ]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(pd.DataFrame(results).to_string(index=False))
    chunked, whole = results
    print(
        f"peak above baseline: chunked {chunked['peak_above_baseline_mb']} MB, "
        f"whole table {whole['peak_above_baseline_mb']} MB"
    )


if __name__ == "__main__":
    main()
