"""The suite's one table from stored results of `optimizer_suite.py`, so that columns run at
different times (the product's, MIPROv2 task by task, GEPA) print and save as one.

    .venv/bin/python benchmarks/suite_table.py FILE [FILE ...] [--out merged.json]

Every file must have the same budget. A task's cell comes from the last file that ran that
system on it; a copy a file took with `--reuse-peers` counts only where no file ran it. A task
whose test rows (`test_ids_sha`) differ between files is refused: its scores would not compare.
Each cell of the merged JSON names the file it came from (`source`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optimizer_suite import SYSTEMS, print_table  # noqa: E402


def merge(files: list[Path]) -> dict[str, Any]:
    """The tasks of `files` merged cell by cell (see the module docstring); SystemExit on a
    budget or test-row mismatch."""
    budgets = {}
    tasks: dict[str, Any] = {}
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        budgets[str(path)] = data.get("budget")
        for name, info in data.get("tasks", {}).items():
            facts = {k: v for k, v in info.items() if k != "systems"}
            merged = tasks.setdefault(name, {**facts, "systems": {}})
            if merged["test_ids_sha"] != info["test_ids_sha"]:
                raise SystemExit(f"{name}: {path} scored other test rows than an earlier file; not merged")
            for system, entry in info["systems"].items():
                held = merged["systems"].get(system)
                if entry.get("reused") and held is not None:
                    continue  # a copy never replaces a cell
                cell = {**entry, "source": path.name}
                if entry.get("reused"):
                    cell["source"] = f"{path.name} (a copy from {data.get('reused_from')})"
                merged["systems"][system] = cell
    if len(set(budgets.values())) != 1:
        raise SystemExit(f"the files were run with different budgets: {budgets}")
    return {"budget": next(iter(budgets.values())), "tasks": tasks}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", type=Path, help="optimizer_suite.py results, oldest first")
    parser.add_argument("--out", type=Path, default=None, help="write the merged results here")
    args = parser.parse_args(argv)
    merged = merge(args.files)
    systems = [s for s in SYSTEMS if any(s in info["systems"] for info in merged["tasks"].values())]
    print_table(merged["tasks"], systems, merged["budget"])
    if args.out:
        report = {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, *sys.argv]),
            "sources": [str(f) for f in args.files],
            **merged,
        }
        args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        print(f"merged results: {args.out}")


if __name__ == "__main__":
    main()
