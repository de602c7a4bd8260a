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
import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from ..errors import ConfigError

DEFAULT_OUT = Path("docs/bench/accuracy")
DEFAULT_RUNS = Path("runs/bench-accuracy")
DEFAULT_SEEDS = (0, 1, 2)
BENCH_FILE = "bench.json"


# ----------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Forgetting:
    """How forgetting is measured for a task (see the module docstring)."""

    kind: str  # "probe" (second-task probe accuracy) or "lm" (mean token loss on general text)
    data: str
    max_train: int = 0
    max_test: int = 0
    max_length: int = 128


@dataclass(frozen=True)
class Task:
    name: str
    model: str
    data: str
    args: tuple[str, ...]
    forgetting: Forgetting
    seconds_per_run: float  # measured on a quiet 2-core CPU (incl. start-up and forgetting), for the estimate
    description: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    args: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    task: Task
    method: Method
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task.name}/{self.method.name}/seed{self.seed}"


# Every method's classification head (newly initialised) trains at the same learning rate, written out in the
# command so that a run made under another head rule is never taken for a finished run of this plan.
HEAD_LR_ARGS = ("--head-lr", "5e-3")

TASKS: dict[str, Task] = {
    "snli": Task(
        "snli",
        "minilm",
        "snli",
        ("--max-train", "3000", "--max-test", "1000", "--max-length", "64", "--epochs", "1", *HEAD_LR_ARGS),
        Forgetting("probe", "bbc", max_train=300, max_test=300, max_length=128),
        seconds_per_run=100.0,
        description="MiniLM-L6 + SNLI (3,000 training pairs, 1,000 test pairs, max length 64, 1 epoch, batch 16)",
    ),
    "bbc": Task(
        "bbc",
        "minilm",
        "bbc",
        ("--max-train", "400", "--max-length", "128", "--epochs", "2", *HEAD_LR_ARGS),
        Forgetting("probe", "snli", max_train=1000, max_test=500, max_length=64),
        seconds_per_run=85.0,
        description="MiniLM-L6 + BBC News (400 training articles, all 445 test articles, max length 128, "
        "2 epochs, batch 16)",
    ),
    "gsm": Task(
        "gsm",
        "smollm2",
        "gsm_symbolic",
        ("--max-train", "480", "--max-test", "50", "--max-length", "256", "--max-steps", "60"),
        Forgetting("lm", "bbc", max_test=48, max_length=128),
        seconds_per_run=1000.0,
        description="SmolLM2-135M-Instruct + gsm_symbolic (reasoning-gym template instances in the style of "
        "GSM8K, not GSM8K itself; causal-LM loss on the chain of thought, 60 steps of batch 8, max length 256; "
        "exact match of the final number on 50 test problems, greedy decoding)",
    ),
}

# Quick mode (CI smoke): the real model and data, a few steps; forgetting on a small BBC probe for every task (SNLI
# needs a one-time fetch), which exercises the measurement only — quick-mode numbers mean nothing.
QUICK_ARGS = (
    "--max-train",
    "48",
    "--max-test",
    "48",
    "--max-steps",
    "3",
    "--batch-size",
    "8",
    "--max-new-tokens",
    "16",
)
# classification: short inputs; generation keeps the task's length (prompts + chains of thought need it)
QUICK_MAX_LENGTH = {"minilm": "64"}
QUICK_FORGETTING = {"max_train": 32, "max_test": 32, "max_length": 64}


def _m(name: str, family: str, *args: str) -> Method:
    return Method(name, family, tuple(args))


