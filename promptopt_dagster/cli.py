"""`promptopt`: run a study headless, open the UIs, list, show or forget studies."""

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

from promptopt_dagster.errors import PromptoptError
from promptopt_dagster.settings import Settings, get_settings

# Plain text on stderr: an error message may hold brackets, carets and file names that rich
# markup would eat.
STEP_NAMES = {
    "current_prompt": "loading the prompt",
    "baseline_predictions": "primary inference",
    "baseline_metrics": "evaluation",
    "candidate_prompts": "refinement (optimizer LLM)",
    "candidate_predictions": "refined inference",
    "candidate_metrics": "second evaluation",
    "iteration_decision": "decision",
    "iteration_tracking": "MLflow logging",
    "meta_model": "meta-model",
    "study_report": "scoring seed and final prompt on the test split",
}


def _make_console() -> Console:
    """On a terminal: rich's spinner and wrapping. Otherwise (a pipe, a log file, CI): no
    animation, no hard wrap at 80 columns."""
    probe = Console()
    if probe.is_terminal:
        return probe
    return Console(soft_wrap=True, width=max(160, probe.width), force_terminal=False)


console = _make_console()


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _prepare_home(settings: Settings) -> None:
    """Point Dagster at the project's persistent instance, so the UI sees CLI runs: its
    dagster.yaml as instance_config.py decides (unless the user wrote their own), and the
    variables that file refers to in this process's environment, which children inherit."""
    from promptopt_dagster.instance_config import instance_environment, plan_instance_file

    environment = instance_environment(settings)  # a bad DAGSTER_PG_URL stops here, file untouched
    home = Path(os.environ.get("DAGSTER_HOME") or settings.dagster_home)
    config = home / "dagster.yaml"
    plan = plan_instance_file(config.read_text() if config.exists() else None, settings)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home.resolve())
    os.environ.update(environment)
    if plan.note:
        warn(plan.note)
    if plan.text is not None:
        # Two CLIs may start together on one home: each replaces the file whole, never half-written.
        partial = config.with_name(f".dagster.yaml.{os.getpid()}")
        partial.write_text(plan.text)
        os.replace(partial, config)


def _quiet_dagster(verbose: bool) -> None:
    """Dagster's own log lines (and their stack traces) stay out of the output unless --verbose:
    the CLI prints its own progress and one line per failure."""
    level = logging.INFO if verbose else logging.CRITICAL
    for name in ("dagster", "dagster_graphql", "dagster_webserver"):
        logging.getLogger(name).setLevel(level)
    # MLflow's table-creation notices are noise here; its warnings (an outage) still show.
    logging.getLogger("mlflow").setLevel(logging.INFO if verbose else logging.WARNING)


def _check_models(defs, study) -> None:  # type: ignore[no-untyped-def]
    """Build (and, for the embedded model, load) both clients now, so a missing or broken model
    is reported before the study is registered; the loaded model is reused by the runs."""
    llm = defs.resources["llm"]
    llm.primary(study)
    llm.optimizer(study)


def cmd_run(args: argparse.Namespace) -> int:
    from promptopt_dagster.core.scoring import evaluator_for
    from promptopt_dagster.core.study import load_study
    from promptopt_dagster.core.study_data import load_study_data
    from promptopt_dagster.instance_config import instance_environment

    settings = get_settings()
    instance_environment(settings)  # a bad DAGSTER_PG_URL is refused before any model loads
    _quiet_dagster(args.verbose)
    study = load_study(args.study)
    # Validate data, columns, splits, metrics and models before anything is registered or run.
    data = load_study_data(study)
    evaluator_for(study)
    console.print(
        f"{study.name}: {sum(len(v) for v in data.splits.values())} rows "
        f"(train {len(data.splits['train'])}, val {len(data.splits['val'])}, "
        f"test {len(data.splits['test'])}); "
        f"metric {study.target_metric}; backend {study.primary_model.backend or settings.LLM_BACKEND}",
        markup=False,
        highlight=False,
    )
    for line in data.warnings:
        warn(line)

    import dagster as dg

    from promptopt_dagster.definitions import build_definitions
    from promptopt_dagster.driver import fail_orphaned_runs, forget_study, instance_failures_reported

    defs = build_definitions(settings)
    _check_models(defs, study)
    _prepare_home(settings)
    store = defs.resources["prompt_store"].store  # type: ignore[attr-defined]
    with instance_failures_reported():
        instance = dg.DagsterInstance.get()
        for run_id in fail_orphaned_runs(instance):
            warn(f"run {run_id} was left unfinished by a process that is gone; marked failed")
        if args.fresh and store.is_registered(study.name):
            forget_study(defs, instance, study.name)
            console.print(f"forgot the earlier runs of {study.name}; starting over", markup=False)
        if not store.register_study(study):
            console.print(f"{study.name} is already registered: resuming where it stopped (or reporting).")
        return _drive_and_report(defs, instance, store, study.name, args.verbose)


