"""The resumable sweep: which runs are finished (here or in a committed report), and running the rest."""

from __future__ import annotations

import json
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .measure import _spec, _write_json_atomic
from .tasks import (
    BENCH_FILE,
    DEFAULT_SEEDS,
    TASKS,
    Run,
    execution_order,
    finetune_argv,
    plan,
    run_dir,
    same_command,
)


def _estimate(runs: Sequence[Run], done: dict[str, dict[str, Any]]) -> float:
    """Seconds left: per task the median measured time of finished runs, else the task's sizing constant."""
    per_task: dict[str, list[float]] = {}
    for r in done.values():
        if r.get("wall_s"):
            per_task.setdefault(r["task"], []).append(r["wall_s"])
    left = 0.0
    for run in runs:
        if run.id not in done:
            measured = per_task.get(run.task.name)
            left += statistics.median(measured) if measured else run.task.seconds_per_run
    return left


def _hms(seconds: float) -> str:
    h, rem = divmod(int(seconds), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def _recorded(report: Path) -> dict[str, dict[str, Any]]:
    """The runs recorded in ``report / "runs.json"`` by id ({} if there is none or it is not a list of runs)."""
    path = report / "runs.json"
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {r["id"]: r for r in entries if isinstance(r, dict) and isinstance(r.get("id"), str)}
    except (ValueError, TypeError):
        return {}


def report_runs(runs: Sequence[Run], report: Path, quick: bool = False) -> list[Run]:
    """The runs a report covers: ``runs`` (this invocation's plan) and every other run of the full plan (all tasks,
    every method, the default seeds and any other seed recorded) that ``report / "runs.json"`` records, so a sweep
    of one suite, some methods or some seeds rewrites the reports without dropping the other runs' results; in the
    full plan's order, so the report lists methods as a full sweep does."""
    recorded = _recorded(report)
    planned = {r.id for r in runs}
    extra = set(recorded) - planned
    if not extra:
        return list(runs)
    seeds = {*DEFAULT_SEEDS, *(r.seed for r in runs)}
    seeds |= {int(m.group(1)) for i in extra if (m := re.search(r"/seed(\d+)$", i))}
    # the full plan's order (the order of the method lists), whichever subset this invocation ran
    ordered = [r for r in plan(tuple(TASKS), sorted(seeds), quick=quick) if r.id in planned or r.id in extra]
    listed = {r.id for r in ordered}
    return [*ordered, *(r for r in runs if r.id not in listed)]


def restore_from_report(runs_root: Path, runs: Sequence[Run], report: Path) -> int:
    """Re-create ``bench.json`` of runs recorded in a committed ``runs.json`` (another machine's sweep) whose
    fine-tune command is the one planned now, so a sweep continues across machines. Returns how many."""
    recorded = _recorded(report)
    restored = 0
    for run in runs:
        d = run_dir(runs_root, run)
        r = recorded.get(run.id)
        if r is None or (d / BENCH_FILE).is_file():
            continue
        if not same_command(r.get("argv"), finetune_argv(run, d)):  # other settings: not this run
            continue
        _write_json_atomic(d / BENCH_FILE, {**r, "restored_from": str(report / "runs.json")})
        restored += 1
    return restored


def load_finished(runs_root: Path, runs: Sequence[Run]) -> dict[str, dict[str, Any]]:
    """Finished runs of this plan: a ``bench.json`` made by another fine-tune command (an older plan) is stale."""
    done = {}
    for run in runs:
        d = run_dir(runs_root, run)
        p = d / BENCH_FILE
        if p.is_file():
            result = json.loads(p.read_text())
            if same_command(result.get("argv"), finetune_argv(run, d)):
                done[run.id] = result
    return done


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler) raises KeyboardInterrupt, as Ctrl-C does, so that the running worker is
    stopped too (:func:`_run_worker`) instead of training on unattended (main thread only)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_worker(argv: Sequence[str], log: Any) -> int:
    """Run one worker to completion and return its exit status. Interrupted meanwhile (Ctrl-C, or SIGTERM through
    :func:`_terminate_as_interrupt`), ``subprocess.run`` kills the worker before the interruption propagates."""
    with _terminate_as_interrupt():
        return subprocess.run(list(argv), stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def sweep(runs: Sequence[Run], runs_root: Path, retry_failed: bool, show_progress: bool = True) -> dict[str, Any]:
    """Run every unfinished run in a subprocess; returns {id: result or failure record}."""
    from tqdm.auto import tqdm

    done = load_finished(runs_root, runs)
    failed: dict[str, dict[str, Any]] = {}
    todo = [r for r in execution_order(runs) if r.id not in done]
    print(
        f"{len(runs)} runs planned, {len(done)} already finished, {len(todo)} to run; "
        f"estimated {_hms(_estimate(runs, done))} on this machine"
    )
    bar = tqdm(todo, desc="bench accuracy", unit="run", file=sys.stdout, disable=not show_progress)
    for run in bar:
        d = run_dir(runs_root, run)
        fail_file = d.parent / f"{d.name}.failed.json"
        if fail_file.is_file() and not retry_failed:
            failed[run.id] = json.loads(fail_file.read_text())
            continue
        bar.set_postfix_str(run.id)
        d.parent.mkdir(parents=True, exist_ok=True)
        log = d.parent / f"{d.name}.log"
        spec_file = d.parent / f"{d.name}.spec.json"
        _write_json_atomic(spec_file, _spec(run, runs_root))
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            worker = [sys.executable, "-m", "structpeft.bench.accuracy", "--worker", str(spec_file)]
            returncode = _run_worker(worker, fh)
        wall = time.perf_counter() - t0
        if returncode == 0 and (d / BENCH_FILE).is_file():
            result = json.loads((d / BENCH_FILE).read_text())
            result["wall_s"] = round(wall, 1)
            _write_json_atomic(d / BENCH_FILE, result)
            done[run.id] = result
            fail_file.unlink(missing_ok=True)
            tqdm.write(
                f"{run.id}: accuracy {result['accuracy']:.4f}, {result['adapter_params']:,} adapter parameters, "
                f"forgetting {result['forgetting']:+.3f} [{wall:.0f} s]",
                file=sys.stdout,
            )
        else:
            tail = log.read_text().strip().splitlines()[-3:] if log.is_file() else []
            record = {"id": run.id, "returncode": returncode, "error": " | ".join(tail), "log": str(log)}
            _write_json_atomic(fail_file, record)
            failed[run.id] = record
            tqdm.write(f"{run.id}: FAILED (exit {returncode}); see {log}", file=sys.stdout)
        spec_file.unlink(missing_ok=True)
    return {"done": done, "failed": failed}