def minilm_methods() -> list[Method]:
    """The MiniLM sweep (query / value targets; 384 × 384 layers, LoRA r=8 = 6,144 parameters per layer)."""
    ms = [_m("head-only", "head-only", "--method", "head-only"), _m("full", "full", "--method", "full")]
    ms += [_m(f"lora-r{r}", "LoRA", "--method", "lora", "--r", str(r)) for r in (1, 2, 4, 8, 16)]
    # control: LoRA r=8 at the structured methods' default learning rate (2e-3 instead of LoRA's 1e-3)
    ms.append(_m("lora-r8-lr2e-3", "LoRA lr 2e-3", "--method", "lora", "--r", "8", "--lr", "2e-3"))
    surm = ("--method", "surm", "--structure")
    ms += [
        _m("surm-circulant-b384", "SURM circulant", *surm, "circulant", "--block-size", "384"),
        _m("surm-circulant-lora2", "SURM circulant", *surm, "circulant", "--budget", "lora-2"),
        # control, as lora-r8-lr2e-3 is for LoRA: the same circulant adapter at 2.5x its default learning rate
        _m(
            "surm-circulant-lora2-lr5e-3",
            "SURM circulant lr 5e-3",
            *surm,
            "circulant",
            "--budget",
            "lora-2",
            "--lr",
            "5e-3",
        ),
        # the forgetting control: the same adapter at LoRA's classification rate (1e-3, half its default)
        _m(
            "surm-circulant-lora2-lr1e-3",
            "SURM circulant lr 1e-3",
            *surm,
            "circulant",
            "--budget",
            "lora-2",
            "--lr",
            "1e-3",
        ),
        _m("surm-circulant-lora8", "SURM circulant", *surm, "circulant", "--budget", "lora-8"),
        _m("surm-toeplitz-lora2", "SURM Toeplitz", *surm, "toeplitz", "--budget", "lora-2"),
        _m("surm-kronecker-lora2", "SURM Kronecker", *surm, "kronecker", "--budget", "lora-2"),
    ]
    # LDR r=4 needs 2·r·384 = 3,072 parameters per 384 x 384 layer at least: LoRA r=4's budget, not r=2's
    ldr = ((1, 2), (2, 2), (4, 4))
    ms += [
        _m(f"surm-ldr-r{r}-lora{k}", "SURM LDR", *surm, "ldr", "--displacement-rank", str(r), "--budget", f"lora-{k}")
        for r, k in ldr
    ]
    ms.append(_m("surm-adapter-circulant", "SURM-Adapter", *surm, "circulant", "--placement", "adapter"))
    # targets control: circulant lora-2's 18,432 parameters (1/4 of LoRA r=8's) spent on other layers instead of
    # query / value: all four attention projections (768 per layer) or the two FFN layers (1,536 per layer); and
    # Kronecker, the best structure on query / value for SNLI, on all four (16 x 24 ⊗ 24 x 16, 768 per layer)
    attention = ("--target-modules", "query", "key", "value", "attention.output.dense")
    ffn = ("--target-modules", "intermediate.dense", *(f"layer.{i}.output.dense" for i in range(6)))
    other = "SURM, other targets"
    ms += [
        _m("surm-circulant-qkvo-b192", other, *surm, "circulant", "--block-size", "192", *attention),
        _m("surm-circulant-ffn-b384", other, *surm, "circulant", "--block-size", "384", *ffn),
        _m("surm-kronecker-qkvo-768", other, *surm, "kronecker", "--budget", "768", *attention),
        # a quarter of LoRA r=8's parameters on the same four projections (1,536 per layer, 36,864 in all): circulant
        # blocks of 96 and the Kronecker factors the budget rule picks (36 x 36 ⊗ 11 x 11 over a 396-padded layer)
        _m("surm-circulant-qkvo-b96", other, *surm, "circulant", "--block-size", "96", *attention),
        _m("surm-kronecker-qkvo-1536", other, *surm, "kronecker", "--budget", "1536", *attention),
        # ... and its reference: LoRA r=8 on the same four projections (twice the default's parameters), a LoRA r=8
        # candidate of the targets like the other LoRA r=8 rows
        _m("lora-r8-qkvo-lr2e-3", "LoRA, other targets", "--method", "lora", "--r", "8", "--lr", "2e-3", *attention),
        # learning-rate controls of the closest SNLI pair: the Kronecker row at half and twice its default rate
        # (1e-2), and the LoRA reference at 2.5x its rate, so that neither side alone is tuned on the test set
        _m(
            "surm-kronecker-qkvo-1536-lr5e-3", other, *surm, "kronecker", "--budget", "1536", "--lr", "5e-3", *attention
        ),
        _m(
            "surm-kronecker-qkvo-1536-lr2e-2", other, *surm, "kronecker", "--budget", "1536", "--lr", "2e-2", *attention
        ),
        _m("lora-r8-qkvo-lr5e-3", "LoRA, other targets", "--method", "lora", "--r", "8", "--lr", "5e-3", *attention),
    ]
    ms += [_m(f"pmss-deim-lora{r}", "PMSS", "--method", "pmss", "--budget", f"lora-{r}") for r in (2, 8)]
    ms += [
        _m(f"pmss-{s}-lora8", "PMSS selection", "--method", "pmss", "--budget", "lora-8", "--selection", s)
        for s in ("qdeim", "leverage", "norm", "random")
    ]
    ms += [
        _m("c3a-b24", "C3A", "--method", "c3a", "--block-size", "24"),
        _m("lokr-r8", "LoKr", "--method", "lokr", "--r", "8"),
        _m("vera-r256", "VeRA", "--method", "vera", "--r", "256"),
    ]
    return ms


def smollm2_methods() -> list[Method]:
    """The SmolLM2 comparison (q_proj / v_proj): LoRA r=8 (at its default rate and, as a control, at PMSS's),
    PMSS (at its default rate and, as the forgetting control, at LoRA's), SURM circulant, C3A."""
    return [
        _m("lora-r8", "LoRA", "--method", "lora", "--r", "8"),
        _m("lora-r8-lr1e-3", "LoRA lr 1e-3", "--method", "lora", "--r", "8", "--lr", "1e-3"),
        _m("pmss-deim-lora8", "PMSS", "--method", "pmss", "--budget", "lora-8"),
        _m("pmss-deim-lora8-lr3e-4", "PMSS lr 3e-4", "--method", "pmss", "--budget", "lora-8", "--lr", "3e-4"),
        _m("surm-circulant-lora8", "SURM circulant", "--method", "surm", "--structure", "circulant"),
        _m("c3a-lora8", "C3A", "--method", "c3a", "--budget", "lora-8"),
    ]