def _drive_and_report(defs, instance, store, name: str, verbose: bool) -> int:  # type: ignore[no-untyped-def]
    from promptopt_dagster.driver import ITERATION_JOB, RunOutcome, drive
    from promptopt_dagster.partitions import parse_key

    live = console.is_terminal
    status = console.status("starting")
    current = {"label": ""}

    def on_run(job: str, key: str) -> None:
        current["label"] = f"iteration {parse_key(key)[1]}" if job == ITERATION_JOB else "report"

    def on_step(step: str) -> None:
        line = f"{current['label']}: {STEP_NAMES.get(step, step)} ..."
        if live:
            status.update(line)
        else:
            console.print(line, markup=False, highlight=False)

    def on_done(outcome: RunOutcome) -> None:
        if outcome.job != ITERATION_JOB:
            return
        _, iteration = parse_key(outcome.partition_key)
        record = store.load_record(name, iteration)
        if record:
            verdict = "accepted" if record.accepted else "rejected"
            console.print(
                f"iteration {iteration}: incumbent val {record.incumbent_val_score:.3f} -> {verdict}, "
                f"val {record.champion_val_score:.3f}; {record.calls} LLM calls; {outcome.seconds:.0f} s; "
                f"{record.stop_message}",
                markup=False,
                highlight=False,
            )
            for line in record.warnings:
                warn(f"iteration {iteration}: {line}")

    with status if live else contextlib.nullcontext():
        result = drive(
            defs, instance, name, on_run=on_run, on_done=on_done, on_step=on_step, quiet=not verbose
        )
    if not result.runs:
        console.print("nothing left to run for this study.")
    return _print_report(defs, instance, store, name)


def _print_report(defs, instance, store, name: str) -> int:  # type: ignore[no-untyped-def]
    from promptopt_dagster.core.report import StudyReport
    from promptopt_dagster.driver import study_state

    _, reported = study_state(instance, store, name)
    if not reported:
        error(f"{name} has no report yet: it has not stopped. Run its study file again to carry it on.")
        return 1
    raw = defs.load_asset_value("study_report", partition_key=name, instance=instance)
    report = StudyReport.model_validate(raw)
    table = Table(title=f"{report.study}: {report.metric} by iteration")
    for col in ("iteration", "val score", "accepted", "LLM calls", "tokens", "cost $", "wall s"):
        table.add_column(col, justify="right")
    for row in report.rows:
        table.add_row(
            str(row.iteration),
            f"{row.val_score:.3f}",
            "yes" if row.accepted else "no",
            str(row.llm_calls),
            str(row.tokens),
            f"{row.cost_usd:.4f}",
            f"{row.wall_seconds:.0f}" if row.wall_seconds is not None else "-",
        )
    console.print(table)
    console.print(f"stopped: {report.stop_message}", markup=False)
    console.print("final prompt")
    console.print(f"  system: {report.final_prompt.system_prompt or '(none)'}", markup=False)
    console.print(f"  output: {report.final_prompt.output_prompt}", markup=False)
    metric = report.metric
    console.print(
        f"test {metric}: seed {report.seed_test[metric]:.3f} -> "
        f"final {report.final_test[metric]:.3f} "
        f"(n={int(report.final_test.get('n', 0))}); validation: seed {report.seed_val:.3f} -> "
        f"final {report.final_val:.3f}; {report.total_calls} LLM calls, {report.total_tokens} tokens "
        f"(+{report.test_calls} for the test report); "
        f"cost ${report.total_cost_usd + report.test_cost_usd:.4f}",
        markup=False,
        highlight=False,
    )
    return 0


