"""`promptopt`: run a study headless, open the UIs, inspect or forget studies."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from promptopt_dagster.core.errors import PromptoptError
from promptopt_dagster.settings import Settings, get_settings

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def _prepare_home(settings: Settings) -> None:
    """Point Dagster at the project's persistent instance, so the UI sees CLI runs."""
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home.resolve())
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")


def cmd_run(args: argparse.Namespace) -> int:
    import dagster as dg

    from promptopt_dagster.core.iteration import evaluator_for, load_study_data
    from promptopt_dagster.core.study import load_study
    from promptopt_dagster.definitions import build_definitions
    from promptopt_dagster.driver import ITERATION_JOB, RunOutcome, drive, forget_study
    from promptopt_dagster.partitions import parse_key

    settings = get_settings()
    _prepare_home(settings)
    logging.getLogger("dagster").setLevel(logging.WARNING)  # our own progress lines instead
    study = load_study(args.study)
    # Validate data, columns, splits and metrics before anything is registered or run.
    data = load_study_data(study)
    evaluator_for(study)
    console.print(
        f"[bold]{study.name}[/]: {sum(len(v) for v in data.splits.values())} rows "
        f"(train {len(data.splits['train'])}, val {len(data.splits['val'])}, "
        f"test {len(data.splits['test'])}); "
        f"metric {study.target_metric}; backend {study.primary_model.backend or settings.LLM_BACKEND}"
    )
    defs = build_definitions(settings)
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    instance = dg.DagsterInstance.get()
    if args.fresh:
        forget_study(defs, instance, study.name)
    is_new = store.register_study(study)
    if not is_new:
        console.print(f"{study.name} is already registered: resuming where it stopped (or reporting).")

    status = console.status("starting")

    def on_run(job: str, key: str) -> None:
        if job == ITERATION_JOB:
            _, iteration = parse_key(key)
            status.update(f"iteration {iteration}: inference, evaluation, refinement, decision ...")
        else:
            status.update("scoring seed and final prompt on the test split ...")

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job != ITERATION_JOB:
            return
        _, iteration = parse_key(outcome.partition_key)
        record = store.load_record(study.name, iteration)
        if record:
            verdict = "[green]accepted[/]" if record.accepted else "[yellow]rejected[/]"
            console.print(
                f"iteration {iteration}: incumbent val {record.incumbent_val_score:.3f} -> {verdict}, "
                f"val {record.champion_val_score:.3f}; {record.calls} LLM calls; {outcome.seconds:.0f} s; "
                f"{record.stop_message}"
            )

    with status:
        result = drive(defs, instance, study.name, on_run=on_run, on_done=on_done)
    if not result.runs:
        console.print("nothing left to run for this study.")
    wall = {parse_key(k)[1]: v for k, v in result.iteration_seconds().items()}
    return _print_report(defs, instance, study.name, wall)


def _print_report(defs, instance, study_name: str, wall: dict[int, float]) -> int:  # type: ignore[no-untyped-def]
    from promptopt_dagster.core.report import StudyReport

    try:
        raw = defs.load_asset_value("study_report", partition_key=study_name, instance=instance)
    except Exception as exc:  # noqa: BLE001 - any failure to load means there is no report yet
        err_console.print(f"[red]no report for {study_name}[/]: {exc}")
        return 1
    report = StudyReport.model_validate(raw)
    table = Table(title=f"{report.study}: {report.metric} by iteration")
    for col in ("iteration", "val score", "accepted", "LLM calls", "tokens", "cost $", "wall s"):
        table.add_column(col, justify="right")
    for row in report.rows:
        seconds = wall.get(row.iteration, row.wall_seconds)
        table.add_row(
            str(row.iteration),
            f"{row.val_score:.3f}",
            "yes" if row.accepted else "no",
            str(row.llm_calls),
            str(row.tokens),
            f"{row.cost_usd:.4f}",
            f"{seconds:.0f}" if seconds is not None else "-",
        )
    console.print(table)
    console.print(f"stopped: {report.stop_message}")
    console.print("[bold]final prompt[/]")
    console.print(f"  system: {report.final_prompt.system_prompt or '(none)'}", markup=False)
    console.print(f"  output: {report.final_prompt.output_prompt}", markup=False)
    metric = report.metric
    console.print(
        f"[bold]test {metric}[/]: seed {report.seed_test[metric]:.3f} -> "
        f"final {report.final_test[metric]:.3f} "
        f"(n={int(report.final_test.get('n', 0))}); validation: seed {report.seed_val:.3f} -> "
        f"final {report.final_val:.3f}; {report.total_calls} LLM calls, {report.total_tokens} tokens "
        f"(+{report.test_calls} for the test report); "
        f"cost ${report.total_cost_usd + report.test_cost_usd:.4f}"
    )
    return 0


def _start_mlflow_ui(settings: Settings) -> tuple[subprocess.Popen[bytes] | None, str]:
    """MLflow's UI over the project's SQLite store, on 127.0.0.1 in its own session (so it can be
    stopped as a group). With MLFLOW_TRACKING_URI set, that server already is the UI."""
    if settings.MLFLOW_TRACKING_URI:
        return None, settings.MLFLOW_TRACKING_URI
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    settings.PROMPTOPT_HOME.mkdir(parents=True, exist_ok=True)
    cmd = [
        mlflow,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(settings.MLFLOW_UI_PORT),
        "--backend-store-uri",
        settings.mlflow_uri,
        "--artifacts-destination",
        str(settings.PROMPTOPT_HOME / "mlartifacts"),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner workers
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    return proc, f"http://127.0.0.1:{settings.MLFLOW_UI_PORT}"


def _stop_group(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM to the process group, SIGKILL if it is still there after 15 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_ui(args: argparse.Namespace) -> int:
    settings = get_settings()
    _prepare_home(settings)
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    cmd = [
        dagster,
        "dev",
        "-h",
        args.host,
        "-p",
        str(args.port),
        "-w",
        str(Path(__file__).parent.parent / "workspace.yaml"),
    ]
    from promptopt_dagster.core.tracking import scrub

    signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM stops both UIs, like Ctrl-C
    mlflow_proc, mlflow_url = _start_mlflow_ui(settings)
    console.print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    console.print(f"MLflow UI:  {mlflow_url}  (tracking {scrub(settings.mlflow_uri)})")
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return _stop_group(proc)
    finally:
        _stop_group(proc)
        if mlflow_proc is not None:
            _stop_group(mlflow_proc)


def cmd_forget(args: argparse.Namespace) -> int:
    import dagster as dg

    from promptopt_dagster.definitions import build_definitions
    from promptopt_dagster.driver import forget_study

    settings = get_settings()
    _prepare_home(settings)
    forget_study(build_definitions(settings), dg.DagsterInstance.get(), args.study)
    console.print(f"forgot {args.study} (Dagster run history is kept)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="optimize a study end to end, headless")
    run.add_argument("study", help="study YAML file")
    run.add_argument("--fresh", action="store_true", help="forget earlier iterations of this study first")
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the Dagster UI (and daemon) and the MLflow UI on this project")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    forget = sub.add_parser("forget", help="remove a study's prompts and records from the prompt store")
    forget.add_argument("study")
    forget.set_defaults(func=cmd_forget)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PromptoptError as exc:
        err_console.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