# families whose points are alternatives at one budget, not a curve over budgets: markers, no line, labelled
SCATTER_FAMILIES = ("PMSS selection", "SURM, other targets", "LoRA, other targets")
QUICK_METHODS = ("head-only", "lora-r8", "surm-circulant-lora2", "pmss-deim-lora2")
SUITES: dict[str, tuple[str, ...]] = {"minilm": ("bbc", "snli"), "smollm2": ("gsm",), "all": ("bbc", "snli", "gsm")}


def methods_for(task: Task) -> list[Method]:
    return smollm2_methods() if task.model == "smollm2" else minilm_methods()


# Execution order within a seed: the runs the targets compare first, so that a partial sweep answers
# them (reports list methods in the family order of the method lists whatever the execution order).
PRIORITY = (
    "lora-r8",
    "lora-r8-lr2e-3",
    "lora-r8-lr1e-3",
    "surm-circulant-lora2",
    "surm-kronecker-lora2",
    "surm-circulant-lora2-lr5e-3",
    "surm-toeplitz-lora2",
    "surm-circulant-b384",
    "pmss-deim-lora8",
    "pmss-deim-lora2",
    "head-only",
    "surm-circulant-lora8",
    "surm-ldr-r1-lora2",
    "surm-adapter-circulant",
    "c3a-b24",
    "lokr-r8",
    "lora-r2",
    "lora-r16",
)


def execution_order(runs: Sequence[Run]) -> list[Run]:
    """Seed-major; within a seed the methods of :data:`PRIORITY` first, then the rest in plan order."""
    rank = {m: i for i, m in enumerate(PRIORITY)}
    index = {r.id: i for i, r in enumerate(runs)}
    return sorted(runs, key=lambda r: (r.seed, rank.get(r.method.name, len(rank)), index[r.id]))


def _flag(args: Sequence[str], name: str) -> str:
    return args[list(args).index(name) + 1]


def plan(
    tasks: Sequence[str], seeds: Sequence[int], methods: Sequence[str] | None = None, quick: bool = False
) -> list[Run]:
    """The runs of a sweep, seed-major (every method of every task for seed 0 first), in report order."""
    runs = []
    known: set[str] = set()
    for seed in seeds:
        for t in tasks:
            task = TASKS[t]
            if quick:
                task = Task(
                    task.name,
                    task.model,
                    task.data,
                    (*QUICK_ARGS, "--max-length", QUICK_MAX_LENGTH.get(task.model, _flag(task.args, "--max-length"))),
                    Forgetting(task.forgetting.kind, "bbc", **QUICK_FORGETTING),
                    seconds_per_run=30.0,
                    description=task.description + " [quick mode: 48 examples, 3 steps]",
                )
            for m in methods_for(task):
                known.add(m.name)
                if methods is not None and m.name not in methods:
                    continue
                runs.append(Run(task, m, seed))
    if methods is not None:
        unknown = sorted(set(methods) - known)
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown} for tasks {list(tasks)}; valid: {sorted(known)}")
    return runs


# ----------------------------------------------------------------------------------------------- one run


def run_dir(runs_root: Path, run: Run) -> Path:
    return runs_root / run.task.name / run.method.name / f"seed{run.seed}"


def finetune_argv(run: Run, out: Path) -> list[str]:
    return [
        "finetune",
        "--model",
        run.task.model,
        "--data",
        run.task.data,
        *run.task.args,
        *run.method.args,
        "--seed",
        str(run.seed),
        "--baseline",
        "none",
        "--no-epoch-eval",
        "--no-progress",
        "--out",
        str(out),
    ]


def _spec(run: Run, runs_root: Path) -> dict[str, Any]:
    return {
        "id": run.id,
        "task": asdict(run.task),
        "method": asdict(run.method),
        "seed": run.seed,
        "dir": str(run_dir(runs_root, run)),
        "reference_dir": str(runs_root / "_reference"),
    }


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _saved_bytes(d: Path) -> int:
    """Bytes of the saved trainable state: the adapter file(s), the head file or the full model's weights."""
    names = ("adapter_model.safetensors", "head.safetensors")
    total = sum((d / n).stat().st_size for n in names if (d / n).is_file())
    model_dir = d / "model"
    if model_dir.is_dir():
        total += sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    return total


def _probe_value(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    from ..cli import _common as C
    from ..cli._baseline import probe_accuracy
    from ..data import ClassificationData, load_data

    data = load_data(f.data, max_train=f.max_train, max_test=f.max_test, seed=seed)
    assert isinstance(data, ClassificationData)  # the probe sets (TASKS) are built-in classification sets
    train = C.tokenize_classification(tokenizer, data.train_texts, data.train_pairs, data.train_labels, f.max_length)
    test = C.tokenize_classification(tokenizer, data.test_texts, data.test_pairs, data.test_labels, f.max_length)
    collator = C.make_collator("classification", tokenizer)
    return probe_accuracy(model, train, test, collator, 32, data.num_labels)


def _lm_loss(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    """Mean token cross-entropy of a causal LM on ``f.max_test`` BBC articles (first ``f.max_length`` tokens)."""
    import torch

    from ..data import ClassificationData, load_data

    data = load_data(f.data, max_train=1, max_test=f.max_test, seed=seed)
    assert isinstance(data, ClassificationData)  # the text sets (TASKS) are built-in classification sets
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data.test_texts), 8):
            enc = tokenizer(
                list(data.test_texts[i : i + 8]),
                truncation=True,
                max_length=f.max_length,
                padding=True,
                return_tensors="pt",
            )
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