def _open_project():  # type: ignore[no-untyped-def]
    """Definitions, instance and prompt store of this project, for commands that only read or
    forget (nothing is created when there is no project yet)."""
    import dagster as dg

    from promptopt_dagster.definitions import build_definitions

    settings = get_settings()
    _quiet_dagster(False)
    _prepare_home(settings)
    defs = build_definitions(settings)
    return defs, dg.DagsterInstance.get(), defs.resources["prompt_store"].store


def cmd_list(args: argparse.Namespace) -> int:
    from promptopt_dagster.driver import study_state

    defs, instance, store = _open_project()
    names = store.studies()
    if not names:
        console.print(f"no study is registered in {store.root}; start one with `promptopt run STUDY.yaml`")
        return 0
    table = Table(title=f"studies in {store.root}")
    for col in ("study", "state", "iterations", "best val", "LLM calls", "stop reason"):
        table.add_column(col)
    for name in names:
        latest, reported = study_state(instance, store, name)
        records = store.records(name)
        best = max((r.best_val_score for r in records), default=None)
        if latest is None:
            state = "registered, not started"
        elif reported:
            state = "finished"
        elif latest.stop:
            state = "stopped, report pending"
        else:
            state = "running or interrupted"
        table.add_row(
            name,
            state,
            str(len(records)),
            "-" if best is None else f"{best:.3f}",
            str(records[-1].total_calls) if records else "0",
            (records[-1].stop_reason or "") if records and records[-1].stop else "",
        )
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from promptopt_dagster.core.study import check_study_name
    from promptopt_dagster.errors import StudyConfigError

    name = check_study_name(args.study)
    defs, instance, store = _open_project()
    if not store.is_registered(name):
        known = ", ".join(store.studies()) or "none"
        raise StudyConfigError(f"no study named {name!r} in {store.root} (registered: {known})")
    return _print_report(defs, instance, store, name)


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
    from promptopt_dagster.redaction import redact

    signal.signal(signal.SIGTERM, _raise_interrupt)  # a SIGTERM stops both UIs, like Ctrl-C
    mlflow_proc, mlflow_url = _start_mlflow_ui(settings)
    console.print(f"Dagster UI: http://{args.host}:{args.port}  (DAGSTER_HOME={os.environ['DAGSTER_HOME']})")
    console.print(f"MLflow UI:  {mlflow_url}  (tracking {redact(settings.mlflow_uri)})")
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
    from promptopt_dagster.core.study import check_study_name
    from promptopt_dagster.driver import forget_study

    name = check_study_name(args.study)
    defs, instance, store = _open_project()
    forget_study(defs, instance, name)
    console.print(
        f"forgot {name}: its prompts and records are removed from {store.root}; "
        "Dagster's run history is kept",
        markup=False,
        highlight=False,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="optimize a study end to end, headless (resumes a stopped run)")
    run.add_argument("study", help="the study YAML file (see the README, 'Writing a study')")
    run.add_argument(
        "--fresh", action="store_true", help="forget this study's earlier iterations and start over"
    )
    run.add_argument("--verbose", action="store_true", help="also print Dagster's own log")
    run.set_defaults(func=cmd_run)
    ui = sub.add_parser("ui", help="start the Dagster UI (and daemon) and the MLflow UI on this project")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=3000, help="Dagster UI port (default 3000)")
    ui.set_defaults(func=cmd_ui)
    lst = sub.add_parser("list", help="the registered studies: state, best score, stop reason")
    lst.set_defaults(func=cmd_list)
    show = sub.add_parser("show", help="the report of a finished study")
    show.add_argument("study", help="the study's name (its `name:` field)")
    show.set_defaults(func=cmd_show)
    forget = sub.add_parser(
        "forget", help="remove a study's prompts and records so it can start over (run history is kept)"
    )
    forget.add_argument("study", help="the study's name (its `name:` field), as `promptopt list` shows it")
    forget.set_defaults(func=cmd_forget)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PromptoptError as exc:
        error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
