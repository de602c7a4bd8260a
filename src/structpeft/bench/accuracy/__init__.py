"""Accuracy benchmark: every method, several budgets, several seeds, on real models and data, resumable.

``structpeft bench accuracy`` runs a sweep of ``structpeft finetune`` runs — one fresh subprocess per run, so
peak memory is per run and a crash or NaN in one run does not stop the sweep — and writes, from the finished
runs alone (no hand-typed numbers):

* ``runs.csv`` / ``runs.json``: every run (accuracy, trainable parameters and their share of the model,
  adapter parameters without the classification head, median wall time per optimizer step, peak memory, size
  of the saved trainable state, forgetting);
* ``summary.md`` / ``summary.json``: per task and method the mean ± sample std over seeds, and the issue's
  targets checked (met / missed, with the numbers);
* ``accuracy_vs_params_<task>.png`` (accuracy against the trainable-parameter share of the model, log x, one
  line per method family, as PMSS's Figure 2) and ``time_vs_accuracy_<task>.png``.

**Forgetting** is measured after training on what the task did not train for: for the encoder (MiniLM) the
accuracy of a logistic-regression probe on the fine-tuned encoder's mean-pooled embeddings on a *second*
task (BBC for SNLI runs, SNLI for BBC runs), reported as ``probe(base) − probe(fine-tuned)`` in points; for
the decoder (SmolLM2) the mean token loss on held-back general text (BBC News articles), reported as
``loss(fine-tuned) − loss(base)``. Positive means forgotten; head-only runs leave the encoder unchanged, so
their forgetting is exactly 0 (a check of the measurement).

A run is finished when its folder holds ``bench.json``; a killed sweep continues where it stopped (the
fine-tune itself is written atomically). Runs recorded in the committed report (``runs.json`` of ``--out``) with
the same fine-tune command count as finished too, so a sweep also continues on another machine; the reports
cover every recorded run, so sweeping one suite, method or seed never drops the others (:func:`report_runs`).
Runs are ordered seed-major, with the runs the targets compare first, so a partial sweep answers the targets early.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .measure import hardware, worker
from .report import (
    CSV_FIELDS,
    LORA_R8,
    Cell,
    check_targets,
    gap_standard_error,
    markdown,
    plots,
    pooled_forgetting_std,
    runs_hardware,
    summarise,
    write_reports,
)
from .runner import _hms, load_finished, report_runs, restore_from_report, sweep
from .tasks import (
    BENCH_FILE,
    DEFAULT_OUT,
    DEFAULT_RUNS,
    DEFAULT_SEEDS,
    PRIORITY,
    QUICK_METHODS,
    SCATTER_FAMILIES,
    SUITES,
    TASKS,
    Forgetting,
    Method,
    Run,
    Task,
    execution_order,
    finetune_argv,
    methods_for,
    minilm_methods,
    plan,
    run_dir,
    same_command,
    smollm2_methods,
)

__all__ = [
    "BENCH_FILE",
    "CSV_FIELDS",
    "DEFAULT_OUT",
    "DEFAULT_RUNS",
    "DEFAULT_SEEDS",
    "LORA_R8",
    "PRIORITY",
    "QUICK_METHODS",
    "SCATTER_FAMILIES",
    "SUITES",
    "TASKS",
    "Cell",
    "Forgetting",
    "Method",
    "Run",
    "Task",
    "check_targets",
    "execution_order",
    "finetune_argv",
    "gap_standard_error",
    "hardware",
    "load_finished",
    "main",
    "markdown",
    "methods_for",
    "minilm_methods",
    "parser",
    "plan",
    "plots",
    "reproduce_command",
    "pooled_forgetting_std",
    "report_runs",
    "restore_from_report",
    "run_dir",
    "same_command",
    "runs_hardware",
    "smollm2_methods",
    "summarise",
    "sweep",
    "worker",
    "write_reports",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="structpeft bench accuracy",
        description=(
            "Fine-tune every method at several budgets and seeds on real models and data and report accuracy, "
            "parameters, time per step, peak memory, adapter size and forgetting (resumable). Full MiniLM sweep "
            f"(--suite minilm): 2 tasks x {len(minilm_methods())} methods x 3 seeds, about "
            f"{_hms(3 * len(minilm_methods()) * (TASKS['snli'].seconds_per_run + TASKS['bbc'].seconds_per_run))}"
            f" on 2 CPU cores; SmolLM2 comparison (--suite smollm2): {len(smollm2_methods())} methods x 3 seeds, "
            f"about {_hms(3 * len(smollm2_methods()) * TASKS['gsm'].seconds_per_run)}. --quick: BBC, 4 methods, 1 "
            "seed, 3 steps (a smoke test)."
        ),
    )
    p.add_argument("--suite", choices=sorted(SUITES), default="minilm", help="which tasks (default: minilm)")
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=None, help="instead of --suite")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME", help="only these methods (see --list)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (quick: 0)")
    p.add_argument("--quick", action="store_true", help="smoke test: bbc, 4 methods, one seed, 3 steps")
    p.add_argument("--out", type=Path, default=None, help=f"reports (default: {DEFAULT_OUT}, quick: runs dir)")
    p.add_argument("--runs-dir", type=Path, default=None, help=f"run folders (default: {DEFAULT_RUNS}[-quick])")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again (default: keep the failure)")
    p.add_argument("--report-only", action="store_true", help="write the reports from finished runs; run nothing")
    p.add_argument("--list", action="store_true", help="print the planned runs and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def reproduce_command(given: Sequence[str], runs_dir: Path | None, out: Path | None, whole_plan: bool) -> str:
    """The command a report names as the one that (re)produces its runs: this invocation's arguments ``given``
    without the report-only / display flags; for a report that also covers runs outside this invocation's plan
    (``whole_plan``), the full sweep's command, writing to the same run and report folders as this one."""
    if not whole_plan:
        return "structpeft bench accuracy " + " ".join(a for a in given if a not in ("--report-only", "--no-progress"))
    folders = [(flag, path) for flag, path in (("--runs-dir", runs_dir), ("--out", out)) if path is not None]
    return " ".join(["structpeft bench accuracy --suite all", *(f"{flag} {path}" for flag, path in folders)])


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker is not None:
        return worker(json.loads(args.worker.read_text()))
    tasks = args.tasks or (("bbc",) if args.quick else SUITES[args.suite])
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else list(DEFAULT_SEEDS))
    methods = args.methods if args.methods is not None else (list(QUICK_METHODS) if args.quick else None)
    runs = plan(tasks, seeds, methods, quick=args.quick)
    runs_root = args.runs_dir or (Path(str(DEFAULT_RUNS) + "-quick") if args.quick else DEFAULT_RUNS)
    out = args.out or (runs_root if args.quick else DEFAULT_OUT)
    if args.list:
        for r in runs:
            print(r.id, " ".join(r.method.args))
        return 0
    given = argv if argv is not None else sys.argv[1:]
    failed: dict[str, Any] = {}
    # the reports cover this plan and every other run the existing report records (never dropped by a partial
    # sweep); reproduced then by the full sweep's command
    covered = report_runs(runs, out, quick=args.quick)
    whole_plan = len(covered) > len(runs) and not args.quick
    command = reproduce_command(given, args.runs_dir, args.out, whole_plan)
    restored = restore_from_report(runs_root, covered, out)
    if restored:
        print(f"{restored} finished runs restored from {out / 'runs.json'}")
    if not args.report_only:
        failed = sweep(runs, runs_root, args.retry_failed, show_progress=not args.no_progress)["failed"]
    else:
        for run in runs:
            d = run_dir(runs_root, run)
            fail_file = d.parent / f"{d.name}.failed.json"
            if fail_file.is_file():
                failed[run.id] = json.loads(fail_file.read_text())
    report = write_reports(covered, runs_root, out, command.strip(), failed)
    print(report["markdown"])
    print(f"reports written to {out}")
    if failed:
        print(f"{len(failed)} run(s) failed: " + ", ".join(sorted(failed)) + " (see their .log files)")
    return 1 if failed else 0