def _forgetting_value(model: Any, tokenizer: Any, f: Forgetting, seed: int) -> float:
    if f.kind == "probe":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return _probe_value(base, tokenizer, f, seed)
    return _lm_loss(model, tokenizer, f, seed)


def _reference_value(spec: dict[str, Any], rc: dict[str, Any]) -> float:
    """The forgetting measure of the untouched base model (cached per model, measure and seed)."""
    from ..cli import _common as C

    f = Forgetting(**spec["task"]["forgetting"])
    key = f"{spec['task']['model']}-{f.kind}-{f.data}-{f.max_train}-{f.max_test}-{f.max_length}-seed{spec['seed']}"
    path = Path(spec["reference_dir"]) / f"{key}.json"
    if path.is_file():
        return float(json.loads(path.read_text())["value"])
    model_dir = rc["model_dir"]
    tokenizer = C.load_tokenizer(model_dir, generative=(rc["task"] == "generation"))
    labels = rc.get("label_names") or ["a", "b"]
    model, _ = C.load_base_model(model_dir, rc["task"], labels)
    model.eval()
    value = _forgetting_value(model, tokenizer, f, spec["seed"])
    _write_json_atomic(path, {"value": value, "measure": asdict(f), "model_dir": model_dir})
    return value


def worker(spec: dict[str, Any]) -> int:
    """Run one benchmark run (in its own process): fine-tune unless already saved, then forgetting → bench.json."""
    from ..cli import _common as C
    from ..cli import main as cli_main
    from ..cli.evaluate import load_run_model

    C.set_offline_env()
    C.quiet_transformers()
    d = Path(spec["dir"])
    task = {**spec["task"], "args": tuple(spec["task"]["args"])}
    task["forgetting"] = Forgetting(**task["forgetting"])
    method = {**spec["method"], "args": tuple(spec["method"]["args"])}
    argv = finetune_argv(Run(Task(**task), Method(**method), spec["seed"]), d)
    if (d / "run_config.json").is_file() and json.loads((d / "run_config.json").read_text()).get("argv") != argv:
        shutil.rmtree(d)  # a fine-tune of an older plan: not this run
    if not (d / "metrics.json").is_file():
        code = cli_main(argv)
        if code != 0:
            return code
    metrics = json.loads((d / "metrics.json").read_text())
    rc = json.loads((d / "run_config.json").read_text())

    t0 = time.perf_counter()
    f = Forgetting(**spec["task"]["forgetting"])
    base_value = _reference_value(spec, rc)
    model, tokenizer, _ = load_run_model(d)
    after = _forgetting_value(model, tokenizer, f, spec["seed"])
    # probe: points of second-task accuracy lost; lm: increase of the mean token loss on general text
    delta = 100 * (base_value - after) if f.kind == "probe" else after - base_value
    head = metrics.get("head_params") or 0
    forgetting_time = round(time.perf_counter() - t0, 2)
    answer = None
    if rc.get("task") == "generation":  # exact match on a few dozen problems is coarse: the answers' loss too
        from ..cli.finetune import load_dataset

        data = load_dataset(dict(rc["data_args"]))
        answer = C.answer_loss(model, tokenizer, data.test_prompts, data.test_answers, max_length=int(rc["max_length"]))
    result = {
        "id": spec["id"],
        "task": spec["task"]["name"],
        "model": spec["task"]["model"],
        "method": spec["method"]["name"],
        "family": spec["method"]["family"],
        "seed": spec["seed"],
        "accuracy": metrics["accuracy"],
        "trainable_params": metrics["trainable_params"],
        "adapter_params": metrics["trainable_params"] - head,
        "head_params": head,
        "total_params": metrics["total_params"],
        "trainable_percent": 100 * metrics["trainable_params"] / metrics["total_params"],
        "step_time_s": metrics.get("step_time_s"),
        "peak_rss_mb": (metrics.get("peak_memory_mb") or {}).get("cpu_rss"),
        "cuda_peak_mb": (metrics.get("peak_memory_mb") or {}).get("cuda_allocated"),
        "saved_bytes": _saved_bytes(d),
        "train_steps": metrics.get("train_steps"),
        "train_time_s": metrics.get("train_time_s"),
        "finetune_wall_s": metrics.get("wall_time_s"),
        "forgetting_kind": f.kind,
        "forgetting_base": base_value,
        "forgetting_after": after,
        "forgetting": delta,
        "forgetting_time_s": forgetting_time,
        "test_answer_loss": answer,
        "hardware": hardware(),  # step times of runs on different machines do not compare
        "argv": argv,
    }
    _write_json_atomic(d / BENCH_FILE, result)
    return 0


# ----------------------------------------------------------------------------------------------- the sweep


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
        if r.get("argv") != finetune_argv(run, d):  # other settings (or another runs folder): not this run
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
            if result.get("argv") == finetune_argv(run, d):
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


# ----------------------------------------------------------------------------------------------- reports

CSV_FIELDS = (
    "task",
    "method",
    "family",
    "seed",
    "accuracy",
    "adapter_params",
    "trainable_params",
    "trainable_percent",
    "step_time_s",
    "peak_rss_mb",
    "saved_bytes",
    "forgetting_kind",
    "forgetting",
    "test_answer_loss",
    "wall_s",
)


@dataclass
class Cell:
    """Mean ± sample std over seeds of one (task, method)."""

    task: str
    method: str
    family: str
    n: int
    accuracy: float
    accuracy_std: float
    adapter_params: int
    trainable_params: int
    trainable_percent: float
    step_time_s: float | None
    peak_rss_mb: float | None
    saved_bytes: int
    forgetting_kind: str
    forgetting: float
    forgetting_std: float
    seeds: list[int] = field(default_factory=list)
    # distinct machines its runs ran on (a run without a recorded machine counts as one more): > 1, the step time
    # mixes machines
    machines: int = 1
    # generation tasks: teacher-forced loss of the test answers (nats per token; mean, std over seeds), else None
    answer_loss: float | None = None
    answer_loss_std: float | None = None


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: Sequence[dict[str, Any]], order: Sequence[Run]) -> list[Cell]:
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        by.setdefault((r["task"], r["method"]), []).append(r)
    cells = []
    seen = set()
    for run in order:
        key = (run.task.name, run.method.name)
        if key in seen or key not in by:
            continue
        seen.add(key)
        rs = sorted(by[key], key=lambda r: r["seed"])
        acc, acc_sd = _mean_std([r["accuracy"] for r in rs])
        fg, fg_sd = _mean_std([r["forgetting"] for r in rs])
        steps = [r["step_time_s"] for r in rs if r.get("step_time_s")]
        mems = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_mb")]
        answers = [r["test_answer_loss"] for r in rs if r.get("test_answer_loss") is not None]
        al, al_sd = _mean_std(answers) if answers else (None, None)
        cells.append(
            Cell(
                task=key[0],
                method=key[1],
                family=rs[0]["family"],
                n=len(rs),
                accuracy=acc,
                accuracy_std=acc_sd,
                adapter_params=rs[0]["adapter_params"],
                trainable_params=rs[0]["trainable_params"],
                trainable_percent=rs[0]["trainable_percent"],
                step_time_s=statistics.median(steps) if steps else None,
                peak_rss_mb=statistics.median(mems) if mems else None,
                saved_bytes=rs[0]["saved_bytes"],
                forgetting_kind=rs[0]["forgetting_kind"],
                forgetting=fg,
                forgetting_std=fg_sd,
                seeds=[r["seed"] for r in rs],
                machines=len({r.get("hardware") for r in rs}),
                answer_loss=al,
                answer_loss_std=al_sd if len(answers) == len(rs) else None,
            )
        )
    return cells


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


# LoRA r=8 runs that the targets compare with (the more accurate one is the reference)
LORA_R8 = ("lora-r8", "lora-r8-lr2e-3", "lora-r8-lr1e-3", "lora-r8-qkvo-lr2e-3", "lora-r8-qkvo-lr5e-3")


def _best_against(candidates: Sequence[Cell], reference: Cell) -> tuple[Cell | None, float]:
    """The most accurate candidate and its accuracy minus the reference's, in points."""
    if not candidates:
        return None, math.nan
    best = max(candidates, key=lambda c: c.accuracy)
    return best, 100 * (best.accuracy - reference.accuracy)


def gap_standard_error(a: Cell, b: Cell) -> float | None:
    """The standard error of the difference of two cells' mean accuracies, in points: sqrt(s_a²/n_a + s_b²/n_b)
    with s the sample std over seeds (independent seeds); None unless both cells have at least two seeds."""
    if a.n < 2 or b.n < 2:
        return None
    return 100 * math.sqrt(a.accuracy_std**2 / a.n + b.accuracy_std**2 / b.n)


def _gap_text(gap: float, best: Cell, ref: Cell) -> str:
    se = gap_standard_error(best, ref)
    spread = f", standard error of the difference {se:.2f}" if se is not None else ""
    return f"{gap:+.2f} points{spread}; {best.n} / {ref.n} seeds"


def check_targets(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """The issue's targets, each met / missed (or not measured) with its numbers."""
    out = []
    by_task: dict[str, dict[str, Cell]] = {}
    for c in cells:
        by_task.setdefault(c.task, {})[c.method] = c
    for task, cs in by_task.items():
        loras = [cs[m] for m in LORA_R8 if m in cs]
        if not loras:
            continue
        # the reference: the most accurate LoRA r=8 run (learning-rate and target-module controls included)
        lora = max(loras, key=lambda c: c.accuracy)
        if task in ("snli", "bbc"):
            # a quarter of the smallest LoRA r=8 (query / value), also where the reference is the one on more modules
            quarter = min(c.adapter_params for c in loras) / 4
            best, gap = _best_against(
                [c for c in cs.values() if c.family.startswith("SURM") and c.adapter_params <= quarter], lora
            )
            if best is not None:
                out.append(
                    {
                        "task": task,
                        "target": "a SURM structure at <= 1/4 of LoRA r=8's parameters within 0.5 points of it "
                        "(any modules, at most a quarter of the smallest LoRA r=8, against the best LoRA r=8)",
                        "met": gap >= -0.5,
                        "detail": f"best {best.method} ({best.adapter_params:,} vs {lora.adapter_params:,} "
                        f"parameters): {100 * best.accuracy:.2f} ± {100 * best.accuracy_std:.2f} vs {lora.method} "
                        f"{100 * lora.accuracy:.2f} ± {100 * lora.accuracy_std:.2f} ({_gap_text(gap, best, lora)})",
                    }
                )
            out += _same_module_targets(task, cs, loras)
        if task == "gsm":
            best, gap = _best_against(
                [c for c in cs.values() if c.family == "PMSS" and c.adapter_params <= lora.adapter_params], lora
            )
            if best is not None:
                out.append(
                    {
                        "task": task,
                        "target": "PMSS at <= LoRA r=8's parameters matching or beating LoRA r=8",
                        "met": gap >= 0,
                        "detail": f"{best.method}: {100 * best.accuracy:.1f} vs {lora.method} "
                        f"{100 * lora.accuracy:.1f} ({gap:+.1f} points; {best.n} / {lora.n} seeds; "
                        f"{_resolution(task)})" + _answer_loss_note(best, loras),
                    }
                )
        structured = [c for c in cs.values() if c.family.startswith(("SURM", "PMSS"))]
        if structured:
            worse = [
                c for c in structured if c.forgetting > lora.forgetting + max(c.forgetting_std, lora.forgetting_std)
            ]
            unit = "points" if lora.forgetting_kind == "probe" else "nats"
            out.append(
                {
                    "task": task,
                    "target": "forgetting no worse than LoRA r=8's (within one std)",
                    "met": not worse,
                    "detail": f"{lora.method} {lora.forgetting:+.3f} {unit}; "
                    + (
                        "worse: " + ", ".join(f"{c.method} {c.forgetting:+.3f}" for c in worse)
                        if worse
                        else f"all {len(structured)} SURM / PMSS settings within"
                    ),
                }
            )
    return out


def _target_modules(task: str, method: str) -> str | None:
    """The target modules a planned method names (``"default targets"`` where it names none); None if unknown."""
    m = next((m for m in methods_for(TASKS[task]) if m.name == method), None) if task in TASKS else None
    if m is None:
        return None
    if "--target-modules" not in m.args:
        return "default targets"
    i = m.args.index("--target-modules") + 1
    j = next((k for k in range(i, len(m.args)) if m.args[k].startswith("--")), len(m.args))
    return ", ".join(m.args[i:j])


def _same_module_targets(task: str, cs: dict[str, Cell], loras: Sequence[Cell]) -> list[dict[str, Any]]:
    """The quarter target read per set of target modules: for each set with a LoRA r=8 run, the best SURM setting
    on the same modules at <= a quarter of that LoRA r=8's parameters against the best LoRA r=8 on them."""
    out = []
    for modules in dict.fromkeys(_target_modules(task, c.method) for c in loras):
        if modules is None:
            continue
        ref = max((c for c in loras if _target_modules(task, c.method) == modules), key=lambda c: c.accuracy)
        quarter = ref.adapter_params / 4
        best, gap = _best_against(
            [
                c
                for c in cs.values()
                if c.family.startswith("SURM")
                and _target_modules(task, c.method) == modules
                and c.adapter_params <= quarter
            ],
            ref,
        )
        if best is None:
            continue
        out.append(
            {
                "task": task,
                "target": f"the same, read on the same modules ({modules}): a SURM structure there at <= 1/4 of that "
                "LoRA r=8's parameters within 0.5 points of it",
                "met": gap >= -0.5,
                "detail": f"best {best.method} ({best.adapter_params:,} vs {ref.adapter_params:,} parameters): "
                f"{100 * best.accuracy:.2f} ± {100 * best.accuracy_std:.2f} vs {ref.method} "
                f"{100 * ref.accuracy:.2f} ± {100 * ref.accuracy_std:.2f} ({_gap_text(gap, best, ref)})",
            }
        )
    return out


def _answer_loss_note(best: Cell, loras: Sequence[Cell]) -> str:
    """The teacher-forced answer loss of ``best`` against the lowest of the LoRA r=8 runs' (where measured)."""
    loras = [c for c in loras if c.answer_loss is not None]
    if best.answer_loss is None or not loras:
        return ""
    lora = min(loras, key=lambda c: cast(float, c.answer_loss))  # not None: filtered above
    return (
        f"; teacher-forced loss of the test answers {best.answer_loss:.4f} vs {lora.method} {lora.answer_loss:.4f} "
        "nats per token (lower is better)"
    )


def _resolution(task: str) -> str:
    """How coarse an exact-match score on the task's test problems is: one problem in points."""
    args = TASKS[task].args
    n = int(_flag(args, "--max-test"))
    return f"{n} test problems: one problem = {100 / n:.1f} points"


def _learning_rates_note() -> str:
    from ..cli.methods import DEFAULT_LR, HEAD_LR

    rates = {t: ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR[t].items()) for t in ("classification", "generation")}
    return (
        f"Learning rates: each method's `structpeft finetune` default (classification: {rates['classification']}; "
        f"generation (gsm): {rates['generation']}; no per-run tuning), the newly initialised classification "
        f"head at {HEAD_LR:g} for every method; lora-r8-lr2e-3 "
        "repeats LoRA r=8 at the structured methods' rate as a control, and lora-r8-qkvo-lr2e-3 puts it on all four "
        "attention projections (the reference of the SURM rows with other targets); the targets use the best of "
        "them, and a quarter of query / value LoRA r=8's parameters as the SURM limit; "
        "surm-circulant-lora2-lr5e-3 is the same control for SURM circulant (2.5x its default rate) and "
        "surm-circulant-lora2-lr1e-3 the forgetting control (LoRA's rate), SURM candidates like the other SURM rows; "
        "surm-kronecker-qkvo-1536-lr5e-3 / -lr2e-2 (half and twice Kronecker's rate) and lora-r8-qkvo-lr5e-3 "
        "(2.5x) are the learning-rate controls of the closest SNLI pair, candidates like the rows they repeat; "
        "on gsm, lora-r8-lr1e-3 repeats LoRA r=8 at PMSS's generation rate and "
        "pmss-deim-lora8-lr3e-4 PMSS at LoRA's (the forgetting control; not a candidate for the PMSS target)."
    )


def markdown(cells: Sequence[Cell], targets: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = []
    for task in dict.fromkeys(c.task for c in cells):
        lines += [f"### {task}: {meta['tasks'][task]['description']}", ""]
        cs = [c for c in cells if c.task == task]
        lora = next((c for c in cs if c.method == "lora-r8"), None)
        unit = "points of probe accuracy" if cs[0].forgetting_kind == "probe" else "nats of token loss"
        answers = any(c.answer_loss is not None for c in cs)
        lines += [
            f"| method | adapter params | trainable % | accuracy (mean ± std) | vs LoRA r8 | step (s) | peak RSS "
            f"(MB) | saved | forgetting ({unit}) | seeds |" + (" test answer loss (nats / token) |" if answers else ""),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if answers else ""),
        ]
        for c in cs:
            vs = f"{100 * (c.accuracy - lora.accuracy):+.2f}" if lora is not None else "—"
            step = (f"{c.step_time_s:.3f}" + ("†" if c.machines > 1 else "")) if c.step_time_s else "—"
            mem = f"{c.peak_rss_mb:,.0f}" if c.peak_rss_mb else "—"
            acc = f"{100 * c.accuracy:.2f}" + (f" ± {100 * c.accuracy_std:.2f}" if c.n > 1 else "")
            fgt = f"{c.forgetting:+.3f}" + (f" ± {c.forgetting_std:.3f}" if c.n > 1 else "")
            lines.append(
                f"| {c.method} | {c.adapter_params:,} | {c.trainable_percent:.3f} | {acc} | {vs} | {step} | {mem} | "
                f"{_size(c.saved_bytes)} | {fgt} | {c.n} |" + (f" {_answer_cell(c)} |" if answers else "")
            )
        if any(c.machines > 1 for c in cs):
            lines += [
                "",
                "† the seeds of this cell ran on different machines (see the hardware line below): its "
                "step time mixes them and does not compare with the other rows.",
            ]
        lines.append("")
    lines += [
        "Accuracy: mean ± sample std over the seeds in the last column (one seed: no std). Step time (median "
        "per run) and peak RSS (per run process) were measured while other jobs may have shared the machine: "
        "use `structpeft bench speed` for controlled timings. Forgetting (positive = forgotten): MiniLM, the "
        "base minus the fine-tuned encoder's accuracy, in points, of a logistic-regression probe on mean-pooled "
        "embeddings for the other task (BBC for SNLI runs, SNLI for BBC runs); SmolLM2, the increase of the mean "
        "token loss on BBC News text.",
        "",
        _learning_rates_note(),
        "",
    ]
    if targets:
        lines += ["### Targets", ""]
        for t in targets:
            lines.append(f"- **{t['task']}** — {t['target']}: **{'met' if t['met'] else 'missed'}** — {t['detail']}")
        lines.append("")
    lines.append(
        f"{meta['finished']} of {meta['planned']} planned runs finished ({meta['failed']} failed); "
        f"{meta['hardware']}; command: `{meta['command']}`."
    )
    return "\n".join(lines) + "\n"


def _answer_cell(c: Cell) -> str:
    if c.answer_loss is None:
        return "—"
    return f"{c.answer_loss:.4f}" + (f" ± {c.answer_loss_std:.4f}" if c.n > 1 and c.answer_loss_std is not None else "")


def plots(cells: Sequence[Cell], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task in dict.fromkeys(c.task for c in cells):
        cs = [c for c in cells if c.task == task]
        families = list(dict.fromkeys(c.family for c in cs))
        for kind in ("params", "time"):
            fig, ax = plt.subplots(figsize=(8, 5.2))
            for i, fam in enumerate(families):
                fc = [c for c in cs if c.family == fam]
                if kind == "params":
                    fc = sorted(fc, key=lambda c: c.trainable_percent)
                    xs = [c.trainable_percent for c in fc]
                else:
                    fc = [c for c in fc if c.step_time_s]
                    xs = [cast(float, c.step_time_s) for c in fc]  # not None: filtered above
                if not fc:
                    continue
                ys = [100 * c.accuracy for c in fc]
                es = [100 * c.accuracy_std for c in fc]
                marker = "osD^v<>ph*X"[i % 11]
                line = "-" if (kind == "params" and len(fc) > 1 and fam not in SCATTER_FAMILIES) else ""
                ax.errorbar(xs, ys, yerr=es, fmt=marker + line, capsize=3, label=fam, alpha=0.85)
                if fam in (*SCATTER_FAMILIES, "SURM LDR") or len(fc) == 1:
                    for c, x, y in zip(fc, xs, ys, strict=True):
                        ax.annotate(c.method, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_ylabel("test accuracy (%)")
            if kind == "params":
                ax.set_xlabel("trainable parameters (% of the model, log scale)")
                ax.set_title(f"{task}: accuracy vs trainable parameters (mean ± std over seeds)")
            else:
                ax.set_xlabel("median wall time per training step (s, log scale)")
                ax.set_title(f"{task}: accuracy vs time per step")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="best")
            fig.tight_layout()
            path = out / (f"accuracy_vs_params_{task}.png" if kind == "params" else f"time_vs_accuracy_{task}.png")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def runs_hardware(results: Sequence[dict[str, Any]]) -> str:
    """The machines the runs ran on, as recorded per run: one description, or each with its run count."""
    counts = Counter(r.get("hardware") for r in results)
    if not counts:
        return hardware()
    if len(counts) == 1 and None not in counts:
        return next(iter(counts))
    parts = [f"{hw} ({n} runs)" for hw, n in counts.items() if hw is not None]
    if None in counts:
        parts.append(f"not recorded ({counts[None]} runs, finished before runs recorded their machine)")
    return "; ".join(parts)


def hardware() -> str:
    import torch

    from .speed import cpu_model

    threads = torch.get_num_threads()
    return f"{os.cpu_count()} CPU cores ({cpu_model()}), torch {torch.__version__} with {threads} threads"


def write_reports(
    runs: Sequence[Run], runs_root: Path, out: Path, command: str, failed: dict[str, Any]
) -> dict[str, Any]:
    done = load_finished(runs_root, runs)
    results = [done[r.id] for r in runs if r.id in done]
    out.mkdir(parents=True, exist_ok=True)
    cells = summarise(results, runs)
    targets = check_targets(cells)
    meta = {
        "planned": len(runs),
        "finished": len(results),
        "failed": len(failed),
        "failures": list(failed.values()),
        "hardware": runs_hardware(results),
        "command": command,
        "tasks": {r.task.name: asdict(r.task) for r in runs},
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(out / "runs.csv.tmp", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow(r)
    os.replace(out / "runs.csv.tmp", out / "runs.csv")
    # "restored_from" marks a run folder re-created from this very file: no information in the report itself
    _write_json_atomic(out / "runs.json", [{k: v for k, v in r.items() if k != "restored_from"} for r in results])
    _write_json_atomic(out / "summary.json", {"meta": meta, "cells": [asdict(c) for c in cells], "targets": targets})
    md = markdown(cells, targets, meta) if cells else "No finished runs yet.\n"
    (out / "summary.md.tmp").write_text(md)
    os.replace(out / "summary.md.tmp", out / "summary.md")
    if cells:
        plots(cells, out)
    return {"cells": cells, "targets": targets, "meta": meta, "markdown": md}


# ----------------------------------------------------------------------------------------------- CLI


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
    # the command that (re)produces the runs: without the report-only / display flags
    command = "structpeft bench accuracy " + " ".join(a for a in given if a not in ("--report-only", "--no-progress"))
    failed: dict[str, Any] = {}
    # the reports cover this plan and every other run the existing report records (never dropped by a partial
    # sweep); reproduced then by the full sweep's command
    covered = report_runs(runs, out, quick=args.quick)
    if len(covered) > len(runs) and not args.quick:
        command = "structpeft bench accuracy --suite all"
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


if __name__ == "__main__":  # the per-run worker: python -m structpeft.bench.accuracy --worker SPEC
    sys.exit(main())
